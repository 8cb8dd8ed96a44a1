"""The batched matcher (one matrix product of a query against its whole shortlist) against an independent pair-by-pair
computation, its geometry on a known warp, and the SIFT feature cache and pool it reads from."""
import threading

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_local_match import textured

from lib.probe import features, local_match
from lib.probe.features import sift_table
from lib.probe.local_match import SiftConfig, query_inliers, shortlist_matches, sift_features


def brute_force_matches(query: np.ndarray, photo: np.ndarray, ratio: float) -> set:
    """Mutual nearest neighbours passing the ratio test, one pair of photos at a time, in float64 loops."""
    def root(d):
        d = d.astype(np.float64)
        return np.array([np.sqrt(row / row.sum()) if row.sum() > 0 else row for row in d])

    q, g = root(query), root(photo)
    if len(q) == 0 or len(g) < 2:
        return set()
    dist = np.array([[np.linalg.norm(a - b) for b in g] for a in q])
    found = set()
    for i in range(len(q)):
        j, second = np.argsort(dist[i], kind="stable")[:2]
        if dist[i, j] < ratio * dist[i, second] and np.argmin(dist[:, j]) == i:
            found.add((i, int(j)))
    return found


@pytest.mark.parametrize("ratio", [0.8, 0.95])
def test_batched_matches_equal_pair_by_pair_brute_force(ratio):
    rng = np.random.default_rng(0)
    query = rng.integers(0, 256, (60, 128)).astype(np.float32)
    # photos of every size the padding must handle, some sharing noisy copies of query descriptors (true matches)
    gallery = [rng.integers(0, 256, (n, 128)).astype(np.float32) for n in (0, 1, 2, 37, 80, 5)]
    for k in (3, 4, 5):
        picked = rng.choice(len(query), min(25, len(gallery[k])), replace=False)
        gallery[k][: len(picked)] = np.clip(query[picked] + rng.normal(0, 12, (len(picked), 128)), 0, 255).round()
    got = shortlist_matches(query, gallery, ratio)
    assert len(got) == len(gallery)
    for k, photo in enumerate(gallery):
        assert got[k].shape[1] == 2
        assert {tuple(map(int, m)) for m in got[k]} == brute_force_matches(query, photo, ratio), f"photo {k}"
    assert min(len(got[k]) for k in (3, 4, 5)) >= 5  # the planted copies were found
    assert shortlist_matches(query[:0], gallery, ratio)[3].shape == (0, 2)
    # a shortlist too large for one step is matched a few photos at a time, to the same matches
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_match, "MAX_SIMS", len(query) * 80 * 2)
        for a, b in zip(shortlist_matches(query, gallery, ratio), got):
            np.testing.assert_array_equal(a, b)


def test_synthetic_warp_inliers_are_the_known_homography():
    image = textured(0, size=(320, 320))
    homography = np.array([[0.9, 0.15, 20], [-0.1, 0.95, 30], [0.0002, 0.0001, 1]])
    warped = Image.fromarray(cv2.warpPerspective(np.asarray(image), homography, (320, 320), borderValue=(128,) * 3))
    cfg = SiftConfig(max_side=320)
    (pts_a, desc_a), (pts_b, desc_b) = sift_features(image, cfg), sift_features(warped, cfg)
    matches = shortlist_matches(desc_a, [desc_b], cfg.ratio)[0]
    projected = cv2.perspectiveTransform(pts_a[matches[:, 0]].reshape(-1, 1, 2).astype(np.float64), homography)
    true = np.linalg.norm(projected.reshape(-1, 2) - pts_b[matches[:, 1]], axis=1) < cfg.ransac_px
    assert true.sum() >= 40 and true.mean() >= 0.8, (true.sum(), len(true))
    inliers, unrelated = query_inliers((pts_a, desc_a), [(pts_b, desc_b), sift_features(textured(1, (320, 320)), cfg)],
                                       cfg)
    # USAC's consensus holds the matches the known warp explains (a few chance agreements aside), and an unrelated
    # photo keeps a handful
    assert abs(inliers - true.sum()) <= max(3, 0.1 * true.sum()), (inliers, true.sum())
    assert unrelated <= 12 and inliers >= 5 * max(unrelated, 1)


def photo_rows(folder, n=3):
    paths = []
    for i in range(n):
        textured(i, size=(300, 240)).save(folder / f"p{i}.jpg", quality=95)
        paths.append(f"p{i}.jpg")
    return pd.DataFrame({"path": paths})


def test_sift_cache_round_trip_and_a_changed_photo_is_extracted_again(tmp_path, monkeypatch):
    rows, cfg = photo_rows(tmp_path), SiftConfig(max_side=256)
    first, info = sift_table(rows, tmp_path, cfg, cache_dir=tmp_path / "cache")
    assert info["computed"] == 3 and not info["cached"]
    extracted = []
    real = local_match.sift_features
    monkeypatch.setattr(features, "sift_features", lambda *a, **k: extracted.append(1) or real(*a, **k))
    again, info = sift_table(rows, tmp_path, cfg, cache_dir=tmp_path / "cache")
    assert extracted == [] and info["cached"] and info["computed"] == 0
    for (k1, d1), (k2, d2) in zip(first, again):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(d1, d2)
    textured(7, size=(300, 240)).save(tmp_path / "p1.jpg", quality=95)  # the photo is replaced
    changed, info = sift_table(rows, tmp_path, cfg, cache_dir=tmp_path / "cache")
    assert len(extracted) == 1 and info["computed"] == 1
    fresh = sift_features(Image.open(tmp_path / "p1.jpg").convert("RGB"), cfg)
    np.testing.assert_array_equal(changed[1][0], fresh[0])
    # other extraction settings are other cache entries
    _, info = sift_table(rows, tmp_path, SiftConfig(max_side=200), cache_dir=tmp_path / "cache")
    assert info["computed"] == 3


def test_extraction_runs_on_two_workers_at_once_and_keeps_the_order(tmp_path, monkeypatch):
    rows, cfg = photo_rows(tmp_path, n=4), SiftConfig(max_side=256)
    expected, _ = sift_table(rows, tmp_path, cfg)
    both_in = threading.Barrier(2, timeout=10)  # passes only when two extractions run at the same time
    real = local_match.sift_features

    def meeting(*args, **kwargs):
        both_in.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(local_match, "usable_cpus", lambda: 2)
    monkeypatch.setattr(features, "sift_features", meeting)
    got, _ = sift_table(rows, tmp_path, cfg)
    for (k1, d1), (k2, d2) in zip(expected, got):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(d1, d2)
