import numpy as np
import pytest

from lib.probe.fusion import ScoreFusion


def calibration_pairs(n: int = 2000, seed: int = 0):
    """Pairs with a known answer: 'cosine' in [-1, 1] and 'inliers' in 0..200, both higher for same identity."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.3
    cosine = np.clip(np.where(same, 0.6, 0.1) + 0.2 * rng.normal(size=n), -1, 1)
    inliers = np.clip(np.where(same, 80, 10) + 30 * rng.normal(size=n), 0, 200).round()
    return {"cosine": cosine, "inliers": inliers}, same


def test_calibrated_scores_are_monotone_probabilities_that_keep_their_shape():
    scores, same = calibration_pairs()
    fusion = ScoreFusion().fit(scores, same)
    grid = {"cosine": np.linspace(-3, 3, 603).reshape(3, 201), "inliers": np.linspace(-50, 400, 603).reshape(201, 3)}
    calibrated = fusion.calibrated(grid)
    for name, p in calibrated.items():
        assert p.shape == grid[name].shape
        assert ((p >= 0) & (p <= 1)).all()
        assert (np.diff(p.ravel()) >= 0).all()
        assert p.ravel()[0] < 0.1 and p.ravel()[-1] > 0.9  # clipped beyond the seen range, not extrapolated


def test_scores_on_different_scales_become_comparable():
    scores, same = calibration_pairs()
    fusion = ScoreFusion().fit(scores, same)
    held_out, held_same = calibration_pairs(seed=1)
    calibrated = fusion.calibrated(held_out)
    for p in calibrated.values():
        # both mean P(same): high for same-identity pairs and low for the others, on one scale
        assert np.median(p[held_same]) > 0.6 and np.median(p[~held_same]) < 0.2
    # the raw mean follows the inlier count alone; the fused score lets a strong cosine outweigh a few inliers
    pairs = {"cosine": np.array([0.9, 0.0]), "inliers": np.array([40.0, 60.0])}
    fused = fusion.fuse(pairs)
    assert fused[0] > fused[1]
    one = fusion.calibrated(pairs)
    np.testing.assert_allclose(fused, (one["cosine"] + one["inliers"]) / 2)


def test_a_separating_score_fused_with_noise_still_ranks_positives_first():
    rng = np.random.default_rng(2)
    same = rng.random(2000) < 0.5
    fusion = ScoreFusion().fit({"a": np.where(same, rng.uniform(0.6, 1, 2000), rng.uniform(0, 0.4, 2000)),
                                "b": rng.normal(size=2000)}, same)
    noise = rng.normal(size=(2, 50)).clip(-1.5, 1.5)  # inside the bulk where the noise calibrates near 0.5
    fused = fusion.fuse({"a": np.stack([rng.uniform(0.6, 1, 50), rng.uniform(0, 0.4, 50)]), "b": noise})
    assert fused[0].min() > fused[1].max()


def test_fit_needs_both_classes_and_matching_shapes():
    with pytest.raises(ValueError, match="5 positive and 0 negative"):
        ScoreFusion().fit({"a": np.arange(5.0)}, np.ones(5, bool))
    with pytest.raises(ValueError, match="0 positive and 3 negative"):
        ScoreFusion().fit({"a": np.arange(3.0)}, np.zeros(3, bool))
    with pytest.raises(ValueError, match="'a'"):
        ScoreFusion().fit({"a": np.arange(3.0)}, np.array([True, False]))


def test_unknown_or_missing_score_names_are_errors_naming_them():
    fusion = ScoreFusion().fit({"cosine": np.array([0.1, 0.9]), "inliers": np.array([1.0, 50.0])},
                               np.array([False, True]))
    with pytest.raises(ValueError, match="'colour'"):
        fusion.fuse({"cosine": np.ones(2), "inliers": np.ones(2), "colour": np.ones(2)})
    with pytest.raises(ValueError, match="'colour'"):
        fusion.calibrated({"colour": np.ones(2)})
    with pytest.raises(ValueError, match="inliers"):
        fusion.fuse({"cosine": np.ones(2)})
