"""Classification metrics (lib.evaluate.classification) against independent, by-hand computations."""
import itertools

import numpy as np
import pandas as pd
import pytest

from lib.evaluate.classification import classification_metrics, best_f1_threshold, classification_table


def _scores(n: int, classes: list[str], seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(classes, n)
    raw = rng.random((n, len(classes))) + 0.6 * (labels[:, None] == np.array(classes)[None])
    raw = np.round(raw, 1)  # ties, which AUROC counts as half a pair
    return labels, pd.DataFrame(raw / raw.sum(axis=1, keepdims=True), columns=classes)


def _auroc_by_pairs(positive: np.ndarray, score: np.ndarray) -> float:
    pairs = [(p, q) for p, q in itertools.product(score[positive], score[~positive])]
    return sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def test_accuracy_macro_f1_and_auroc_agree_with_counting():
    classes = ["a", "b", "c"]
    labels, scores = _scores(60, classes, seed=1)
    m = classification_metrics(labels, scores)
    pred = np.array(classes)[scores.to_numpy().argmax(axis=1)]
    assert m["accuracy"] == pytest.approx(np.mean(pred == labels))
    by_hand = [_f1(np.sum((pred == c) & (labels == c)), np.sum((pred == c) & (labels != c)),
                   np.sum((pred != c) & (labels == c))) for c in classes]
    assert m["macro_f1"] == pytest.approx(np.mean(by_hand))
    for c in classes:
        assert m["auroc"][c] == pytest.approx(_auroc_by_pairs(labels == c, scores[c].to_numpy()))
    assert m["macro_auroc"] == pytest.approx(np.mean([m["auroc"][c] for c in classes]))


def test_a_class_without_queries_has_no_auroc_and_does_not_count_in_the_mean():
    labels, scores = _scores(30, ["a", "b"], seed=2)
    scores["c"] = 0.0
    m = classification_metrics(labels, scores)
    assert np.isnan(m["auroc"]["c"])
    assert m["macro_auroc"] == pytest.approx((m["auroc"]["a"] + m["auroc"]["b"]) / 2)


def test_threshold_sweep_finds_the_best_f1_of_every_threshold():
    labels, scores = _scores(80, ["neg", "pos"], seed=3)
    sweep = classification_metrics(labels, scores, pos_class="pos")["sweep"]
    positive, score = labels == "pos", scores["pos"].to_numpy()
    best = max((_f1(np.sum(score[positive] >= t), np.sum(score[~positive] >= t), np.sum(score[positive] < t)), t)
               for t in np.unique(score))
    assert sweep["f1"] == pytest.approx(best[0])
    called = score >= sweep["threshold"]
    assert sweep["precision"] == pytest.approx(np.mean(positive[called]))
    assert sweep["recall"] == pytest.approx(np.mean(called[positive]))
    assert sweep["auroc"] == pytest.approx(_auroc_by_pairs(positive, score)) and not sweep["flipped"]


def test_a_score_ranking_the_classes_the_wrong_way_round_is_flipped():
    labels, scores = _scores(80, ["neg", "pos"], seed=4)
    positive, score = labels == "pos", scores["pos"].to_numpy()
    right = best_f1_threshold(positive, score)
    wrong = best_f1_threshold(positive, 1.0 - score)
    assert wrong["flipped"] and not right["flipped"]
    assert wrong["auroc"] == pytest.approx(right["auroc"]) and wrong["auroc"] > 0.5
    assert wrong["f1"] == pytest.approx(right["f1"])


def test_bad_pos_class_and_one_sided_sweeps_are_refused_with_a_clear_message():
    labels, scores = _scores(20, ["neg", "pos"], seed=5)
    with pytest.raises(ValueError, match=r"pos_class='hybrid' is not among the classes \['neg', 'pos'\]"):
        classification_metrics(labels, scores, pos_class="hybrid")
    labels3, scores3 = _scores(20, ["a", "b", "c"], seed=5)
    with pytest.raises(ValueError, match="two classes"):
        classification_metrics(labels3, scores3, pos_class="a")
    with pytest.raises(ValueError, match="both classes"):
        best_f1_threshold(np.ones(5, bool), np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="labels but"):
        classification_metrics(labels[:3], scores)


def test_table_has_one_row_per_score_source():
    labels, scores = _scores(30, ["neg", "pos"], seed=6)
    found = {s: classification_metrics(labels, scores, pos_class="pos") for s in ("votes", "softmax")}
    table = classification_table(found)
    assert list(table.index) == ["votes", "softmax"]
    assert {"accuracy", "macro_f1", "macro_auroc", "threshold", "precision", "recall", "flipped"} <= set(table.columns)
