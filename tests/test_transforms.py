import numpy as np
import pytest
import torch
from PIL import Image

from lib.data.transforms import PRESETS, RESIZES, build_transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _halves(bright: str, h=48, w=64) -> Image.Image:
    """RGB image with one half white and the other black."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    {"top": a[: h // 2], "left": a[:, : w // 2]}[bright][:] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("resize", RESIZES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_output_shape_and_dtype(preset, resize):
    train_tf, eval_tf = build_transforms(32, MEAN, STD, preset, resize=resize)
    wide, tall = _halves("top", 40, 90), _halves("top", 90, 40)
    for tf in (train_tf, eval_tf):
        for image in (wide, tall, torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)):
            out = tf(image)
            assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("resize", RESIZES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_no_vertical_flip(preset, resize):
    train_tf, _ = build_transforms(32, MEAN, STD, preset, resize=resize)
    torch.manual_seed(0)
    image = _halves("top")
    for _ in range(60):
        out = train_tf(image)
        assert out[:, :16].mean() > out[:, 16:].mean()


def _left_brighter(tf, n=60):
    torch.manual_seed(0)
    image = _halves("left")
    return [bool(out[:, :, :16].mean() > out[:, :, 16:].mean()) for out in (tf(image) for _ in range(n))]


def test_horizontal_flip_only_when_asked():
    flips = _left_brighter(build_transforms(32, MEAN, STD, "light", hflip=True)[0])
    assert 10 < flips.count(False) < 50  # p = 0.5 over 60 draws
    assert all(_left_brighter(build_transforms(32, MEAN, STD, "light", hflip=False)[0]))


def test_eval_resizes_shorter_side_then_centre_crops():
    # 3 vertical bands red | green | blue on a 96x32 image: shorter side to 32 keeps 96x32, the crop is the middle
    a = np.zeros((32, 96, 3), dtype=np.uint8)
    for band in range(3):
        a[:, 32 * band: 32 * (band + 1), band] = 255
    _, eval_tf = build_transforms(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "light")
    out = eval_tf(Image.fromarray(a))
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor([0.0, 1.0, 0.0]), atol=0.02)
    assert torch.equal(out, eval_tf(Image.fromarray(a)))


def _edge_bars(h=32, w=96) -> Image.Image:
    """A wide photo: green, with a red bar at its left edge and a blue bar at its right edge (8 px each)."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:, :, 1] = 255
    a[:, :8] = (255, 0, 0)
    a[:, -8:] = (0, 0, 255)
    return Image.fromarray(a)


def _bars_seen(out: torch.Tensor) -> tuple[bool, bool]:
    """(red bar visible, blue bar visible) in an output normalized with mean 0, std 1."""
    return bool((out[0] - out[1] > 0.5).any()), bool((out[2] - out[1] > 0.5).any())


@pytest.mark.parametrize("resize", RESIZES)
def test_squash_and_pad_keep_the_whole_photo_crop_cuts_its_edges(resize):
    _, eval_tf = build_transforms(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "light", resize=resize)
    out = eval_tf(_edge_bars())
    if resize == "crop":
        assert _bars_seen(out) == (False, False)
        return
    rows = slice(None) if resize == "squash" else slice(12, 20)  # pad: the photo is 32 x 11, rows 10-20
    assert out[0, rows, 0].min() > 0.8 and out[2, rows, -1].min() > 0.8  # the photo's very edges, at the output's
    assert out[1, rows, 16].min() > 0.8


@pytest.mark.parametrize("resize", ["squash", "pad"])
def test_pad_fills_with_the_mean_colour(resize):
    _, eval_tf = build_transforms(32, MEAN, STD, "none", resize=resize)
    for image in (_edge_bars(), torch.from_numpy(np.array(_edge_bars())).permute(2, 0, 1).contiguous()):
        out = eval_tf(image)
        if resize == "pad":  # above and below the photo: the mean colour, which normalizes to 0
            assert out[:, :9].abs().max() < 0.02 and out[:, -9:].abs().max() < 0.02
        else:
            assert out[:, :9].abs().max() > 1
    tall = eval_tf(_edge_bars().transpose(Image.Transpose.ROTATE_90))  # 32 wide, 96 high: bars left and right
    if resize == "pad":
        assert tall[:, :, :9].abs().max() < 0.02 and tall[:, :, -9:].abs().max() < 0.02


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_squash_and_pad_train_on_most_of_the_photo(preset):
    """RandomResizedCrop's absolute 3/4..4/3 ratio never spans a 3:1 photo; squash and pad crop relative to it."""
    seen = {}
    for resize in RESIZES:
        train_tf, _ = build_transforms(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), preset, hflip=False, resize=resize)
        torch.manual_seed(0)
        seen[resize] = [_bars_seen(train_tf(_edge_bars())) for _ in range(40)]
    assert seen["crop"].count((True, True)) == 0
    assert seen["squash"].count((True, True)) >= 8 and seen["pad"].count((True, True)) >= 8


def test_normalization_uses_mean_and_std():
    _, eval_tf = build_transforms(16, MEAN, STD, "none")
    grey = Image.fromarray(np.full((20, 20, 3), 128, dtype=np.uint8))
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(eval_tf(grey).mean(dim=(1, 2)), expected, atol=1e-5)


def test_none_preset_trains_on_the_eval_transform():
    train_tf, eval_tf = build_transforms(32, MEAN, STD, "none")
    assert train_tf is eval_tf


def test_unknown_names_raise_with_the_valid_ones():
    with pytest.raises(ValueError, match="light"):
        build_transforms(32, MEAN, STD, "medium")
    with pytest.raises(ValueError, match="bicubic"):
        build_transforms(32, MEAN, STD, "light", interpolation="lanczos")
    with pytest.raises(ValueError, match="'crop', 'squash', 'pad'"):
        build_transforms(32, MEAN, STD, "light", resize="stretch")
