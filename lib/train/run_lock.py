"""One writer per run folder: a second training started on a run_dir that one is already writing would interleave
their checkpoints, so it refuses, naming the first one's process and start time. A lock left by a killed process
(its process is gone) is taken over."""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from lib.core.errors import DataError

LOCK_FILE = "train.lock"


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs; a lock from another machine counts as held (there is no asking it)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


@contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold run_dir/train.lock for the duration of the block."""
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _dt.datetime.now().isoformat(timespec="seconds")}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):  # written half by a process killed between open and write
                holder = {"pid": -1, "host": socket.gethostname(), "started": "?"}
            if holder.get("pid", -1) > 0 and _alive(holder):
                raise DataError(f"{run_dir} is being trained by process {holder['pid']} on {holder.get('host')} since "
                                f"{holder.get('started')} ({path}); wait for it to finish or use another run_dir. If "
                                "that process is gone (another machine's cannot be checked), delete the lock file")
            print(f"taking over {path}: its process {holder.get('pid')} (started {holder.get('started')}) is gone")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
