import numpy as np
import pytest

from lib.retrieval.decide import (
    Thresholds,
    accuracy_lower_bound,
    choose_thresholds,
    class_scores,
    load_thresholds,
    neighbour_weights,
    risk_coverage,
    save_thresholds,
    threshold_grid,
    verdicts,
    vote,
)

CLASSES = ["a", "b", "c"]


def test_inverse_vote_hand_computed():
    # a: 1/0.5 + 1/1.0 = 3; b: 1/0.25 = 4 -> b wins with 4/7 although a has more neighbours
    d = np.array([[0.25, 0.5, 1.0]])
    scores = class_scores(d, [["b", "a", "a"]], CLASSES, "inverse", eps=0.0)
    np.testing.assert_allclose(scores, [[3 / 7, 4 / 7, 0]])
    winner, score, margin = vote(scores)
    assert CLASSES[winner[0]] == "b" and score[0] == pytest.approx(4 / 7) and margin[0] == pytest.approx(1 / 7)


def test_uniform_vote_is_the_majority_and_softmax_follows_similarity():
    d = np.array([[0.25, 0.5, 1.0]])
    labels = [["b", "a", "a"]]
    assert CLASSES[vote(class_scores(d, labels, CLASSES, "uniform"))[0][0]] == "a"
    w = neighbour_weights(d, "softmax", temperature=0.1)
    expected = np.exp((1 - d / 2) / 0.1)
    np.testing.assert_allclose(w / w.sum(), expected / expected.sum())
    with pytest.raises(ValueError, match="valid: inverse, uniform, softmax"):
        neighbour_weights(d, "cosine")


def test_class_scores_equal_a_per_query_loop():
    rng = np.random.default_rng(0)
    d = np.sort(rng.uniform(0, 4, (30, 7)), axis=1)
    labels = rng.choice(CLASSES, (30, 7))
    scores = class_scores(d, labels, CLASSES)
    for i in range(30):
        expected = np.array([sum(1 / (d[i, j] + 1e-6) for j in range(7) if labels[i, j] == c) for c in CLASSES])
        np.testing.assert_allclose(scores[i], expected / expected.sum())


def test_unknown_neighbour_label_is_an_error():
    with pytest.raises(ValueError, match="not in classes"):
        class_scores([[0.1]], [["z"]], CLASSES)


def test_verdicts_distance_first_then_margin():
    v = verdicts([0.1, 0.1, 2.0, 2.0], [0.9, 0.1, 0.9, 0.1], Thresholds(max_distance=1.0, min_margin=0.5))
    assert v.tolist() == ["accepted", "reshoot", "unclassifiable", "unclassifiable"]
    assert set(verdicts([3.9], [0.0], Thresholds())) == {"accepted"}


def _constructed(n=400, seed=0):
    """Queries whose correctness gets likelier with a larger margin and a smaller distance."""
    rng = np.random.default_rng(seed)
    margin, dist = rng.uniform(0, 1, n), rng.uniform(0, 2, n)
    correct = rng.uniform(0, 1, n) < 0.3 + 0.5 * margin + 0.2 * (1 - dist / 2)
    return correct, dist, margin


@pytest.mark.parametrize("target", [0.85, 0.9, 0.95])
def test_thresholds_reach_the_target_accuracy_with_the_largest_coverage(target):
    """The point-estimate rule (confidence=None, min_support=1): the old in-sample choice."""
    correct, dist, margin = _constructed()
    t, info = choose_thresholds(correct, dist, margin, target_accuracy=target, confidence=None, min_support=1)
    accepted = (dist <= t.max_distance) & (margin >= t.min_margin)
    assert info["met"] and correct[accepted].mean() >= target
    assert info["coverage"] == pytest.approx(accepted.mean()) and info["accuracy"] == pytest.approx(correct[accepted].mean())
    grid = threshold_grid(correct, dist, margin)
    assert info["coverage"] == pytest.approx(grid.loc[grid["accuracy"] >= target, "coverage"].max())


def test_the_accuracy_bound_is_scipys_exact_binomial_interval():
    from scipy.stats import binomtest

    hits, n = np.array([0, 1, 7, 29, 30, 95]), np.array([5, 10, 10, 30, 30, 100])
    got = accuracy_lower_bound(hits, n, 0.95)
    # a one-sided 95 % lower bound is the lower end of the two-sided 90 % exact (Clopper-Pearson) interval
    expected = [binomtest(int(h), int(m)).proportion_ci(0.90, method="exact").low for h, m in zip(hits, n)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)  # both are the same beta quantile, to solver precision
    assert np.isnan(accuracy_lower_bound(0, 0)) and (got <= hits / n).all()


@pytest.mark.parametrize("target", [0.75, 0.85])
def test_thresholds_with_a_bound_and_support_equal_a_brute_force_search(target):
    correct, dist, margin = _constructed()
    t, info = choose_thresholds(correct, dist, margin, target_accuracy=target, min_support=40, confidence=0.95,
                                n_grid=21)
    from scipy.stats import binomtest

    best = None  # every grid pair, its accepted queries counted and bounded one by one
    for md in np.unique(np.append(np.quantile(dist, np.linspace(0, 1, 21)), np.inf)):
        for mm in np.unique(np.append(np.quantile(margin, np.linspace(0, 1, 21)), 0.0)):
            acc = (dist <= md) & (margin >= mm)
            if acc.sum() < 40:
                continue
            low = binomtest(int(correct[acc].sum()), int(acc.sum())).proportion_ci(0.90, method="exact").low
            if low >= target and (best is None or acc.mean() > best):
                best = acc.mean()
    assert info["met"] and info["coverage"] == pytest.approx(best)
    accepted = (dist <= t.max_distance) & (margin >= t.min_margin)
    assert accepted.sum() >= 40 and info["n_accepted"] == accepted.sum()
    assert info["accuracy_lower"] >= target and info["accuracy"] > info["accuracy_lower"]
    loose, _ = choose_thresholds(correct, dist, margin, target_accuracy=target, confidence=None, min_support=1,
                                 n_grid=21)
    # the bound costs coverage: the point estimate accepts more
    assert ((dist <= loose.max_distance) & (margin >= loose.min_margin)).mean() > info["coverage"]


def test_too_few_queries_for_the_support_reject_nothing_and_say_so():
    correct, dist, margin = _constructed(n=20)
    t, info = choose_thresholds(correct, dist, margin, target_accuracy=0.9, min_support=30)
    assert t == Thresholds() and not info["met"] and info["coverage"] == 1.0


def test_thresholds_for_a_target_coverage_answer_at_least_that_share():
    correct, dist, margin = _constructed()
    t, info = choose_thresholds(correct, dist, margin, target_coverage=0.5)
    accepted = (dist <= t.max_distance) & (margin >= t.min_margin)
    assert accepted.mean() >= 0.5 and correct[accepted].mean() > correct.mean()


def test_unreachable_target_is_flagged_and_all_correct_data_rejects_nothing():
    t, info = choose_thresholds(np.ones(10, bool), np.linspace(0, 1, 10), np.linspace(0, 1, 10), target_accuracy=0.9,
                                confidence=None, min_support=1)
    assert (t.max_distance, t.min_margin, info["coverage"]) == (np.inf, 0.0, 1.0)
    _, info = choose_thresholds(np.zeros(10, bool), np.linspace(0, 1, 10), np.linspace(0, 1, 10), target_accuracy=0.5,
                                min_support=1)
    assert not info["met"] and info["accuracy"] == 0.0


def test_risk_coverage_equals_brute_force_with_ties_answered_together():
    rng = np.random.default_rng(1)
    confidence = rng.integers(0, 8, 60).astype(float)
    correct = rng.uniform(size=60) < 0.6
    curve = risk_coverage(correct, confidence)
    assert len(curve) == len(np.unique(confidence))
    for _, row in curve.iterrows():
        answered = confidence >= row["threshold"]
        assert row["coverage"] == pytest.approx(answered.mean())
        assert row["accuracy"] == pytest.approx(correct[answered].mean())
    assert curve["coverage"].iloc[-1] == 1.0


def test_thresholds_file_round_trip_keeps_infinity(tmp_path):
    save_thresholds(tmp_path / "t.json", Thresholds(min_margin=0.25), {"k": 20, "weighting": "inverse"})
    t, info = load_thresholds(tmp_path / "t.json")
    assert t == Thresholds(float("inf"), 0.25) and info == {"k": 20, "weighting": "inverse"}
    assert "Infinity" not in (tmp_path / "t.json").read_text()  # strict JSON for other tools


def test_best_f1_new_threshold_on_constructed_distances():
    from lib.retrieval.decide import best_f1_new_threshold

    # known individuals sit close to a gallery photo, new ones far; one new one hides among the known
    d = np.array([0.1, 0.2, 0.3, 0.35, 0.9, 1.1, 1.2])
    new = np.array([False, False, False, True, False, True, True])
    got = best_f1_new_threshold(d, new)
    called = d > got["threshold"]
    tp = (called & new).sum()
    assert got["precision"] == pytest.approx(tp / called.sum()) and got["recall"] == pytest.approx(tp / new.sum())
    # the best F1 here: call d >= 1.1 new (precision 1, recall 2/3, F1 0.8) over d >= 0.35 (4 called, 3 new: 0.857)
    assert got["f1"] == pytest.approx(max(2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 0.75 * 1 / 1.75))
    assert (got["n_new"], got["n_known"]) == (3, 4)
    assert np.isnan(best_f1_new_threshold(d, np.zeros(7, bool))["threshold"])


def test_each_new_individual_rule_says_what_it_optimises():
    """Two thresholds for calling a query new live in one evaluation record: each entry names the rule that chose it
    (best F1 of the 'new' call; best balance of known and unknown accuracy), so neither reads as the other."""
    import pandas as pd

    from lib.retrieval.decide import BEST_F1_RULE, best_f1_new_threshold, new_individual_calls
    from lib.retrieval.open_set import BALANCED_RULE, open_set_report

    d = np.array([0.1, 0.2, 0.3, 0.35, 0.9, 1.1, 1.2])
    new = np.array([False, False, False, True, False, True, True])
    assert best_f1_new_threshold(d, new)["rule"] == new_individual_calls(d, new, 0.5)["rule"] == BEST_F1_RULE
    queries = pd.DataFrame({"label": list("abcxdyz"), "pred": list("abcaddd"), "top1_distance": d, "margin": 1.0})
    report = open_set_report(queries, np.array(list("abcd")), new_threshold=0.5)
    assert report["new_threshold_rule"] == BALANCED_RULE != BEST_F1_RULE


def test_new_individual_calls_at_a_threshold_chosen_elsewhere():
    from lib.retrieval.decide import new_individual_calls

    d = np.array([0.1, 0.5, 0.7, 0.9])
    new = np.array([False, True, False, True])
    got = new_individual_calls(d, new, 0.6)  # calls the last two new: one of them is
    assert (got["precision"], got["recall"], got["f1"]) == (0.5, 0.5, 0.5)
    assert new_individual_calls(d, new, 1.0)["recall"] == 0 and np.isnan(new_individual_calls(d, new, 1.0)["precision"])
    assert np.isnan(new_individual_calls(d, new, float("nan"))["recall"])


@pytest.mark.parametrize("weighting", ["inverse", "uniform", "softmax"])
def test_padding_at_distance_inf_carries_no_vote(weighting):
    """A context-restricted row shorter than k ends in padding (distance inf, the first neighbour's label): the vote
    equals the vote of the real neighbours alone."""
    real_d, real_l = np.array([[0.2, 0.5]]), np.array([["a", "b"]])
    padded_d = np.array([[0.2, 0.5, np.inf, np.inf]])
    padded_l = np.array([["a", "b", "a", "a"]])
    assert (neighbour_weights(padded_d, weighting)[0, 2:] == 0).all()
    np.testing.assert_allclose(class_scores(padded_d, padded_l, ["a", "b"], weighting),
                               class_scores(real_d, real_l, ["a", "b"], weighting))
