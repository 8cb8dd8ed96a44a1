"""lib.core.state_io: atomic writes, manifests and locks, checked by failing and killing the writer."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core.errors import DataError
from lib.core.state_io import (atomic_file, manifest_problem, read_manifest, save_npz, state_lock, try_write_cache,
                               write_csv, write_json, write_manifest, write_text)

ROOT = Path(__file__).resolve().parents[1]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(path, "w") as f:
            f.write("new, half")
            raise RuntimeError("killed half way")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_writers_round_trip(tmp_path):
    write_json(tmp_path / "j.json", {"é": 1})
    assert json.loads((tmp_path / "j.json").read_text(encoding="utf-8")) == {"é": 1}
    table = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    pd.testing.assert_frame_equal(pd.read_csv(write_csv(tmp_path / "t.csv", table)), table)
    with np.load(save_npz(tmp_path / "e.npz", emb=np.eye(3, dtype=np.float32))) as f:
        np.testing.assert_array_equal(f["emb"], np.eye(3, dtype=np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz", "j.json", "t.csv"]


def test_a_manifest_catches_a_file_replaced_or_torn_after_it(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345")
    (tmp_path / "b.csv").write_text("x\n1\n")
    write_manifest(tmp_path, "m.json", ["a.bin", "b.csv"], {"kind": "Flat"})
    m = read_manifest(tmp_path, "m.json")
    assert m["kind"] == "Flat" and manifest_problem(tmp_path, m) == ""
    (tmp_path / "a.bin").write_bytes(b"1234")  # torn
    assert "a.bin" in manifest_problem(tmp_path, m)
    (tmp_path / "a.bin").write_bytes(b"54321")  # same size, other bytes
    assert "sha256" in manifest_problem(tmp_path, m)
    (tmp_path / "b.csv").unlink()
    (tmp_path / "a.bin").write_bytes(b"12345")
    assert "b.csv is missing" in manifest_problem(tmp_path, m)
    (tmp_path / "m.json").write_text('{"files": {"a.bin"')  # torn manifest
    assert read_manifest(tmp_path, "m.json") is None and manifest_problem(tmp_path, None)


HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from lib.core.state_io import state_lock
    with state_lock(sys.argv[1], "holding for a test"):
        print("held", flush=True)
        time.sleep(60)
""")


def _holder(lock):
    child = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(lock)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_held_lock_is_refused_by_name_and_freed_when_its_process_is_killed(tmp_path):
    lock = tmp_path / "state.lock"
    child = _holder(lock)
    try:
        with pytest.raises(DataError, match=rf"process {child.pid} .*holding for a test"):
            with state_lock(lock, "a second writer", wait=0):
                pass
    finally:
        child.kill()
        child.wait()
    with state_lock(lock, "after the kill", wait=5):  # the kernel dropped the lock with its process
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock.read_text() == ""  # released: holder cleared, file kept (unlinking a flock file races)


def test_a_second_writer_queues_until_the_first_ends(tmp_path):
    lock = tmp_path / "state.lock"
    child = _holder(lock)
    start = time.monotonic()
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {child.pid}"])
    with state_lock(lock, "queued"):
        waited = time.monotonic() - start
    child.wait()
    assert waited >= 0.5


def test_an_unwritable_cache_folder_is_said_once_and_not_fatal(tmp_path, capsys):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    assert not try_write_cache(tmp_path / "cache" / "x.json", write_json, {"a": 1})
    assert not try_write_cache(tmp_path / "cache" / "y.json", write_json, {"a": 1})
    assert capsys.readouterr().out.count("cannot be written") == 1
