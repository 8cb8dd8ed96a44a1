"""Open-set metrics against plain-Python recomputations on hand-made examples."""
import itertools

import numpy as np
import pandas as pd
import pytest

from lib.retrieval.open_set import (
    NEW,
    RESHOOT,
    baks,
    baks_baus_by_threshold,
    balanced_new_threshold,
    baus,
    decision_scores,
    harmonic_mean,
    new_vs_known_auroc,
    open_set_answers,
    open_set_report,
)

# individuals a (3 queries), b (1), c (2) are in the gallery; x (2) and y (1) are not
LABELS = ["a", "a", "a", "b", "c", "c", "x", "x", "y"]
ANSWERS = ["a", "b", "a", "b", NEW, "c", NEW, "a", NEW]
UNKNOWN = {"x", "y"}


def brute_balanced(labels, answers, keep, right) -> float:
    """Per individual: hits / queries, over the individuals `keep` accepts; then the plain mean of those."""
    per = {}
    for label, answer in zip(labels, answers):
        if keep(label):
            hits, n = per.get(label, (0, 0))
            per[label] = (hits + right(label, answer), n + 1)
    return sum(h / n for h, n in per.values()) / len(per)


def brute_auroc(positive, score) -> float:
    """Probability that a positive outscores a negative, ties counting one half."""
    pos = [s for p, s in zip(positive, score) if p]
    neg = [s for p, s in zip(positive, score) if not p]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_baks_and_baus_match_a_per_individual_count():
    want_known = brute_balanced(LABELS, ANSWERS, lambda lab: lab not in UNKNOWN, lambda lab, ans: ans == lab)
    want_unknown = brute_balanced(LABELS, ANSWERS, lambda lab: lab in UNKNOWN, lambda lab, ans: ans == NEW)
    # by hand: a 2/3, b 1, c 1/2 -> 13/18; x 1/2, y 1 -> 3/4
    assert want_known == pytest.approx(13 / 18) and want_unknown == pytest.approx(3 / 4)
    # float64 sums of a handful of fractions: agree to rounding
    assert baks(LABELS, ANSWERS, UNKNOWN) == pytest.approx(want_known, rel=1e-12)
    assert baus(LABELS, ANSWERS, UNKNOWN) == pytest.approx(want_unknown, rel=1e-12)
    assert harmonic_mean(13 / 18, 3 / 4) == pytest.approx(2 * (13 / 18) * (3 / 4) / (13 / 18 + 3 / 4), rel=1e-12)
    assert np.isnan(baus(LABELS[:6], ANSWERS[:6], UNKNOWN)) and np.isnan(harmonic_mean(0.5, float("nan")))


def test_auroc_matches_pairwise_counting_with_ties_and_no_neighbour():
    rng = np.random.default_rng(0)
    is_new = rng.random(40) < 0.3
    score = np.round(rng.random(40) + is_new * 0.4, 1)  # rounded: ties happen
    assert new_vs_known_auroc(is_new, score) == pytest.approx(brute_auroc(is_new, score), rel=1e-12)
    score[0] = np.inf  # a query whose context held no photo: farther than anything
    finite_stand_in = np.where(np.isinf(score), 99.0, score)
    assert new_vs_known_auroc(is_new, score) == pytest.approx(brute_auroc(is_new, finite_stand_in), rel=1e-12)
    assert np.isnan(new_vs_known_auroc(np.zeros(5, bool), np.arange(5)))


def test_decision_rule_answers_and_its_coverage_and_accuracy():
    pred = np.array(["a", "a", "b", "b", "c"], dtype=object)
    d = np.array([0.1, 0.9, 0.2, 0.3, 1.5])
    margin = np.array([0.8, 0.9, 0.05, 0.5, 0.0])
    answers = open_set_answers(pred, d, margin, new_threshold=0.8, min_margin=0.1)
    # far first (new), then a close vote (reshoot), else the voted individual
    assert answers.tolist() == ["a", NEW, RESHOOT, "b", NEW]
    labels = ["a", "x", "b", "c", "y"]
    scores = decision_scores(labels, answers, {"x", "y"})
    answered = [i for i, a in enumerate(answers) if a != RESHOOT]
    right = [(answers[i] == NEW) if labels[i] in "xy" else (answers[i] == labels[i]) for i in answered]
    assert scores["coverage"] == len(answered) / 5 and scores["accuracy_answered"] == sum(right) / len(answered)
    assert scores["BAKS"] == pytest.approx(1 / 3, rel=1e-12) and scores["BAUS"] == 1.0  # a right, b reshoot, c wrong
    nobody_new = open_set_answers(pred, d, margin, new_threshold=float("nan"))
    assert NEW not in nobody_new.tolist()


def test_sweep_ends_call_everybody_or_nobody_new():
    d = np.array([0.1, 0.2, 0.7, 0.9])
    sweep = baks_baus_by_threshold(["a", "b", "x", "y"], ["a", "a", "a", "b"], d, {"x", "y"})
    low, high = sweep.iloc[0], sweep.iloc[-1]
    assert low["threshold"] == 0.1 and low["BAUS"] == 1.0 and low["BAKS"] == 0.5  # a kept (right), b called new
    assert high["BAUS"] == 0.0 and high["BAKS"] == 0.5                            # nobody new; b voted a
    assert sweep["BAUS"].is_monotonic_decreasing


def test_report_on_a_tiny_gallery_against_brute_force():
    rng = np.random.default_rng(1)
    gallery_labels = np.array(["a", "a", "b", "b", "c"])
    gallery_emb = rng.normal(size=(5, 8)).astype(np.float32)
    query_labels = np.array(["a", "b", "c", "x", "x", "y"])
    query_emb = rng.normal(size=(6, 8)).astype(np.float32)
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731
    dist = ((unit(query_emb)[:, None] - unit(gallery_emb)[None]) ** 2).sum(-1)
    nearest = dist.argmin(axis=1)
    queries = pd.DataFrame({"label": query_labels, "pred": gallery_labels[nearest], "top1_distance": dist.min(axis=1),
                            "margin": rng.random(6)})
    threshold = float(np.median(queries["top1_distance"]))
    report = open_set_report(queries, gallery_labels, gallery_emb, query_emb, new_threshold=threshold)
    assert report["unknown_individuals"] == ["x", "y"] and report["n_known_queries"] == 3
    is_new = np.isin(query_labels, ["x", "y"])
    # float32 embeddings: the rule's distances and Faiss's agree to ~1e-6, far from any tie here
    assert report["auroc_top1_distance"] == pytest.approx(brute_auroc(is_new, queries["top1_distance"]), rel=1e-12)
    assert report["auroc_margin"] == pytest.approx(brute_auroc(is_new, -queries["margin"]), rel=1e-12)
    answers = [NEW if d > threshold else p for d, p in zip(queries["top1_distance"], queries["pred"])]
    assert report["BAKS"] == pytest.approx(
        brute_balanced(query_labels, answers, lambda lab: lab in "abc", lambda lab, ans: ans == lab), rel=1e-12)
    recall1 = np.mean([gallery_labels[nearest[i]] == query_labels[i] for i in range(3)])
    assert report["known_queries"]["recall@1"] == pytest.approx(recall1, rel=1e-12)


def test_open_set_pass_of_the_demo_writes_its_figures_and_record(demo, tmp_path):
    """run_all's open-set pass (notebooks 01-03 with DEMO_OPEN_SET), shortened: val and test mix known and unknown
    individuals, and each evaluation record carries the open-set figures."""
    import json

    from test_analysis import assert_real_png
    from test_notebooks import run, run_all

    data, _ = demo
    splits, figures, run_dir, results = (tmp_path / n for n in ("splits", "figures", "run", "results"))
    open_set = {**run_all.DEMO_OPEN_SET, "metadata_csv": str(data / "metadata.csv"), "splits_dir": str(splits),
                "run_dir": str(run_dir)}
    pick = lambda name: {k: v for k, v in open_set.items() if k in run_all.papermill.inspect_notebook(  # noqa: E731
        str(run_all.ROOT / "notebooks" / f"{name}.ipynb"))}
    run("01_split", tmp_path, data_dir=str(data), figures_dir=str(figures), **pick("01_split"))
    unknown = json.loads((splits / "unknown_individuals.json").read_text())
    assert unknown["val"] and unknown["test"]
    run("02_train", tmp_path, **{**run_all.DEMO_TRAIN, "epochs": 1, "img_size": 32, "embed_dim": 16},
        data_dir=str(data), batches_per_epoch=2, figures_dir=str(figures), mlflow_uri="", **pick("02_train"))
    run("03_evaluate", tmp_path, results_csv=str(results / "benchmarks.csv"), figures_dir=str(figures), neighbours=5,
        **pick("03_evaluate"))
    for split in ("val", "test"):
        record = json.loads((run_dir / "eval" / split / "metrics.json").read_text())
        o = record["metrics"]["open_set"]
        assert record["metrics"]["protocol"] == "gallery"
        assert o["unknown_individuals"] == unknown[split]
        assert o["n_known_queries"] > 0 and o["n_unknown_queries"] > 0
        assert 0 <= o["BAKS"] <= 1 and 0 <= o["BAUS"] <= 1 and 0 <= o["auroc_top1_distance"] <= 1
        assert_real_png(figures / f"03_open_set_run_{split}.png")
    row = pd.read_csv(results / "benchmarks.csv").iloc[-1]
    assert row["open_set_BAKS"] == pytest.approx(o["BAKS"], rel=1e-9)  # the test split's, written last


def test_chosen_threshold_is_the_sweeps_best_harmonic_mean():
    rng = np.random.default_rng(3)
    labels = np.array([f"k{i % 6}" for i in range(30)] + [f"u{i % 4}" for i in range(20)], dtype=object)
    unknown = {f"u{i}" for i in range(4)}
    d = rng.random(50) + np.isin(labels, list(unknown)) * 0.3
    pred = np.where(rng.random(50) < 0.7, labels, "k0")
    t = balanced_new_threshold(labels, pred, d, unknown)
    # brute force: a cut at every observed distance; the sweep's 101 quantile cuts fall in every gap between the 50
    # distances, so they meet every distinct set of answers too
    best = max(harmonic_mean(baks(labels, a, unknown), baus(labels, a, unknown))
               for a in (open_set_answers(pred, d, np.ones(50), c) for c in np.unique(d)))
    got = decision_scores(labels, open_set_answers(pred, d, np.ones(50), t), unknown)["harmonic_mean"]
    assert got == pytest.approx(best, rel=1e-12)
    assert np.isnan(balanced_new_threshold(labels[:30], pred[:30], d[:30], unknown))
