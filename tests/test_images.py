import pickle
import sys

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from lib.core.errors import DataError
from lib.data.images import find_images, load_resized, open_image, probe_image


def photo(w, h, seed=0):
    """Photo-like RGB array: smooth gradients (so orientation and resizing errors show) plus mild noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx / w * 255, yy / h * 255, (xx + 2 * yy) / (w + 2 * h) * 255], -1)
    a += np.random.default_rng(seed).normal(0, 6, a.shape)
    return a.clip(0, 255).astype(np.uint8)


def save_jpeg(path, w=64, h=48, **kw):
    Image.fromarray(photo(w, h)).save(path, "JPEG", quality=92, **kw)
    return path


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = value
    return exif


def test_probe_good_jpeg(tmp_path):
    info = probe_image(save_jpeg(tmp_path / "a.jpg", 64, 48), min_size=32)
    assert (info.ok, info.width, info.height, info.format, info.reason) == (True, 64, 48, "JPEG", "")


def test_probe_too_small(tmp_path):
    Image.fromarray(photo(160, 300)).save(tmp_path / "s.png")
    info = probe_image(tmp_path / "s.png", min_size=224)
    assert not info.ok
    assert info.reason == "too small: 160x300 < 224x224"
    assert probe_image(tmp_path / "s.png", min_size=160).ok


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("draft", [True, False])
@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_probe_catches_truncation_with_and_without_draft(tmp_path, monkeypatch, progressive, draft, keep):
    data = save_jpeg(tmp_path / "full.jpg", 200, 150, progressive=progressive).read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * keep)])
    # another library may have switched PIL to tolerate truncation globally: we must still catch it, and restore it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    info = probe_image(cut, draft=draft)
    assert not info.ok and info.reason.startswith("truncated or corrupt")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    with pytest.raises(DataError, match="cut.jpg.*truncated"):
        open_image(cut)


def test_probe_not_an_image_empty_and_missing(tmp_path):
    (tmp_path / "text.jpg").write_text("hello, I am not a photo\n" * 20)
    (tmp_path / "empty.png").write_bytes(b"")
    assert probe_image(tmp_path / "text.jpg").reason.startswith("not an image")
    assert probe_image(tmp_path / "empty.png").reason == "empty file"
    assert probe_image(tmp_path / "missing.jpg").reason.startswith("cannot read file")
    with pytest.raises(DataError, match="text.jpg: not an image") as caught:
        open_image(tmp_path / "text.jpg")
    # worker processes (data loaders, the cache builder) send it back pickled
    again = pickle.loads(pickle.dumps(caught.value))
    assert (str(again), again.reason) == (str(caught.value), caught.value.reason)


def test_type_comes_from_content_not_extension(tmp_path):
    save_jpeg(tmp_path / "really_jpeg.png", 40, 30)
    info = probe_image(tmp_path / "really_jpeg.png")
    assert info.ok and info.format == "JPEG"
    assert open_image(tmp_path / "really_jpeg.png").size == (40, 30)


def test_exif_orientation_6_swaps_size_and_rotates_clockwise(tmp_path):
    a = photo(64, 40)
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, "JPEG", quality=95, exif=exif_with_orientation(6))
    info = probe_image(path)
    assert (info.width, info.height) == (40, 64)
    got = np.asarray(open_image(path), dtype=float)
    clockwise = np.rot90(a, k=-1).astype(float)  # orientation 6: the camera was turned 90 degrees clockwise
    assert got.shape == clockwise.shape
    assert np.abs(got - clockwise).mean() < 8  # JPEG loss on the noise
    assert np.abs(got - np.rot90(a, k=1)).mean() > 30  # the other direction is clearly wrong


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16).repeat(3, axis=0)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert probe_image(tmp_path / "g16.png").ok
    got = np.asarray(open_image(tmp_path / "g16.png"))
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert got.shape == (3, 5, 3)
    np.testing.assert_array_equal(got[..., 0], expected)
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    # a dark 16-bit frame stays dark: the scale is the 16-bit range, not the frame's own maximum
    Image.fromarray(values[:, :3].copy()).save(tmp_path / "dark16.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "dark16.png"))[..., 1], expected[:, :3])


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # white paper
    im.paste((255, 0, 0, 0), (0, 0, 8, 8))  # pure cyan ink
    im.save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    info = probe_image(tmp_path / "cmyk.jpg")
    assert info.ok and (info.width, info.height) == (16, 8)
    got = np.asarray(open_image(tmp_path / "cmyk.jpg"), dtype=int)
    assert np.abs(got[4, 2] - [0, 255, 255]).max() < 8
    assert np.abs(got[4, 13] - [255, 255, 255]).max() < 8


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_composites_on_white(tmp_path, mode):
    im = Image.new("RGBA", (3, 1))
    im.putdata([(0, 0, 0, 0), (0, 0, 0, 128), (200, 0, 0, 255)])  # invisible, half-transparent black, opaque
    im.convert(mode).save(tmp_path / "t.png")
    got = np.asarray(open_image(tmp_path / "t.png"), dtype=int)[0]
    half = round(255 * (1 - 128 / 255))  # black at alpha 128 over white
    assert np.abs(got[0] - 255).max() <= 1
    assert np.abs(got[1] - half).max() <= 2
    opaque = [200, 0, 0] if mode == "RGBA" else [round(200 * 299 / 1000)] * 3  # L = ITU-R 601 luma of red
    assert np.abs(got[2] - opaque).max() <= 1


def test_palette_with_transparent_index_becomes_white(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 0, 0, 10, 120, 30] + [0] * 762)
    im.putdata([0, 1])
    im.save(tmp_path / "p.gif", transparency=0)
    got = np.asarray(open_image(tmp_path / "p.gif"))[0]
    np.testing.assert_array_equal(got, [[255, 255, 255], [10, 120, 30]])


def test_bilevel_image(tmp_path):
    im = Image.new("1", (2, 1))
    im.putdata([0, 1])
    im.save(tmp_path / "b.bmp")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "b.bmp"))[0], [[0, 0, 0], [255, 255, 255]])


def test_heic_without_plugin_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails, as on a machine without it
    ftyp = (24).to_bytes(4, "big") + b"ftypheic" + b"\0\0\0\0" + b"mif1heic"
    (tmp_path / "iphone.jpg").write_bytes(ftyp + b"\0" * 100)
    assert "pip install pillow-heif" in probe_image(tmp_path / "iphone.jpg").reason
    with pytest.raises(DataError, match="iphone.jpg: HEIC.*pip install pillow-heif"):
        open_image(tmp_path / "iphone.jpg")
    # a plain MP4 has an ftyp box too, but it is not HEIF
    (tmp_path / "clip.mp4").write_bytes((20).to_bytes(4, "big") + b"ftypisom\0\0\0\0mp41" + b"\0" * 100)
    assert probe_image(tmp_path / "clip.mp4").reason.startswith("not an image")


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("shorter", 60, (80, 60)),
        ("longer", 60, (60, 45)),
        ("shorter", 100, (133, 100)),
        ("longer", 50, (50, 38)),
        ("shorter", 200, (160, 120)),  # never upscaled
        ("longer", 160, (160, 120)),
    ],
)
@pytest.mark.parametrize("draft", [True, False])
def test_load_resized_sizes_and_no_upscaling(tmp_path, mode, size, expected, draft):
    path = save_jpeg(tmp_path / "a.jpg", 160, 120)
    im = load_resized(path, size, mode, draft=draft)
    assert im.mode == "RGB"
    assert im.size == expected


def test_load_resized_follows_exif_orientation(tmp_path):
    path = tmp_path / "rot.jpg"
    Image.fromarray(photo(160, 120)).save(path, "JPEG", quality=92, exif=exif_with_orientation(6))
    assert load_resized(path, 40, "longer").size == (30, 40)
    assert load_resized(path, 40, "shorter").size == (40, 53)


def test_draft_decode_close_to_full_decode(tmp_path):
    path = save_jpeg(tmp_path / "big.jpg", 800, 600)
    drafted = np.asarray(load_resized(path, 120, draft=True), dtype=float)
    full = np.asarray(load_resized(path, 120, draft=False), dtype=float)
    assert drafted.shape == full.shape == (120, 160, 3)
    diff = np.abs(drafted - full).mean()
    assert 0 < diff < 2  # draft really took the reduced-scale path, and it barely changes the result


def test_load_resized_rejects_bad_settings(tmp_path):
    path = save_jpeg(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="shorter"):
        load_resized(path, 10, "width")
    with pytest.raises(ValueError, match="positive"):
        load_resized(path, 0)


def test_find_images_skips_hidden_and_non_images(tmp_path):
    for rel in ["b/x.JPG", "a.png", "b/c/y.webp", ".hidden.jpg", ".cache/z.jpg", "notes.txt", "b/.d/w.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    assert find_images(tmp_path) == ["a.png", "b/c/y.webp", "b/x.JPG"]
