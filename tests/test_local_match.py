import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from lib.probe.local_match import SiftConfig, count_inliers, shortlist_inliers, sift_features


def textured(seed, size=(256, 256)):
    """Grey image of random rectangles, ellipses and lines in many grey levels: plenty of SIFT corners."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("L", size, int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(img)
    for _ in range(120):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(5, w // 4)), y0 + int(rng.integers(5, h // 4))
        grey = int(rng.integers(0, 256))
        shape = rng.integers(3)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=grey)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=grey)
        else:
            draw.line((x0, y0, x1, y1), fill=grey, width=int(rng.integers(1, 4)))
    return img.filter(ImageFilter.GaussianBlur(0.8)).convert("RGB")


@pytest.fixture(scope="module")
def base():
    return textured(0)


def rotated_crop(img):
    """20 degrees rotated (canvas expanded), then cropped back to the middle: a new view of the same scene."""
    r = img.rotate(20, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    w, h = r.size
    return r.crop((w // 8, h // 8, w - w // 8, h - h // 8))


@pytest.mark.parametrize("geometry", ["homography", "affine"])
def test_rotated_copy_beats_unrelated_image(base, geometry):
    cfg = SiftConfig(geometry=geometry)
    q = sift_features(base, cfg)
    rotated = count_inliers(q, sift_features(rotated_crop(base), cfg), cfg)
    unrelated = count_inliers(q, sift_features(textured(1), cfg), cfg)
    assert rotated >= 30 and rotated >= 5 * max(unrelated, 1), (rotated, unrelated)


def test_unrelated_images_score_few_inliers(base):
    q = sift_features(base)
    # Before matches were made one-to-one, seed 1 scored 24: a degenerate homography piled matches on one point.
    assert max(count_inliers(q, sift_features(textured(s))) for s in (1, 2, 3)) <= 12


def test_matches_are_one_to_one():
    rng = np.random.default_rng(0)
    desc = rng.random((2, 128)).astype(np.float32)
    a = (rng.random((10, 2)).astype(np.float32) * 100, np.repeat(desc[:1], 10, axis=0))
    b = (np.array([[50, 50], [10, 10]], np.float32), desc)
    # All ten of a's keypoints pick b's first one; one-to-one leaves one match, too few for any geometry.
    assert count_inliers(a, b) == 0
    assert count_inliers(a, b, SiftConfig(geometry="affine")) == 0


def test_self_match_and_flat_image(base):
    f = sift_features(base)
    assert len(f[0]) > 100 and f[1].shape == (len(f[0]), 128) and f[0].dtype == f[1].dtype == np.float32
    assert count_inliers(f, f) >= 0.8 * len(f[0])
    flat = sift_features(Image.new("RGB", (200, 150), (128, 128, 128)))
    assert flat[0].shape == (0, 2) and flat[1].shape == (0, 128)
    assert count_inliers(flat, f) == 0 and count_inliers(f, flat) == 0 and count_inliers(flat, flat) == 0


def test_mask_restricts_keypoints(base):
    mask = np.zeros((256, 256), bool)
    mask[:, :128] = True
    pts, _ = sift_features(base, mask=mask)
    assert len(pts) > 20 and pts[:, 0].max() <= 128 + 2
    # The mask is scaled along with the image: still the left half after a 2x downscale.
    big = base.resize((512, 512), Image.BICUBIC)
    big_mask = np.zeros((512, 512), bool)
    big_mask[:, :256] = True
    pts, _ = sift_features(big, SiftConfig(max_side=256), mask=big_mask)
    assert len(pts) > 20 and pts[:, 0].max() <= 128 + 2
    with pytest.raises(ValueError, match="mask shape"):
        sift_features(base, mask=mask[:100])


def test_large_image_is_scaled_to_max_side():
    img = textured(2, size=(2000, 1500))
    pts, _ = sift_features(img, SiftConfig(max_side=400))
    assert len(pts) > 20
    assert pts[:, 0].max() < 400 and pts[:, 1].max() < 300
    # A small image is never scaled up.
    pts, _ = sift_features(textured(3, size=(100, 80)), SiftConfig(max_side=400))
    assert pts[:, 0].max() < 100 and pts[:, 1].max() < 80


def test_shortlist_inliers_matches_pairwise_counts(base):
    queries = [sift_features(im) for im in (base, rotated_crop(base))]
    gallery = [sift_features(im) for im in (textured(1), base, Image.new("RGB", (64, 64)), rotated_crop(base))]
    candidates = np.array([[1, 0, 2], [3, 1, 0]])
    scores = shortlist_inliers(queries, gallery, candidates)
    assert scores.shape == (2, 3) and scores.dtype == np.float32
    expected = [[count_inliers(queries[i], gallery[g]) for g in row] for i, row in enumerate(candidates)]
    np.testing.assert_array_equal(scores, np.array(expected, np.float32))
    assert scores[0, 0] > scores[0, 1] and scores[0, 2] == 0
    with pytest.raises(ValueError, match="candidates"):
        shortlist_inliers(queries, gallery, candidates[:1])


@pytest.mark.parametrize("kwargs, bad", [({"ratio": 1.5}, "1.5"), ({"geometry": "bogus"}, "bogus"),
                                         ({"ratio": 0.0}, "0.0"), ({"ransac_px": -1.0}, "-1.0")])
def test_bad_config_raises_naming_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        SiftConfig(**kwargs)


def test_counts_are_deterministic(base):
    other = rotated_crop(base)
    for geometry in ("homography", "affine"):
        cfg = SiftConfig(geometry=geometry, ransac_px=2.0)
        runs = [count_inliers(sift_features(base, cfg), sift_features(other, cfg), cfg) for _ in range(3)]
        assert runs[0] > 0 and len(set(runs)) == 1, runs


def test_uint8_descriptors_match_like_float32():
    """The probe keeps descriptors as uint8 (SIFT's are whole numbers 0..255): the counts must not change."""
    a, b = sift_features(textured(0)), sift_features(textured(0).rotate(20, expand=True))
    as_uint8 = lambda f: (f[0], f[1].astype(np.uint8))  # noqa: E731
    assert np.array_equal(a[1], a[1].astype(np.uint8)), "SIFT descriptors are whole numbers 0..255"
    n = count_inliers(a, b)
    assert n > 30 and count_inliers(as_uint8(a), as_uint8(b)) == n == count_inliers(as_uint8(a), b)


def test_counts_do_not_depend_on_the_number_of_workers(base):
    """Pairs matched in a thread pool get the very counts of one-at-a-time matching, in the shortlist's order."""
    views = [base, rotated_crop(base), textured(1), textured(2), base.rotate(10), Image.new("RGB", (64, 64))]
    feats = [sift_features(im) for im in views]
    candidates = np.array([[1, 2, 3, 4, 5, 0], [0, 4, 3, 5, 1, 2], [5, 0, 1, 2, 3, 4]])
    for geometry in ("homography", "affine"):
        cfg = SiftConfig(geometry=geometry)
        expected = np.array([[count_inliers(feats[i], feats[g], cfg) for g in row] for i, row in enumerate(candidates)])
        for workers in (1, 2, 4):
            got = shortlist_inliers(feats[:3], feats, candidates, cfg, workers=workers)
            np.testing.assert_array_equal(got, expected, err_msg=f"{geometry}, {workers} workers")
        assert expected[0, 0] > 30 and expected[2, 0] == 0
