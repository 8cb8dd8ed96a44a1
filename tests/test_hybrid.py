"""The boosted hybrid scorer and its parts: on constructed pairs the GBM finds a planted feature (highest importance,
better rankings than the cosine); pair and photo features against hand computations; cross-fitting by identity; in
the probe, a hybrid row with its importances, no SIFT when its features need none, and a cache that serves a second
run."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score
from test_probe import assert_fitted_on_the_calibration_split, config

import lib.probe.features
from lib.probe.compare import run_probe
from lib.probe.config import ProbeConfig
from lib.probe.crossfit import cross_fit, identity_halves
from lib.probe.hybrid import HybridScorer, gbm_params
from lib.probe.pair_features import chi2_distance, pair_features
from lib.probe.photo_features import photo_features


def shortlist_mean_ap(scores: np.ndarray, same: np.ndarray) -> float:
    """Mean AP of each query's shortlist ranked by `scores` (queries with a same-identity candidate)."""
    rows = same.any(axis=1)
    return float(np.mean([average_precision_score(y, s) for y, s in zip(same[rows], scores[rows], strict=True)]))


def planted_pairs(seed: int, n_q: int = 150, k: int = 20):
    """Shortlist pairs: a weak cosine, three noise features and a planted one that tells the answer, but only
    through a window (same-identity pairs fall in [0.4, 0.6]): no monotone calibration of it could use it."""
    rng = np.random.default_rng(seed)
    same = rng.random((n_q, k)) < 0.15
    outside = np.where(rng.random((n_q, k)) < 0.5, rng.uniform(0, 0.4, (n_q, k)), rng.uniform(0.6, 1, (n_q, k)))
    planted = np.where(same, rng.uniform(0.4, 0.6, (n_q, k)), outside)
    features = {"cosine": 0.5 * same + rng.normal(size=(n_q, k)), "planted": planted,
                **{f"noise{i}": rng.normal(size=(n_q, k)) for i in range(3)}}
    return features, same


def test_the_gbm_finds_a_planted_feature():
    train, train_same = planted_pairs(0)
    test, test_same = planted_pairs(1)
    scorer = HybridScorer().fit(train, train_same)
    importances = scorer.importances()
    assert importances.index[0] == "planted" and importances.iloc[0] > 0.5
    assert importances.sum() == pytest.approx(1.0)
    cosine_only = shortlist_mean_ap(test["cosine"], test_same)
    boosted = shortlist_mean_ap(scorer.score(test), test_same)
    assert boosted > cosine_only + 0.2
    assert scorer.score(test).shape == test_same.shape


def test_the_scorer_refuses_what_it_cannot_learn_from():
    features, same = planted_pairs(2, n_q=10)
    with pytest.raises(ValueError, match="0 positive"):
        HybridScorer().fit(features, np.zeros_like(same))
    with pytest.raises(ValueError, match="one shape"):
        HybridScorer().fit({"a": np.zeros((10, 20)), "b": np.zeros((10, 5))}, same)
    with pytest.raises(ValueError, match="inf"):
        HybridScorer().fit({**features, "cosine": np.full(same.shape, np.inf)}, same)
    with pytest.raises(ValueError, match="not fitted"):
        HybridScorer().score(features)
    scorer = HybridScorer().fit(features, same)
    with pytest.raises(ValueError, match="not the ones fitted"):
        scorer.score({"cosine": features["cosine"]})
    with pytest.raises(ValueError, match="n_trees_typo"):
        gbm_params({"n_trees_typo": 3})
    with pytest.raises(ValueError, match="n_trees_typo"):
        ProbeConfig(hybrid_params={"n_trees_typo": 3})
    with pytest.raises(ValueError, match="sonar"):
        ProbeConfig(hybrid_features=["cosine", "sonar"])


def test_pair_features_against_hand_computations():
    top = np.array([[1, 0], [0, 2]])
    cos = np.array([[0.9, 0.5], [0.7, 0.6]])
    colour = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    photos = {"colour": colour, "lbp": colour, "hog": np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])}
    queries = {name: v[:2] for name, v in photos.items()}  # the queries are gallery photos 0 and 1
    out = pair_features(top, cos, ["cosine", "colour", "hog", "keypoints", "inliers"], queries, photos,
                        np.array([10, 30]), np.array([10, 30, 50]), np.array([[4.0, 0.0], [9.0, 1.0]]))
    np.testing.assert_allclose(out["cosine_gap"], [[0, 0.4], [0, 0.1]], atol=1e-6)
    # query 0 vs gallery 1: 0.5 * (0.25 / 1.5 + 0.25 / 0.5); query 1 vs gallery 2: 0.5 * (0.25 / 0.5 + 0.25 / 1.5)
    np.testing.assert_allclose(out["colour_chi2"], [[1 / 3, 0], [1 / 3, 1 / 3]], atol=1e-6)
    np.testing.assert_allclose(out["hog_distance"], [[1 - np.sqrt(0.5), 0], [1 - np.sqrt(0.5), 1 - np.sqrt(0.5)]],
                               atol=1e-6)
    np.testing.assert_array_equal(out["keypoints_min"], [[10, 10], [10, 30]])
    np.testing.assert_array_equal(out["keypoints_max"], [[30, 10], [30, 50]])
    assert "lbp_chi2" not in out and all(v.dtype == np.float32 for v in out.values())
    assert chi2_distance(np.zeros(3), np.zeros(3)) == 0
    with pytest.raises(ValueError, match="'inliers' needs"):
        pair_features(top, cos, ["inliers"])
    with pytest.raises(ValueError, match="'colour' needs"):
        pair_features(top, cos, ["colour"])
    with pytest.raises(ValueError, match="sonar"):
        pair_features(top, cos, ["sonar"])
    with pytest.raises(ValueError, match="3 query rows for 2 queries"):
        pair_features(top, cos, ["colour"], photos, photos)


def test_photo_features_see_only_the_foreground():
    red, blue = np.zeros((60, 80, 3), np.uint8), np.zeros((60, 80, 3), np.uint8)
    red[..., 0], blue[..., 2] = 220, 220
    half = np.concatenate([red[:, :40], blue[:, 40:]], axis=1)
    mask = np.zeros((60, 80), bool)
    mask[:, :40] = True
    whole = photo_features(Image.fromarray(red))
    masked = photo_features(Image.fromarray(half), mask)
    assert whole["colour"].max() == pytest.approx(1.0)  # one colour: one bin
    np.testing.assert_allclose(masked["colour"], whole["colour"])
    assert photo_features(Image.fromarray(half))["colour"].max() == pytest.approx(0.5)
    assert whole["lbp"].sum() == pytest.approx(1.0) and len(whole["lbp"]) == 10
    assert not whole["hog"].any() and len(whole["hog"]) == 324  # a flat photo has no gradients
    # a mask with no foreground left after scaling falls back to the whole photo
    empty = np.zeros((60, 80), bool)
    np.testing.assert_allclose(photo_features(Image.fromarray(red), empty)["colour"], whole["colour"])
    with pytest.raises(ValueError, match="does not match"):
        photo_features(Image.fromarray(red), mask[:, :10])


def test_cross_fitting_never_fits_on_the_identity_it_scores():
    labels = np.array(list("aabbbccdde"))
    fitted_on = []
    models = cross_fit(labels, lambda rows: fitted_on.append(set(labels[rows])) or len(fitted_on) - 1)
    half = identity_halves(labels)
    for i, label in enumerate(labels):
        assert label not in fitted_on[models.models[half[i]]]
    assert models.apply(np.arange(len(labels)), lambda m, rows: np.full(len(rows), m)).tolist() == half.tolist()


def test_the_hybrid_in_the_probe(demo, run_dir, tmp_path, monkeypatch):
    cfg = config(demo, run_dir, tmp_path / "cache", methods=["global", "hybrid"])
    first, rankings = run_probe(cfg)
    assert first["method"].tolist() == ["global", "hybrid"] and not first["features_cached"].any()
    hybrid = first.set_index("method").loc["hybrid"]
    importance = json.loads(hybrid["importance"])
    assert set(importance) == {"cosine", "cosine_gap", "colour_chi2", "lbp_chi2", "hog_distance", "keypoints_min",
                               "keypoints_max", "inliers"}
    assert sum(importance.values()) == pytest.approx(1.0, abs=1e-3)
    assert hybrid["ms_per_query"] > first.set_index("method").loc["global", "ms_per_query"]
    assert len(rankings["run", "hybrid"]) == hybrid["n_queries"]

    def fail(*a, **k):
        raise AssertionError("recomputed a cached feature")
    monkeypatch.setattr(lib.probe.features, "photo_features", fail)
    monkeypatch.setattr(lib.probe.features, "sift_features", fail)
    second, _ = run_probe(cfg)
    assert second["features_cached"].all()
    pd.testing.assert_frame_equal(second[["mAP", "recall@1"]], first[["mAP", "recall@1"]])


def test_a_hybrid_without_sift_features_computes_none(demo, run_dir, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("SIFT computed for a hybrid that does not use it")
    monkeypatch.setattr(lib.probe.features, "sift_features", fail)
    table, _ = run_probe(config(demo, run_dir, tmp_path / "cache", methods=["hybrid"],
                                hybrid_features=["cosine", "colour"]))
    assert set(json.loads(table["importance"].iloc[0])) == {"cosine", "cosine_gap", "colour_chi2"}


def test_the_hybrid_fitted_on_another_split(demo, run_dir, tmp_path, monkeypatch):
    assert_fitted_on_the_calibration_split(demo, run_dir, tmp_path, monkeypatch, HybridScorer, ["hybrid"])
