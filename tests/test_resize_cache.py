import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib.core.errors import DataError
from lib.data.resize_cache import MANIFEST, build_cache, cache_path

REPO = Path(__file__).resolve().parents[1]


def photo(w, h, seed):
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx / w * 255, yy / h * 255, np.full((h, w), seed * 40 % 256)], -1)
    return (a + np.random.default_rng(seed).normal(0, 6, a.shape)).clip(0, 255).astype(np.uint8)


def make_root(root, rels, size=(96, 72)):
    for i, rel in enumerate(rels):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(*size, seed=i)).save(root / rel)  # format from the suffix
    return rels


def mtimes(cache_dir):
    return {p: p.stat().st_mtime_ns for p in Path(cache_dir).rglob("*.jpg")}


def test_cache_path():
    assert cache_path("c", "lion/a_1.PNG") == Path("c/lion/a_1.jpg")
    assert cache_path("c", "x.tar.tif") == Path("c/x.tar.jpg")
    for bad in ["../x.jpg", "a/../../x.jpg", "/abs/x.jpg"]:
        with pytest.raises(DataError, match="relative"):
            cache_path("c", bad)


def test_written_then_reused(tmp_path):
    rels = make_root(tmp_path / "data", ["a/1.jpg", "a/2.png", "b/3.webp"])
    cache = tmp_path / "cache"
    first = build_cache(tmp_path / "data", rels, cache, size=48, workers=1)
    assert (first.written, first.reused, first.failed) == (3, 0, [])
    for rel in rels:
        im = Image.open(cache_path(cache, rel))
        assert im.format == "JPEG" and im.size == (64, 48)
    before = mtimes(cache)
    second = build_cache(tmp_path / "data", rels, cache, size=48, workers=1)
    assert (second.written, second.reused, second.failed) == (0, 3, [])
    assert mtimes(cache) == before
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_changed_source_or_settings_is_redone(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    rels = make_root(data, ["1.jpg", "2.jpg", "3.jpg"])
    build_cache(data, rels, cache, size=48, workers=1)
    before = mtimes(cache)
    old_pixels = np.asarray(Image.open(cache / "2.jpg"))
    Image.fromarray(photo(96, 72, seed=99)).save(data / "2.jpg")
    report = build_cache(data, rels, cache, size=48, workers=1)
    assert (report.written, report.reused) == (1, 2)
    assert np.abs(np.asarray(Image.open(cache / "2.jpg"), dtype=float) - old_pixels).mean() > 10
    after = mtimes(cache)
    assert [p.name for p in after if after[p] != before[p]] == ["2.jpg"]
    # a deleted cache file is rebuilt although the manifest knows it
    (cache / "3.jpg").unlink()
    assert build_cache(data, rels, cache, size=48, workers=1).written == 1
    # other settings rebuild everything in place
    report = build_cache(data, rels, cache, size=24, mode="longer", workers=1)
    assert (report.written, report.reused) == (3, 0)
    assert Image.open(cache / "1.jpg").size == (24, 18)
    entry = json.loads((cache / MANIFEST).read_text())["entries"]["1.jpg"]
    assert entry["size"] == 24 and entry["mode"] == "longer"
    assert entry["src_mtime_ns"] == (data / "1.jpg").stat().st_mtime_ns


def test_bad_images_are_reported_not_fatal(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    rels = make_root(data, ["good.jpg", "cut.jpg"])
    (data / "cut.jpg").write_bytes((data / "cut.jpg").read_bytes()[:300])
    (data / "text.png").write_text("not an image")
    report = build_cache(data, rels + ["text.png", "gone.jpg"], cache, size=48, workers=1)
    assert report.written == 1
    reasons = dict(report.failed)
    assert sorted(reasons) == ["cut.jpg", "gone.jpg", "text.png"]
    assert reasons["cut.jpg"].startswith("truncated or corrupt")
    assert reasons["text.png"].startswith("not an image")
    assert reasons["gone.jpg"].startswith("cannot read file")
    assert sorted(p.name for p in cache.glob("*.jpg")) == ["good.jpg"]


def test_source_turned_unreadable_drops_its_old_cache_file(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    rels = make_root(data, ["a.jpg"])
    build_cache(data, rels, cache, size=48, workers=1)
    (data / "a.jpg").write_bytes(b"overwritten by a broken sync")
    assert [r for r, _ in build_cache(data, rels, cache, size=48, workers=1).failed] == ["a.jpg"]
    assert not (cache / "a.jpg").exists()


def test_collision_names_both_sources_and_writes_nothing(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    rels = make_root(data, ["x/a.png", "x/a.jpg"])
    with pytest.raises(DataError, match="x/a.png and x/a.jpg"):
        build_cache(data, rels, cache, workers=1)
    assert not cache.exists()


def test_parallel_build_equals_serial(tmp_path):
    data = tmp_path / "data"
    rels = make_root(data, [f"{i}.jpg" for i in range(6)] + ["bad.jpg"], size=(120, 90))
    (data / "bad.jpg").write_bytes(b"junk")
    serial = build_cache(data, rels, tmp_path / "c1", size=40, workers=1)
    parallel = build_cache(data, rels, tmp_path / "c2", size=40, workers=2)
    assert parallel == serial and serial.written == 6 and [r for r, _ in serial.failed] == ["bad.jpg"]
    for rel in rels[:-1]:
        assert (tmp_path / "c1" / rel).read_bytes() == (tmp_path / "c2" / rel).read_bytes()


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    rels = make_root(data, ["a.jpg", "b.jpg"])
    build_cache(data, rels, cache, size=48, workers=1)
    old = (cache / "b.jpg").read_bytes()
    for i, rel in enumerate(rels):
        Image.fromarray(photo(96, 72, seed=50 + i)).save(data / rel)

    real_save = Image.Image.save
    on_disk_when_killed = []

    def save_then_die(self, fp, *args, **kwargs):
        if Path(getattr(fp, "name", "")).name.startswith(".b.jpg"):
            fp.write(b"\xff\xd8 half a jpeg")
            on_disk_when_killed.append(json.loads((cache / MANIFEST).read_text())["entries"]["a.jpg"])
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    monkeypatch.setattr("lib.data.resize_cache._FLUSH_SECONDS", 0.0)
    with pytest.raises(KeyboardInterrupt):
        build_cache(data, rels, cache, size=48, workers=1)
    assert (cache / "b.jpg").read_bytes() == old
    # progress was already on disk before the end, as a hard kill (no finally) would need
    assert on_disk_when_killed[0]["src_mtime_ns"] == (data / "a.jpg").stat().st_mtime_ns
    assert sorted(p.name for p in cache.iterdir()) == ["a.jpg", "b.jpg", MANIFEST]
    monkeypatch.setattr(Image.Image, "save", real_save)
    # the finished file was recorded before the interruption, so only the interrupted one is redone
    assert build_cache(data, rels, cache, size=48, workers=1).written == 1


def test_cli_as_script(tmp_path):
    data = tmp_path / "data"
    make_root(data, ["lion/a.jpg", "lion/b.png", ".trash/c.jpg", "cache/old.jpg"])
    (data / "lion/broken.jpg").write_text("no")
    cache = data / "cache"  # inside the data root: must not be cached into itself
    run = [sys.executable, "data_prep/resize_cache.py", str(data), str(cache), "--size", "32", "--workers", "1"]
    out = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "3 images: 2 written, 0 reused, 1 failed" in out.stdout
    assert "lion/broken.jpg: not an image" in out.stdout
    cached = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.jpg"))
    assert cached == ["lion/a.jpg", "lion/b.jpg", "old.jpg"]

    (tmp_path / "index.csv").write_text("path,label\nlion/a.jpg,lion\n")
    out = subprocess.run(run + ["--index", str(tmp_path / "index.csv")], cwd=REPO, capture_output=True, text=True)
    assert "1 images: 0 written, 1 reused, 0 failed" in out.stdout
    (tmp_path / "bad.csv").write_text("file\nlion/a.jpg\n")
    out = subprocess.run(run + ["--index", str(tmp_path / "bad.csv")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "bad.csv: no 'path' column" in out.stderr and "Traceback" not in out.stderr


def test_an_unwritable_cache_folder_stops_nothing_and_a_torn_manifest_is_rebuilt(tmp_path, capsys):
    rels = make_root(tmp_path / "data", ["a/1.jpg", "a/2.jpg"])
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    report = build_cache(tmp_path / "data", rels, blocked, size=48, workers=1)
    assert report.written == 0 and report.unwritable and report.failed == []
    assert capsys.readouterr().out.count(f"note: resize cache {blocked} cannot be written") == 1
    cache = tmp_path / "cache"
    build_cache(tmp_path / "data", rels, cache, size=48, workers=1)
    (cache / MANIFEST).write_text('{"version": 1, "entr')  # cut short
    again = build_cache(tmp_path / "data", rels, cache, size=48, workers=1)
    assert (again.written, again.reused) == (2, 0)
    assert f"note: cache file {cache / MANIFEST} cannot be read" in capsys.readouterr().out
    assert json.loads((cache / MANIFEST).read_text())["entries"].keys() == set(rels)
