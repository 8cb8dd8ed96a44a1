"""The training assembly's parts that describe themselves: a loss head added to the registry trains with what it
declares; both phases step through the loss scaler; the checkpoint saver reads a resumed checkpoint once and never
reuses a backup folder."""
import datetime as dt
from pathlib import Path

import pandas as pd
import pytest
import torch

import lib.train.losses as losses
from lib.train.checkpoint import load_checkpoint, save_checkpoint
from lib.train.run import train_run
from lib.train.state import LossScaler
from test_run_safety import config as run_safety_config


def config(demo, **overrides):
    """test_run_safety's tiny run, one batch per epoch."""
    return run_safety_config(demo, **{"batches_per_epoch": 1, **overrides})


class FixedMarginHead(losses.ArcFaceHead):
    """A third head: ArcFace's logits at a margin of its own that no schedule changes."""
    name = "fixed_arcface"
    scheduled_margin = False

    @classmethod
    def from_config(cls, cfg, embed_dim, n_classes):
        head = cls(embed_dim, n_classes, s=cfg.s)
        head.margin = 0.05
        return head

    @staticmethod
    def label(cfg):
        return "fixed-arcface"


def test_a_head_added_to_the_registry_trains_with_what_it_declares(demo, tmp_path, monkeypatch):
    monkeypatch.setitem(losses.LOSSES, FixedMarginHead.name, FixedMarginHead)
    cfg = config(demo, loss="fixed_arcface", epochs=2, warmup_epochs=1, warmup_margin=0.0, margin=0.4)
    history = train_run(str(tmp_path), cfg, progress=False)
    # no margin schedule: its own margin in every epoch, where ArcFace's would read 0.0 then 0.4
    assert list(history["margin"].iloc[1:]) == [0.05, 0.05]
    assert losses.loss_label(cfg.loss) == "fixed-arcface(s=30)"
    assert isinstance(losses.build_loss(cfg.loss, 16, 3).head, FixedMarginHead)
    with pytest.raises(ValueError, match="set loss='ce'"):  # mixed labels are what the registry says takes them
        train_run(str(tmp_path / "mix"), config(demo, loss="fixed_arcface", mixup=0.2), progress=False)


def test_the_head_phase_steps_through_the_loss_scaler(demo, tmp_path, monkeypatch):
    """One step path for both phases: the head phase's steps go through the scaler (and its clipping) as the
    backbone phase's do, so fp16 scaling and gradient clipping act alike in both."""
    calls = []
    real = LossScaler.__call__

    def counting(self, loss, optimizer, **kwargs):
        calls.append(kwargs.get("clip_grad"))
        return real(self, loss, optimizer, **kwargs)

    monkeypatch.setattr(LossScaler, "__call__", counting)
    train_run(str(tmp_path), config(demo, head_epochs=2, epochs=0, grad_clip=0.5, batches_per_epoch=2),
              progress=False)
    assert calls == [0.5] * 4  # 2 head epochs x 2 steps, each clipped at grad_clip


def test_a_resume_reads_the_latest_checkpoint_once(demo, tmp_path, monkeypatch):
    cfg = config(demo, epochs=2)
    train_run(str(tmp_path), cfg, progress=False, stop_after_epoch=1)
    reads = []
    real = torch.load

    def counting(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).name == "latest_model.pt":
            reads.append(f)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    history = train_run(str(tmp_path), cfg, progress=False)
    assert list(history["epoch"]) == [0, 1, 2]
    assert len(reads) == 1, reads


def test_fresh_starts_never_share_a_backup_folder(demo, tmp_path):
    """Backups are named by the second: a fresh start within the same second as an earlier one (or where a folder of
    that name exists) gets a folder of its own, and the earlier folder keeps what it held."""
    save_checkpoint(tmp_path / "best_model.pt", {"epoch": 7})
    now = dt.datetime.now()
    taken = [tmp_path / f"replaced-{(now + dt.timedelta(seconds=s)).strftime('%Y%m%d-%H%M%S')}" for s in range(30)]
    for folder in taken:
        folder.mkdir()
        (folder / "note.txt").write_text(folder.name)
    train_run(str(tmp_path), config(demo, epochs=0), fresh=True, progress=False)
    new = sorted(set(tmp_path.glob("replaced-*")) - set(taken))
    assert len(new) == 1 and load_checkpoint(new[0] / "best_model.pt")["epoch"] == 7
    assert all(sorted(p.name for p in f.iterdir()) == ["note.txt"] for f in taken)
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == [0]
