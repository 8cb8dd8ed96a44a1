"""The checkpoint policy of a run folder in one place (timm's CheckpointSaver as the model): latest_model.pt every
epoch, best_model.pt at epoch 0 (the untrained model) and whenever an epoch is the best so far, checkpoint_epoch_N.pt
every N epochs; on a fresh start the earlier files moved aside, never deleted; on a resume the checkpoint read once.
The writes themselves are lib.train.checkpoint's (atomic, fp32, read back weights-only).
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from lib.core.errors import DataError
from lib.train.checkpoint import CorruptCheckpoint, fp32_state_dict, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from lib.train.state import TrainState

LATEST, BEST = "latest_model.pt", "best_model.pt"
CHECKPOINT_FILES = (LATEST, BEST, "metrics.csv")  # what a fresh start moves aside, with every checkpoint_epoch_N.pt


class CheckpointSaver:
    """Writes a run's checkpoints into run_dir; `writes=False` (a DDP rank other than 0) writes nothing."""

    def __init__(self, run_dir: str | os.PathLike, every: int = 0, writes: bool = True):
        self.run_dir, self.every, self.writes = Path(run_dir), every, writes

    def start(self, fresh: bool, say=print) -> tuple[dict, Path] | None:
        """Where the run starts: fresh=True moves the earlier files aside and starts over (None); otherwise the
        checkpoint to resume from and its path, read once (None for a new run)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not fresh:
            return self.resumable()
        if self.writes and (backup := self.move_aside()):
            say(f"fresh start: earlier checkpoints moved to {backup}")
        return None

    def move_aside(self) -> Path | None:
        """Earlier results moved into run_dir/replaced-<time>[-n]/, a folder no earlier start made, never deleted."""
        old = [p for p in self.run_dir.iterdir()
               if p.is_file() and (p.name in CHECKPOINT_FILES or p.name.startswith("checkpoint_epoch_"))]
        if not old:
            return None
        backup = _new_folder(self.run_dir, f"replaced-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
        for p in old:
            shutil.move(str(p), backup / p.name)
        return backup

    def resumable(self) -> tuple[dict, Path] | None:
        """(checkpoint, its path) a run resumes from: latest_model.pt, or where that is truncated or corrupt (a disk
        that filled, a copy cut short), the newest intact checkpoint_epoch_N.pt, saying so; the broken file is moved
        aside to <name>.corrupt, not deleted. None when there is no latest_model.pt (a new run)."""
        latest = self.run_dir / LATEST
        if not latest.exists():
            return None
        try:
            return load_checkpoint(latest), latest
        except CorruptCheckpoint as e:
            broken = e
        for path in sorted(self.run_dir.glob("checkpoint_epoch_*.pt"), key=_epoch_of, reverse=True):
            try:
                ckpt = load_checkpoint(path)
            except CorruptCheckpoint as e:
                print(f"skipping {path.name}: {e}")
                continue
            aside = latest.with_name(latest.name + ".corrupt")
            os.replace(latest, aside)
            print(f"{broken}; moved to {aside.name}, resuming from {path.name} (epoch {ckpt['epoch']})")
            return ckpt, path
        raise DataError(f"{broken}, and run_dir holds no intact checkpoint_epoch_N.pt to resume from; fresh=True "
                        "starts over (moving the old files to a replaced-* folder)")

    def save_untrained(self, state: TrainState) -> None:
        """Epoch 0 as the first best_model.pt, so a run whose training only hurts keeps the untrained model."""
        if self.writes:
            save_checkpoint(self.run_dir / BEST, state.checkpoint(0))

    def save(self, state: TrainState, epoch: int, improved: bool) -> None:
        """latest_model.pt; best_model.pt when the epoch is the best so far, holding the weights that scored (the
        EMA's when EMA drives selection); checkpoint_epoch_N.pt every `every` epochs."""
        if not self.writes:
            return
        ckpt = state.checkpoint(epoch)
        save_checkpoint(self.run_dir / LATEST, ckpt)
        if improved:
            best = dict(ckpt, model=fp32_state_dict(state.ema.module)) if state.ema is not None else ckpt
            save_checkpoint(self.run_dir / BEST, best)
        if self.every and epoch % self.every == 0:
            save_checkpoint(self.run_dir / f"checkpoint_epoch_{epoch}.pt", ckpt)


def recorded_device(ckpt: dict | None) -> dict | None:
    """What the machine chose for a checkpoint's run (device.resolved in its config); None without one."""
    try:
        return ckpt["config"]["device"].get("resolved") if ckpt else None
    except (KeyError, TypeError, AttributeError):
        return None


def _new_folder(parent: Path, name: str) -> Path:
    """parent/name, or name-1, name-2, ... where that exists: made here, so two starts in one second never share."""
    for n in range(10_000):
        folder = parent / (name if n == 0 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise DataError(f"{parent} holds 10000 {name}* folders; move some away")


def _epoch_of(path: Path) -> int:
    tail = path.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1
