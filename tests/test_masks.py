"""Background masks: polygons, RLE and mask images decoded and fitted, painted out, keyed, and named when bad."""
import json
import os

import numpy as np
import pandas as pd
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import ExifTags, Image, ImageDraw
from torchvision import transforms

from lib.core.errors import DataError
from lib.data.masks import MaskedDataset, apply_mask, decode_mask, masks_fingerprint, mean_fill

W, H = 64, 48
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WHERE = "metadata row 17 (lion/abc_1.jpg)"


def drawn(points, size=(W, H)) -> np.ndarray:
    """An independent rasterisation of one polygon (PIL's), to compare pycocotools' against."""
    canvas = Image.new("L", size, 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=1)
    return np.asarray(canvas) > 0


def noisy(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize("points", [
    [(10, 5), (40, 5), (40, 30), (10, 30)],  # rectangle
    [(5, 40), (32, 4), (60, 44)],  # triangle
])
def test_polygon_forms_match_an_independent_rasterisation(points):
    expected = drawn(points)
    flat = json.dumps([[c for p in points for c in p]])
    paired = json.dumps([list(p) for p in points])
    for value in (flat, paired, json.loads(flat)):
        mask = decode_mask(value, (W, H))
        assert mask.shape == (H, W) and mask.dtype == bool
        # The two rasterisers disagree only about pixels the outline crosses.
        assert (mask ^ expected).sum() <= 0.1 * expected.sum()
        assert (mask & expected).sum() >= 0.9 * expected.sum()


def test_polygon_parts_are_joined():
    left, right = [[2, 2, 20, 2, 20, 20, 2, 20]], [[40, 10, 60, 10, 60, 40, 40, 40]]
    both = decode_mask(json.dumps(left + right), (W, H))
    assert np.array_equal(both, decode_mask(left, (W, H)) | decode_mask(right, (W, H)))


def test_compressed_rle_decodes_exactly():
    truth = np.random.default_rng(0).random((H, W)) < 0.4
    rle = mask_utils.encode(np.asfortranarray(truth.astype(np.uint8)))
    text = json.dumps({"size": rle["size"], "counts": rle["counts"].decode()})
    assert np.array_equal(decode_mask(text, (W, H)), truth)
    assert np.array_equal(decode_mask(json.loads(text), (W, H)), truth)


def test_uncompressed_rle_decodes_to_the_drawn_mask():
    drawn_mask = np.array([[0, 1, 1, 0],
                           [0, 1, 0, 0],
                           [1, 1, 0, 0]], dtype=bool)
    # Column-major: 0 0 1 | 1 1 1 | 1 0 0 | 0 0 0 -> runs of 2 zeros, 5 ones, 5 zeros.
    value = {"size": [3, 4], "counts": [2, 5, 5]}
    assert np.array_equal(decode_mask(value, (4, 3)), drawn_mask)


def test_rle_of_another_scale_is_resized():
    small = np.zeros((12, 16), dtype=np.uint8)
    small[3:9, 4:12] = 1
    rle = mask_utils.encode(np.asfortranarray(small))
    value = {"size": rle["size"], "counts": rle["counts"].decode()}
    assert np.array_equal(decode_mask(value, (W, H)), np.kron(small, np.ones((4, 4), dtype=np.uint8)) > 0)


def test_mask_image_of_half_size_is_resized(tmp_path):
    small = np.zeros((H // 2, W // 2), dtype=np.uint8)
    small[6:18, 8:24] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(small).save(tmp_path / "masks" / "a.png")
    mask = decode_mask("masks/a.png", (W, H), data_root=tmp_path)
    assert np.array_equal(mask, np.kron(small, np.ones((2, 2), dtype=np.uint8)) > 0)
    # An absolute path ignores data_root.
    assert np.array_equal(decode_mask(str(tmp_path / "masks" / "a.png"), (W, H), data_root="/elsewhere"), mask)


def test_mask_image_follows_exif_orientation(tmp_path):
    stored = np.zeros((W, H), dtype=np.uint8)  # stored upright-rotated: H wide, W tall
    stored[:10, :] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # displayed turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "m.png", exif=exif)
    mask = decode_mask("m.png", (W, H), data_root=tmp_path)
    assert mask.shape == (H, W)
    assert mask[:, -10:].all() and not mask[:, :-10].any()


def test_mask_image_with_alpha_uses_alpha(tmp_path):
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., :3] = 200  # colour everywhere; only the alpha tells the cut-out
    rgba[10:20, 10:30, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    mask = decode_mask("cut.png", (W, H), data_root=tmp_path)
    assert mask.sum() == 10 * 20 and mask[10:20, 10:30].all()


def test_mask_image_of_another_aspect_names_the_file(tmp_path):
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(tmp_path / "square.png")
    with pytest.raises(DataError, match=r"metadata row 17 .*square\.png.*32x32.*64x48"):
        decode_mask("square.png", (W, H), data_root=tmp_path, where=WHERE)


@pytest.mark.parametrize("value", ["", "   ", None, float("nan"), np.nan, pd.NA])
def test_empty_values_mean_no_mask(value):
    assert decode_mask(value, (W, H)) is None


@pytest.mark.parametrize("value, problem", [
    ("[[1, 2, 3", "not valid JSON"),
    ("[[0, 0, 5, 5]]", "2 points"),
    ("[[0, 0], [5, 5]]", "2 points"),
    ('{"counts": "abc"}', "'size' and 'counts'"),
    ('{"size": [3, 4], "counts": [2, 5]}', "sum to 7"),
    ("missing.png", "missing.png not found"),
    ("[[100, 100, 120, 100, 120, 120]]", "no foreground"),  # wholly outside the photo
    ("[]", "empty"),
])
def test_bad_values_are_data_errors_naming_where(value, problem):
    with pytest.raises(DataError) as e:
        decode_mask(value, (W, H), where=WHERE)
    assert str(e.value).startswith(WHERE + ": ") and problem in str(e.value)


def test_all_background_mask_image_is_an_error(tmp_path):
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(DataError, match=r"metadata row 17 .*black\.png has no foreground"):
        decode_mask("black.png", (W, H), data_root=tmp_path, where=WHERE)


def test_unreadable_mask_image_is_an_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"metadata row 17 .*bad\.png cannot be read"):
        decode_mask("bad.png", (W, H), data_root=tmp_path, where=WHERE)


def test_apply_mask_paints_only_the_background():
    pixels = noisy(0)
    mask = np.zeros((H, W), dtype=bool)
    mask[10:30, 20:50] = True
    image = Image.fromarray(pixels)
    out = np.asarray(apply_mask(image, mask, (1, 2, 3)))
    assert np.array_equal(out[mask], pixels[mask])
    assert (out[~mask] == (1, 2, 3)).all()
    assert np.array_equal(np.asarray(image), pixels)  # the input is left as it was
    assert apply_mask(image, None, (1, 2, 3)) is image


def test_apply_mask_rejects_another_size():
    with pytest.raises(ValueError, match="32x16.*64x48"):
        apply_mask(Image.fromarray(noisy(0)), np.ones((16, 32), dtype=bool), (0, 0, 0))


def test_mean_fill():
    assert mean_fill(MEAN) == (124, 116, 104)
    assert mean_fill([0.0, 0.5, 1.0]) == (0, 128, 255)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mean_fill((124, 116, 104))


def test_masks_fingerprint_follows_every_mask():
    values = ["[[0, 0, 5, 0, 5, 5]]", None, "masks/a.png"]
    base = masks_fingerprint(values)
    assert len(base) == 64 and base == masks_fingerprint(list(values))
    assert masks_fingerprint(["[[0, 0, 5, 0, 5, 6]]", None, "masks/a.png"]) != base
    assert masks_fingerprint(values[::-1]) != base
    assert masks_fingerprint(["[[0, 0, 5, 0, 5, 5]]", float("nan"), "masks/a.png"]) == base  # CSV round trip


def test_masks_fingerprint_follows_a_redrawn_mask_image(tmp_path):
    """A mask image edited in place keeps its path, but not its size and mtime: the key must change."""
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "masks" / "a.png")
    before = masks_fingerprint(["masks/a.png"], tmp_path)
    assert before == masks_fingerprint(["masks/a.png"], tmp_path)
    os.utime(tmp_path / "masks" / "a.png", ns=(0, 10**9))
    assert masks_fingerprint(["masks/a.png"], tmp_path) != before


@pytest.fixture
def pair(tmp_path):
    """Two photos that differ only outside a polygon mask, and an index over them (and one unknown label)."""
    points = [(8, 6), (56, 10), (50, 42), (12, 36)]
    inside = decode_mask([list(p) for p in points], (W, H))
    a, b = noisy(1), noisy(2)
    b[inside] = a[inside]
    Image.fromarray(a).save(tmp_path / "a.png")  # lossless: JPEG would smear the difference across the outline
    Image.fromarray(b).save(tmp_path / "b.png")
    mask = json.dumps([list(p) for p in points])
    index = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["lion", "stranger"], "mask": [mask, mask]})
    return tmp_path, index


def to_tensor():
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def test_masked_dataset_hides_the_background(pair):
    root, index = pair
    ds = MaskedDataset(index, root, to_tensor(), {"lion": 0}, "mask", mean_fill(MEAN))
    (xa, ya), (xb, yb) = ds[0], ds[1]
    assert torch.equal(xa, xb)
    # The mean colour normalises to about zero, so the background carries no signal.
    background = ~torch.from_numpy(decode_mask(index["mask"][0], (W, H)))
    assert xa[:, background].abs().max() < 0.01
    assert (ya.item(), yb.item()) == (0, -1) and ya.dtype == torch.long

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten()).eval()
    with torch.no_grad():
        assert torch.equal(model(xa[None]), model(xb[None]))
        whole = [to_tensor()(Image.open(root / f).convert("RGB")) for f in ("a.png", "b.png")]
        assert not torch.allclose(model(whole[0][None]), model(whole[1][None]))


def test_masked_dataset_paths_targets_and_empty_masks(pair):
    root, index = pair
    index = index.assign(mask=[None, ""])
    ds = MaskedDataset(index, root, to_tensor(), {"lion": 0, "stranger": 1}, "mask", (0, 0, 0))
    assert ds.paths == [root / "a.png", root / "b.png"] and len(ds) == 2
    assert ds.targets.tolist() == [0, 1]
    x, _ = ds[0]  # no mask: the photo whole
    assert torch.equal(x, to_tensor()(Image.open(root / "a.png").convert("RGB")))


def test_masked_dataset_names_a_bad_row(pair):
    root, index = pair
    index = index.assign(mask=[index["mask"][0], "[[0, 0, 1, 1]]"])
    ds = MaskedDataset(index, root, to_tensor(), {}, "mask", (0, 0, 0))
    ds[0]
    with pytest.raises(DataError, match=r"^index row 1 \(b\.png\): mask polygon part 0 has 2 points"):
        ds[1]


def test_masked_dataset_needs_the_mask_column(pair):
    root, index = pair
    with pytest.raises(DataError, match="no mask column 'segmentation'"):
        MaskedDataset(index, root, to_tensor(), {}, "segmentation", (0, 0, 0))
