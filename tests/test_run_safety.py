"""Run folders under faults and from elsewhere: checkpoints that cannot run code, corrupt files, a full disk, two
writers on one run_dir."""
import errno
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from lib.core.errors import DataError
from lib.train.checkpoint import TRUST_ENV, CorruptCheckpoint, load_checkpoint, save_checkpoint
from lib.train.config import build_config
from lib.train.export import export_run, load_exported
from lib.train.run import train_run
from lib.train.run_lock import LOCK_FILE, run_lock
from lib.train.trained_run import load_trained

TINY = dict(backbone="resnet10t", embed_dim=16, img_size=32, s=30.0, margin=0.3, warmup_epochs=0, p=6, k=4,
            lr_backbone=1e-3, lr_head=3e-3, num_workers=0, device="cpu", batches_per_epoch=2, head_epochs=0,
            unfreeze="all", lr_decay=1.0)


def config(demo, **overrides):
    data, splits = demo
    return build_config(data_dir=str(data), splits_dir=str(splits), **{**TINY, **overrides})


class Payload:
    """Unpickling this calls os.system: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train_run(str(run_dir), config(demo, epochs=2, checkpoint_every=1), progress=False)
    return run_dir


def test_a_checkpoint_carrying_code_is_refused_without_running_it(trained, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    marker = tmp_path / "ran"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = load_checkpoint(trained / "best_model.pt")
    torch.save({**state, "note": Payload(marker)}, run_dir / "best_model.pt")
    for load in (lambda: load_checkpoint(run_dir / "best_model.pt"), lambda: load_trained(run_dir)):
        with pytest.raises(DataError, match=r"refusing to load .*best_model.pt.*system"):
            load()
    assert not marker.exists()
    monkeypatch.setenv(TRUST_ENV, "1")  # the documented way to open such a file of one's own
    assert load_checkpoint(run_dir / "best_model.pt")["epoch"] == state["epoch"]
    assert marker.exists()


def test_a_trained_run_and_an_older_checkpoint_with_numpy_values_load_weights_only(trained, tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    assert load_trained(trained).epoch is not None
    old = {"epoch": 3, "history": [{"val_mAP": np.float64(0.25), "best_epoch": np.int64(2)}],
           "rng": {"numpy": np.random.get_state()}, "labels": np.arange(4, dtype=np.int32)}
    torch.save(old, tmp_path / "old.pt")
    back = load_checkpoint(tmp_path / "old.pt")
    assert back["history"][0]["val_mAP"] == 0.25 and back["history"][0]["best_epoch"] == 2
    assert np.array_equal(back["rng"]["numpy"][1], old["rng"]["numpy"][1])


def test_a_corrupt_latest_checkpoint_resumes_from_the_newest_intact_one(demo, tmp_path, capsys):
    cfg = config(demo, epochs=3, checkpoint_every=1)
    whole = train_run(str(tmp_path / "whole"), cfg, progress=False)
    cut = tmp_path / "cut"
    train_run(str(cut), cfg, progress=False, stop_after_epoch=2)
    latest = cut / "latest_model.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a copy cut short
    (cut / "checkpoint_epoch_2.pt").write_bytes(b"")  # and the newest numbered one empty
    resumed = train_run(str(cut), cfg, progress=False)
    out = capsys.readouterr().out
    assert "latest_model.pt is truncated or corrupt" in out and "resuming from checkpoint_epoch_1.pt" in out
    assert (cut / "latest_model.pt.corrupt").stat().st_size == 1000  # kept, not deleted
    cols = ["epoch", "train_loss", "val_recall@1", "val_mAP"]
    pd.testing.assert_frame_equal(whole[cols], resumed[cols], atol=1e-5, rtol=1e-4)


def test_a_corrupt_latest_without_an_intact_fallback_and_a_corrupt_best_are_errors(demo, trained, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "latest_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="latest_model.pt is truncated or corrupt.*fresh=True"):
        train_run(str(run_dir), config(demo, epochs=1), progress=False)
    best = (trained / "best_model.pt").read_bytes()
    (run_dir / "best_model.pt").write_bytes(best[: len(best) // 2])
    with pytest.raises(CorruptCheckpoint, match="best_model.pt"):
        load_trained(run_dir)
    assert (run_dir / "best_model.pt").stat().st_size == len(best) // 2  # never silently replaced


def test_a_failed_write_keeps_the_previous_checkpoint_and_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "latest_model.pt"
    save_checkpoint(path, {"epoch": 1})

    def disk_full(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DataError, match=r"could not write checkpoint .*latest_model.pt .*No space.*previous one is intact"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no half-written temp file left behind


def test_one_writer_per_run_folder(demo, tmp_path, capsys):
    cfg = config(demo, epochs=1)
    with run_lock(tmp_path):
        with pytest.raises(DataError, match=rf"being trained by process {os.getpid()}"):
            train_run(str(tmp_path), cfg, progress=False)
    # a lock file naming a process that is gone (as a killed training leaves it) holds nothing: only a live
    # process's flock does, so the next training starts without a take-over
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "since": "then"}))
    train_run(str(tmp_path), cfg, progress=False)
    assert "taking over" not in capsys.readouterr().out


def test_training_killed_at_random_moments_resumes_to_the_uninterrupted_run(demo, tmp_path):
    """SIGKILL in a child process, at random moments and during checkpoint writes, resumed each time."""
    data, splits = demo
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\nfrom lib.train.config import build_config\nfrom lib.train.run import train_run\n"
        f"cfg = build_config(data_dir={str(data)!r}, splits_dir={str(splits)!r}, **{ {**TINY, 'epochs': 5}!r})\n"
        "train_run(sys.argv[1], cfg, progress=False)\n")
    train = lambda run_dir: subprocess.Popen([sys.executable, str(script), str(run_dir)],  # noqa: E731
                                             stdout=subprocess.DEVNULL)
    assert train(tmp_path / "whole").wait() == 0
    cut = tmp_path / "cut"
    rng = np.random.default_rng(0)

    def epochs_done() -> int:
        try:
            return len(pd.read_csv(cut / "metrics.csv"))
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return 0

    kills, write_kills = 0, 0
    # moments chosen by the child's own progress, not by a clock: a loaded machine slows the child, not the test's aim
    for attempt in range(8):
        child = train(cut)
        deadline = time.time() + 300
        if attempt % 2:  # the moment a checkpoint is being written
            while child.poll() is None and time.time() < deadline and not list(cut.glob(".*.pt.*.tmp")):
                time.sleep(0.001)
        else:  # at a random moment of a random epoch still to come
            target = epochs_done() + int(rng.integers(0, 2))
            while child.poll() is None and time.time() < deadline and epochs_done() < target:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.5))
        if child.poll() is None:
            writing = bool(list(cut.glob(".*.pt.*.tmp")))
            child.kill()
            kills, write_kills = kills + 1, write_kills + writing
        child.wait()
        if kills == 5:
            break
    assert kills >= 3 and write_kills >= 1, (kills, write_kills)
    assert train(cut).wait() == 0
    whole, resumed = pd.read_csv(tmp_path / "whole" / "metrics.csv"), pd.read_csv(cut / "metrics.csv")
    cols = ["epoch", "train_loss", "val_recall@1", "val_mAP"]
    pd.testing.assert_frame_equal(whole[cols], resumed[cols], atol=1e-5, rtol=1e-4)


def test_export_writes_safetensors_and_config_that_rebuild_the_model(trained, tmp_path):
    out = export_run(trained, tmp_path / "shared")
    model, meta = load_exported(out)
    run = load_trained(trained)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), run.model(x))
    assert meta["class_to_idx"] == run.config["class_to_idx"] and meta["epoch"] == run.epoch
    with pytest.raises(DataError, match="model.safetensors exists"):
        export_run(trained, out)
