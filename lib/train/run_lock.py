"""One writer per run folder: a second training started on a run_dir that one is already writing would interleave
their checkpoints, so it refuses, naming the first one's process and start time. The lock is an `fcntl.flock` on
run_dir/train.lock (lib.core.state_io.state_lock): the kernel drops it when its process ends however it ends, so a
killed training's lock is free at once, with no take-over to race and no file to delete."""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

from lib.core.errors import DataError
from lib.core.state_io import lock_holder, state_lock

LOCK_FILE = "train.lock"


@contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold run_dir/train.lock for the duration of the block; refuse at once, naming the holder, when it is held."""
    path = Path(run_dir) / LOCK_FILE
    with ExitStack() as held:
        try:
            held.enter_context(state_lock(path, "training", wait=0))
        except DataError:
            h = lock_holder(path) or {}  # may be empty: the holder writes its name just after it takes the lock
            raise DataError(f"{run_dir} is being trained by process {h.get('pid', '?')} on {h.get('host', '?')} "
                            f"since {h.get('since', '?')} ({path}); wait for it to finish or use another run_dir "
                            "(the lock goes when that process ends, however it ends)") from None
        yield
