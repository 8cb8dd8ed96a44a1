"""A run folder under faults: saves stopped between their files, torn caches, unwritable cache folders, two writers
at once (lib.core.state_io and its users)."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_image
from test_evaluate import CountingModel

from lib.core import cpu_probe, state_io
from lib.core.device import DeviceSettings, auto_settings
from lib.core.errors import DataError
from lib.data.dataset import IndexDataset
from lib.data.transforms import build_transforms
from lib.evaluate.gallery_index import INDEX_DIR, gallery_index
from lib.retrieval.ann_index import is_exact
from lib.retrieval.embed import cached_embeddings
from lib.retrieval.faiss_index import StaleIndex, build_index, load_index, save_index
from lib.train.run_lock import LOCK_FILE, run_lock
from lib.train.trained_run import load_trained

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """say_once remembers per process: each test starts with nothing said."""
    monkeypatch.setattr(state_io, "_SAID", set())


def child(code: str) -> subprocess.Popen:
    """A Python process running `code` with this worktree's lib, its output captured."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_for(path: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


# ---- the gallery index: a manifest written last ---------------------------------------------------------------

@pytest.fixture
def run(run_dir, tmp_path):
    """A copy of the trained demo run (its index is written below) and the CPU settings to search it with."""
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    return load_trained(copy), auto_settings(device="cpu")


def test_an_ivf_save_stopped_before_its_manifest_is_never_searched_as_the_flat_index(run, monkeypatch, capsys):
    trained, settings = run
    assert is_exact(gallery_index(trained, settings, search={"index": "flat"}).index)
    real_to_csv = pd.DataFrame.to_csv

    def killed(self, *args, **kwargs):  # the process dies after index.faiss was replaced, before the rest
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pd.DataFrame, "to_csv", killed)
    with pytest.raises(KeyboardInterrupt):
        gallery_index(trained, settings, search={"index": "ivf"})
    monkeypatch.setattr(pd.DataFrame, "to_csv", real_to_csv)
    folder = trained.run_dir / INDEX_DIR
    with pytest.raises(StaleIndex, match="index.faiss does not match|index.faiss is .* bytes"):
        load_index(folder)
    capsys.readouterr()
    found = gallery_index(trained, settings)  # the settings the manifest records: flat
    assert is_exact(found.index) and found.info["factory"] == "Flat"
    assert f"rebuilding the gallery index in {folder}: the saved index in {folder} is stale" in capsys.readouterr().out
    _, _, info = load_index(folder)
    assert info["index"]["factory"] == "Flat" and "files" not in info


@pytest.mark.parametrize("tear", ["truncate index.faiss", "tear metadata.csv", "old index.json"])
def test_a_torn_or_old_saved_index_is_rebuilt_saying_why(run, tear, capsys):
    trained, settings = run
    first = gallery_index(trained, settings)
    folder = trained.run_dir / INDEX_DIR
    if tear == "truncate index.faiss":
        data = (folder / "index.faiss").read_bytes()
        (folder / "index.faiss").write_bytes(data[: len(data) // 2])
    elif tear == "tear metadata.csv":
        text = (folder / "metadata.csv").read_text()
        (folder / "metadata.csv").write_text(text[: len(text) // 2])
    else:  # written before manifests: no "files" to check the index against
        meta = state_io.read_manifest(folder, "index.json")
        state_io.write_json(folder / "index.json", {k: v for k, v in meta.items() if k != "files"})
    capsys.readouterr()
    again = gallery_index(trained, settings)
    assert f"rebuilding the gallery index in {folder}: the saved index in {folder} is stale" in capsys.readouterr().out
    # the same rows (a rebuilt index's metadata is the split table itself; a loaded one's, its CSV read as text)
    pd.testing.assert_frame_equal(again.metadata.astype(str), first.metadata.astype(str))
    assert again.index.ntotal == first.index.ntotal
    load_index(folder)  # whole again


def test_load_index_names_what_is_wrong(tmp_path):
    gallery = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    meta = pd.DataFrame({"path": [f"p{i}.jpg" for i in range(30)], "label": "a"})
    save_index(build_index(gallery, device="cpu"), meta, tmp_path, {"checkpoint_sha256": "abc"})
    _, loaded, info = load_index(tmp_path)
    assert info == {"checkpoint_sha256": "abc"}
    pd.testing.assert_frame_equal(loaded, meta)
    (tmp_path / "index.faiss").write_bytes(b"\0" * (tmp_path / "index.faiss").stat().st_size)  # same size, other bytes
    with pytest.raises(StaleIndex, match="index.faiss does not match the sha256 its manifest records"):
        load_index(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(StaleIndex, match="manifest is missing"):
        load_index(tmp_path)


# ---- caches: rebuilt when torn, skipped when they cannot be written -------------------------------------------

@pytest.fixture
def photos(tmp_path):
    for i in range(3):
        write_image(tmp_path / "data" / f"{i}.jpg", size=(40, 30), seed=i)
    _, tf = build_transforms(32, (0.5,) * 3, (0.25,) * 3, preset="none")
    return IndexDataset(pd.DataFrame({"path": [f"{i}.jpg" for i in range(3)], "label": "a"}), tmp_path / "data", tf,
                        {"a": 0})


def test_a_torn_embedding_cache_file_is_computed_again_saying_so(photos, tmp_path, capsys):
    model, cache = CountingModel(), tmp_path / "emb"
    first, info = cached_embeddings(model, photos, DeviceSettings(), cache, "ck")
    file = Path(info["file"])
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a kill mid-copy, a full disk
    again, info = cached_embeddings(model, photos, DeviceSettings(), cache, "ck")
    assert not info["cached"] and model.forwards == 2
    np.testing.assert_allclose(again, first, atol=1e-6)
    assert f"note: cache file {file} cannot be read" in capsys.readouterr().out
    assert cached_embeddings(model, photos, DeviceSettings(), cache, "ck")[1]["cached"]  # rewritten whole


def test_an_unwritable_embedding_cache_is_skipped_said_once(photos, tmp_path, capsys):
    model, cache = CountingModel(), tmp_path / "emb"
    cache.write_text("a file where the cache folder should be")
    first, info = cached_embeddings(model, photos, DeviceSettings(), cache, "ck")
    again, _ = cached_embeddings(model, photos, DeviceSettings(), cache, "ck")
    np.testing.assert_allclose(again, first)
    assert capsys.readouterr().out.count(f"note: cache {cache} cannot be written") == 1


def test_the_cpu_probe_works_on_when_the_cache_home_is_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "cache_home").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache_home"))
    model = CountingModel().eval()
    first = cpu_probe.cpu_forward_choice(model, (3, 16, 16), batches=(1, 2))
    second = cpu_probe.cpu_forward_choice(model, (3, 16, 16), batches=(1, 2))
    assert first.why.startswith("probe:") and second.why.startswith("probe:")
    assert capsys.readouterr().out.count("cannot be written") == 1


def test_a_torn_cpu_probe_cache_is_probed_again_saying_so(tmp_path, capsys):
    path = tmp_path / "cpu_probe.json"
    path.write_text('{"cut sh')
    choice = cpu_probe.cpu_forward_choice(CountingModel().eval(), (3, 16, 16), batches=(1, 2), path=path)
    assert choice.why.startswith("probe:") and len(cpu_probe._load(path)) == 1
    assert f"note: cache file {path} cannot be read" in capsys.readouterr().out


# ---- two writers -----------------------------------------------------------------------------------------------

def test_two_processes_adding_results_rows_at_once_both_land(tmp_path):
    csv, go = tmp_path / "results" / "benchmarks.csv", tmp_path / "go"

    def writer(name: str) -> subprocess.Popen:
        # each row brings a column the table lacks, so every append rewrites the whole table
        return child(f"""
            import time
            from pathlib import Path
            from lib.evaluate.results_table import append_benchmark_row
            while not Path({str(go)!r}).exists():
                time.sleep(0.005)
            for i in range(25):
                append_benchmark_row({str(csv)!r}, {{"version": {name!r}, "split": str(i), f"extra_{name}_{{i}}": i}})
        """)

    writers = [writer(name) for name in ("a", "b")]
    go.touch()
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert sorted(zip(table["version"], table["split"].astype(int))) == [(w, i) for w in ("a", "b") for i in range(25)]
    assert table.shape[1] > 50  # no column lost either


HOLD = """
    import os, sys, time
    from pathlib import Path
    from lib.train.run_lock import run_lock
    from lib.core.errors import DataError
    try:
        with run_lock({run!r}):
            {inside}
            Path({ready!r}).touch()
            time.sleep(30)
    except DataError as e:
        print("refused:", e)
"""


def test_a_live_training_holds_its_lock_even_before_its_name_is_in_the_file(tmp_path):
    run, ready = tmp_path / "run", tmp_path / "ready"
    # the moment between taking the lock and writing who holds it: the file is empty, the lock is held
    holder = child(HOLD.format(run=str(run), ready=str(ready), inside=f"open({str(run / LOCK_FILE)!r}, 'w').close()"))
    try:
        wait_for(ready)
        with pytest.raises(DataError, match=rf"{run} is being trained by process .*wait for it to finish"):
            with run_lock(run):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_two_trainings_started_at_once_one_wins_and_a_killed_ones_lock_is_free_at_once(tmp_path, capsys):
    run, ready = tmp_path / "run", [tmp_path / f"ready{i}" for i in range(2)]
    racers = [child(HOLD.format(run=str(run), ready=str(r), inside="pass")) for r in ready]
    try:
        end = time.monotonic() + 60
        while not (any(r.exists() for r in ready) and any(p.poll() is not None for p in racers)):
            assert time.monotonic() < end, "neither a winner and a refused one"
            time.sleep(0.02)
        winner = racers[0] if ready[0].exists() else racers[1]
        loser = racers[1] if winner is racers[0] else racers[0]
        assert winner.poll() is None and sum(r.exists() for r in ready) == 1
        assert f"refused: {run} is being trained by process {winner.pid} on " in loser.stdout.read()
        with pytest.raises(DataError, match=rf"being trained by process {winner.pid} on "):
            with run_lock(run):
                pass
        winner.send_signal(signal.SIGKILL)
        winner.wait()
        with run_lock(run):  # free at once: the kernel dropped the killed process's lock
            pass
        assert "taking over" not in capsys.readouterr().out
    finally:
        for r in racers:
            r.kill()
            r.wait()
