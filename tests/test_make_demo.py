"""The demo generator: deterministic bytes, the class/ID_seq folder layout, planted bad files, learnable content,
no clobbering."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from data_prep.make_demo import make_demo
from lib.core.errors import DataError

REPO = Path(__file__).resolve().parents[1]
# five classes so each planted kind sits in its own class, as in the default set
SMALL = dict(n_classes=5, individuals_per_class=3, views_per_individual=3, n_contexts=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "set"
    return out, make_demo(out, seed=0, **SMALL)


def file_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def planted(meta, text):
    rows = meta[meta["note"].str.contains(text, regex=False)]
    assert len(rows) >= 1, f"no planted file noted {text!r}"
    return rows


def test_same_seed_same_bytes_other_seed_other_images(demo, tmp_path):
    out, meta = demo
    h0 = file_hashes(out)
    make_demo(tmp_path / "again", seed=0, **SMALL)
    make_demo(tmp_path / "other", seed=1, **SMALL)
    assert file_hashes(tmp_path / "again") == h0
    h1 = file_hashes(tmp_path / "other")
    assert h1.keys() == h0.keys()
    # only the seed-free files may agree: the stray text files (the table holds each view's mask, which moves)
    text_jpg = planted(meta, "text file")["path"].item()
    stray = next(p for p in h0 if p.endswith("notes.txt"))
    assert {p for p in h0 if h0[p] == h1[p]} == {text_jpg, stray}


def test_masks_cover_the_body(demo):
    """Each regular view carries its posed body's mask (COCO RLE); planted files carry none."""
    out, meta = demo
    regular = meta[meta["mask"] != ""]
    assert (meta.loc[meta["note"] != "", "mask"] == "").all() and len(regular) > 0.8 * len(meta)
    from pycocotools import mask as coco_mask
    for row in regular.head(6).itertuples():
        rle = json.loads(row.mask)
        m = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        photo = np.asarray(Image.open(out / row.path).convert("RGB"), dtype=float)
        assert m.shape == photo.shape[:2]
        assert 0.05 < m.mean() < 0.6
        ys, xs = np.nonzero(m)
        # the body is posed around the centre (offset at most 14 % of the side)
        assert abs(xs.mean() / m.shape[1] - 0.5) < 0.25 and abs(ys.mean() / m.shape[0] - 0.5) < 0.25


def test_layout_matches_metadata(demo):
    out, meta = demo
    on_disk = pd.read_csv(out / "metadata.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(on_disk, meta)
    assert list(meta.columns) == ["path", "label", "individual", "group", "context", "seq", "note", "mask"]

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    strays = {p for p in files if p.endswith("notes.txt")}
    assert len(strays) == 1
    assert files == set(meta["path"]) | strays | {"metadata.csv"}

    expected_name = meta["label"] + "/" + meta["group"] + "_" + meta["seq"].astype(str)
    assert (meta["path"].str.rsplit(".", n=1).str[0] == expected_name).all()
    assert (meta["individual"] == meta["group"]).all()
    assert not meta["group"].str.contains("_").any()
    assert (meta.groupby("group")["label"].nunique() == 1).all()
    assert all(re.fullmatch(rf"{label}\d\d", group) for label, group in zip(meta["label"], meta["group"]))

    good = meta[meta["note"] == ""]
    real = good[~good["group"].isin(meta.loc[meta["note"] != "", "group"])]
    n_real = SMALL["n_classes"] * SMALL["individuals_per_class"]
    assert real["group"].nunique() == n_real
    assert len(real) == n_real * SMALL["views_per_individual"]
    assert (real.groupby("group")["seq"].apply(sorted) == [[1, 2, 3]] * n_real).all()
    assert (real.groupby("label")["group"].nunique() == SMALL["individuals_per_class"]).all()
    for path in good["path"]:
        with Image.open(out / path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256)), path


def test_sites_mix_classes_and_repeat_some(demo):
    _, meta = demo
    ids = meta.drop_duplicates("group")
    assert ids["context"].nunique() == SMALL["n_contexts"]
    assert (ids.groupby("context")["label"].nunique() >= 2).all()
    assert (ids.groupby(["context", "label"]).size() >= 2).any()


def test_planted_files_are_what_they_claim(demo):
    out, meta = demo

    small = planted(meta, "undersized")
    assert len(small) == 2 and small["group"].nunique() == 1
    for path in small["path"]:
        with Image.open(out / path) as im:
            assert im.size == (160, 160)

    cut = planted(meta, "truncated")["path"].item()
    data = (out / cut).read_bytes()
    assert data[:2] == b"\xff\xd8"  # a valid header: only decoding can tell
    with Image.open(out / cut) as im, pytest.raises(OSError):
        im.load()
    partner = meta[(meta["group"] == meta.loc[meta["path"] == cut, "group"].item()) & (meta["path"] != cut)]
    with Image.open(out / partner["path"].item()) as im:
        im.load()

    with pytest.raises(UnidentifiedImageError):
        Image.open(out / planted(meta, "text file")["path"].item())

    fake_png = out / planted(meta, ".png name")["path"].item()
    assert fake_png.suffix == ".png" and fake_png.read_bytes()[:2] == b"\xff\xd8"
    with Image.open(fake_png) as im:
        assert im.format == "JPEG" and im.size == (256, 256)

    with Image.open(out / planted(meta, "Orientation=6")["path"].item()) as im:
        assert im.getexif()[0x0112] == 6
        stored = np.asarray(im.convert("L"), dtype=float)
        shown = np.asarray(ImageOps.exif_transpose(im).convert("L"), dtype=float)
    # the scene is lit from above: shown upright the top is brighter; the stored pixels lie on their side
    assert shown[:64].mean() - shown[-64:].mean() > 10
    assert stored[:, :64].mean() - stored[:, -64:].mean() > 10

    assert not meta["path"].str.endswith(".txt").any()


def centre_histogram(path):
    """Colour histogram of the middle of the photo, where the object stands."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB").crop((77, 77, 179, 179)))
    h, _ = np.histogramdd(a.reshape(-1, 3) // 32, bins=(8, 8, 8), range=[(0, 8)] * 3)
    return np.sqrt(h.ravel() / h.sum())


def test_views_vary_but_individuals_and_classes_separate(demo):
    out, meta = demo
    real = meta[~meta["group"].isin(meta.loc[meta["note"] != "", "group"])]
    feats = np.stack([centre_histogram(out / p) for p in real["path"]])
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=2)
    group, label = real["group"].to_numpy(str), real["label"].to_numpy(str)
    same_id = group[:, None] == group[None]
    same_class = label[:, None] == label[None]
    within_id = dist[same_id & ~np.eye(len(real), dtype=bool)].mean()
    other_id_same_class = dist[same_class & ~same_id].mean()
    other_class = dist[~same_class].mean()
    assert within_id < other_id_same_class < other_class

    # views are different photos, not copies: pose, light and background change many pixels
    first, second = (real[real["seq"] == s]["path"] for s in (1, 2))
    for a, b in zip(first, second):
        pa, pb = (np.asarray(Image.open(out / p).convert("L"), dtype=float) for p in (a, b))
        assert np.abs(pa - pb).mean() > 10, (a, b)


def test_refuses_to_overwrite(demo, tmp_path):
    out, _ = demo
    before = file_hashes(out)
    with pytest.raises(DataError, match=str(out)):
        make_demo(out, seed=0, **SMALL)
    assert file_hashes(out) == before

    theirs = tmp_path / "photos"
    theirs.mkdir()
    (theirs / "keep.jpg").write_bytes(b"mine")
    with pytest.raises(DataError, match="not a demo folder"):
        make_demo(theirs, overwrite=True, **SMALL)
    assert (theirs / "keep.jpg").read_bytes() == b"mine"

    again = tmp_path / "again"
    make_demo(again, seed=0, **SMALL)
    (again / "stale.jpg").write_bytes(b"old")
    make_demo(again, seed=0, overwrite=True, **SMALL)
    assert file_hashes(again) == before


def test_cli_writes_default_set_then_refuses(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "data_prep/make_demo.py", "--out", str(out), "--seed", "3"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    meta = pd.read_csv(out / "metadata.csv", keep_default_na=False)
    assert (meta["note"] == "").sum() == 6 * 8 * 5 + 3  # + the good partners of truncated, .png, EXIF files

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 2
    assert str(out) in again.stderr and "Traceback" not in again.stderr
