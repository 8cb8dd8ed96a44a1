import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from lib.retrieval.metrics import (
    average_precision,
    cmc,
    identity_balanced_map,
    mean_average_precision,
    per_identity_ap,
    recall_at_k,
    relevance,
    summarize_ap,
)


@pytest.mark.parametrize(
    "to_labels",
    [np.array, lambda a: np.array(a, dtype=object), lambda a: np.vectorize(ord)(a)],
    ids=["str", "object", "int"],
)
def test_recall_at_k_hand_computed_for_str_object_and_int_labels(to_labels):
    queries = to_labels(["a", "b", "c"])
    neighbours = to_labels([["x", "a", "a"], ["b", "x", "x"], ["x", "x", "x"]])
    # a: first hit at rank 2; b: rank 1; c: never
    assert recall_at_k(queries, neighbours, ks=(1, 2, 3)) == pytest.approx(
        {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 2 / 3}
    )


def test_recall_counts_a_query_absent_from_the_gallery_as_a_miss():
    assert recall_at_k(np.array(["a", "new"]), np.array([["a"], ["a"]]), ks=(1,)) == {"recall@1": 0.5}


def test_int_labels_against_str_labels_are_refused_not_silently_all_wrong():
    with pytest.raises(TypeError, match="numeric"):
        recall_at_k(np.array([1, 2]), np.array([["1"], ["2"]]), ks=(1,))


def test_relevance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="n_q"):
        relevance(np.array(["a", "b"]), np.array([["a"]]))


def test_cmc_is_recall_at_every_rank_and_matches_a_per_query_loop():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 4, 50)
    ranked = rng.integers(0, 4, (50, 8))
    curve = cmc(queries, ranked, max_rank=10)
    expected = [np.mean([q in row[:r] for q, row in zip(queries, ranked)]) for r in range(1, 11)]
    np.testing.assert_allclose(curve, expected)
    assert np.all(np.diff(curve) >= 0)
    assert recall_at_k(queries, ranked, ks=(1, 3, 8)) == pytest.approx({f"recall@{k}": curve[k - 1] for k in (1, 3, 8)})


def test_average_precision_hand_computed():
    # relevant at ranks 1 and 3 of 4: precision there is 1 and 2/3
    assert average_precision([True, False, True, False]) == pytest.approx((1 + 2 / 3) / 2)
    # a third relevant item exists in the gallery but the ranking was cut before it: it adds precision 0
    assert average_precision([True, False, True, False], n_relevant=3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision([False, False, True]) == pytest.approx(1 / 3)
    assert np.isnan(average_precision([False, False]))


def test_average_precision_rows_equal_one_ranking_at_a_time():
    rng = np.random.default_rng(1)
    relevant = rng.random((20, 7)) < 0.3
    n_relevant = relevant.sum(axis=1) + rng.integers(0, 3, 20)
    expected = [average_precision(r, n) for r, n in zip(relevant, n_relevant)]
    np.testing.assert_allclose(average_precision(relevant, n_relevant), expected)


def test_n_relevant_below_what_the_ranking_holds_is_an_error():
    with pytest.raises(ValueError, match="n_relevant"):
        average_precision([True, True], n_relevant=1)


def test_mean_average_precision_with_truncation_and_a_query_without_relevant_items():
    queries = np.array(["a", "b", "c"])
    ranked = np.array([["a", "x", "a"], ["x", "b", "x"], ["x", "x", "x"]])
    # gallery holds 3 a's, 1 b, 0 c: a's ranking is cut before its third a; c has nothing to find
    mean_ap, n_without = mean_average_precision(queries, ranked, n_relevant=[3, 1, 0])
    assert n_without == 1
    assert mean_ap == pytest.approx(((1 + 2 / 3) / 3 + 1 / 2) / 2)


def test_mean_average_precision_of_queries_without_relevant_items_only_is_nan():
    mean_ap, n_without = mean_average_precision(np.array(["c"]), np.array([["x", "y"]]))
    assert np.isnan(mean_ap) and n_without == 1


def test_mean_average_precision_equals_sklearn_on_random_scores():
    rng = np.random.default_rng(2)
    gallery = rng.integers(0, 5, 80)
    queries = rng.integers(0, 5, 25)
    scores = rng.random((25, 80))  # continuous: no ties, so the ranking is unique
    ranked = gallery[np.argsort(-scores, axis=1)]
    expected = np.mean([average_precision_score(gallery == q, s) for q, s in zip(queries, scores)])
    mean_ap, n_without = mean_average_precision(queries, ranked)
    assert n_without == 0
    assert mean_ap == pytest.approx(expected, abs=1e-12)


def test_vote_metrics_hand_computed():
    from lib.retrieval.metrics import confusion_table, macro_f1, per_class_report, vote_accuracy

    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", "c", "c"]
    assert vote_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # a: P 1, R 2/3, F1 0.8; b: P 1/2, R 1/2, F1 1/2; c: P 1/2, R 1, F1 2/3
    report = per_class_report(y_true, y_pred)
    np.testing.assert_allclose(report["precision"], [1, 0.5, 0.5])
    np.testing.assert_allclose(report["recall"], [2 / 3, 0.5, 1])
    assert report["support"].tolist() == [3, 2, 1] and report["predicted"].tolist() == [2, 2, 2]
    assert macro_f1(y_true, y_pred) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    cm = confusion_table(y_true, y_pred)
    assert cm.loc["a", "b"] == 1 and cm.loc["b", "c"] == 1 and np.trace(cm.to_numpy()) == 4 and cm.to_numpy().sum() == 6


def test_macro_f1_averages_over_the_classes_with_queries_and_matches_sklearn():
    from sklearn.metrics import f1_score

    from lib.retrieval.metrics import macro_f1

    rng = np.random.default_rng(0)
    y_true = rng.choice(["a", "b", "c"], 200)
    y_pred = rng.choice(["a", "b", "c", "d"], 200)  # 'd': a gallery class that has no queries in this split
    expected = f1_score(y_true, y_pred, labels=["a", "b", "c"], average="macro")
    assert macro_f1(y_true, y_pred) == pytest.approx(expected)
    assert macro_f1(y_true, y_pred) > f1_score(y_true, y_pred, average="macro")  # 'd' (F1 = 0) is not averaged in


def test_identity_balanced_map_weighs_identities_not_photos():
    # identity a: 3 queries with AP 1; identity b: 1 query with AP 0.25; c has no relevant item (NaN: left out)
    labels = ["a", "a", "a", "b", "c"]
    ap = [1.0, 1.0, 1.0, 0.25, float("nan")]
    assert summarize_ap(ap)[0] == pytest.approx((3 + 0.25) / 4)
    assert identity_balanced_map(labels, ap) == pytest.approx((1.0 + 0.25) / 2)
    per = per_identity_ap(labels, ap)
    assert list(per.index) == ["b", "a", "c"]
    assert per.loc["a", "queries"] == 3 and np.isnan(per.loc["c", "ap"]) and per.loc["c", "queries_with_ap"] == 0
    assert np.isnan(identity_balanced_map(["x"], [float("nan")]))
