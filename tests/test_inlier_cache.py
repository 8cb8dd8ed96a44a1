import numpy as np
import pytest
from PIL import Image
from test_local_match import rotated_crop, textured

from lib.probe import local_match
from lib.probe.features import inlier_table
from lib.probe.local_match import SiftConfig, shortlist_inliers, sift_features


@pytest.fixture(scope="module")
def feats():
    base = textured(0)
    views = [base, rotated_crop(base), textured(1), base.rotate(10), Image.new("RGB", (64, 64))]
    return [sift_features(im) for im in views]


def counting(monkeypatch):
    """Replaces query_inliers (what every match goes through: a query against the photos it is matched with) by a
    wrapper that records a 1 per pair matched."""
    calls, real = [], local_match.query_inliers
    monkeypatch.setattr(local_match, "query_inliers", lambda q, gallery, *a: calls.extend([1] * len(gallery))
                        or real(q, gallery, *a))
    return calls


def test_second_run_matches_nothing_and_gives_the_same_counts(feats, tmp_path, monkeypatch):
    candidates = np.array([[1, 2, 3], [0, 3, 4], [0, 1, 4]])
    expected = shortlist_inliers(feats[:3], feats, candidates)
    calls = counting(monkeypatch)
    first, info = inlier_table(feats[:3], feats, candidates, SiftConfig(), tmp_path, workers=2)
    assert len(calls) == info["matched"] == info["pairs"] == 9
    calls.clear()
    again, info = inlier_table(feats[:3], feats, candidates, SiftConfig(), tmp_path, workers=2)
    assert calls == [] and info["matched"] == 0 and info["pairs"] == 9
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(again, expected)


def test_cache_is_keyed_by_features_and_matching_settings(feats, tmp_path, monkeypatch):
    inlier_table(feats[:2], feats, np.array([[1, 2], [0, 3]]), SiftConfig(), tmp_path)
    calls = counting(monkeypatch)
    # The same photos in other rows and with uint8 descriptors (the probe's store): found, not matched again.
    as_uint8 = [(k, d.astype(np.uint8)) for k, d in feats]
    _, info = inlier_table([as_uint8[1]], [as_uint8[3], as_uint8[0]], np.array([[1, 0]]), SiftConfig(), tmp_path)
    assert calls == [] and info["matched"] == 0
    # A new pair, or another matching setting, is matched; a pair twice in one shortlist, once.
    _, info = inlier_table([feats[0]], feats, np.array([[1, 4, 4]]), SiftConfig(), tmp_path)
    assert (info["pairs"], info["matched"], len(calls)) == (3, 1, 1)
    cfg = SiftConfig(ratio=0.7)
    got, info = inlier_table([feats[0]], feats, np.array([[1, 2]]), cfg, tmp_path)
    assert info["matched"] == 2
    np.testing.assert_array_equal(got, shortlist_inliers([feats[0]], feats, np.array([[1, 2]]), cfg))


def test_no_cache_dir_matches_every_pair(feats):
    got, info = inlier_table(feats[:2], feats, np.array([[1, 2], [0, 1]]), SiftConfig())
    assert info["matched"] == 4
    np.testing.assert_array_equal(got, shortlist_inliers(feats[:2], feats, np.array([[1, 2], [0, 1]])))
    with pytest.raises(ValueError, match="candidates"):
        inlier_table(feats[:2], feats, np.array([[1, 2]]), SiftConfig())
