"""The one way state a user keeps (run folders, caches, indexes) is written and locked.

- Every file is written to a temp name unique to the writer (pid + random) in the same folder, flushed, fsynced and
  renamed over the old one: a reader sees the old file or the new one whole, and two writers never share a temp file.
- An artefact of several files (a gallery index) names each file's sha256 in a manifest written last: a kill between
  its files leaves a manifest that no longer matches, which `manifest_problem` reports so the reader rebuilds.
- Writers of the same state hold `state_lock`, an `fcntl.flock` on a lock file that the kernel drops when its
  process dies: no stale-lock take-over to get wrong. Reads take no lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import socket
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

from lib.core.errors import DataError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a folder that cannot be opened for reading (some network mounts): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Yield a file opened on a temp name beside `path`; when the block ends without an exception the file is
    fsynced and renamed onto `path`, otherwise the temp file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_csv(path: str | os.PathLike, table, **to_csv) -> Path:
    """A pandas table as CSV (index=False unless given)."""
    to_csv.setdefault("index", False)
    with atomic_file(path, "w") as f:
        table.to_csv(f, **to_csv)
    return Path(path)


def save_npz(path: str | os.PathLike, **arrays) -> Path:
    """np.savez through a file object (so numpy does not append a second .npz to the temp name)."""
    import numpy as np

    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_bytes_hashed(path: str | os.PathLike) -> tuple[bytes, str]:
    """A file's bytes and their sha256 from one read: the hash names exactly what was read, even if the file is
    replaced a moment later."""
    data = Path(path).read_bytes()
    return data, bytes_sha256(data)


# ---- manifests: several files that are valid only together ------------------------------------------------------

def write_manifest(folder: str | os.PathLike, name: str, files: list[str], info: dict) -> Path:
    """Write `name` (JSON) last, naming the sha256 and size of each file in `files` (already written in `folder`)
    beside `info`; `manifest_problem` later checks that the files are still those."""
    folder = Path(folder)
    hashes = {f: {"sha256": file_sha256(folder / f), "bytes": (folder / f).stat().st_size} for f in files}
    return write_json(folder / name, {**info, "files": hashes})


def read_manifest(folder: str | os.PathLike, name: str) -> dict | None:
    """The manifest's content, or None when it is missing or unreadable (a reader then treats the artefact as
    absent and rebuilds it)."""
    path = Path(folder) / name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def manifest_fault(folder: str | os.PathLike, manifest: dict | None, check_hash: bool = True) -> tuple[str, str]:
    """('', '') when every file the manifest names is there with its recorded size (and hash), else (the file that
    is wrong, '' for the manifest itself; what is wrong with it)."""
    if manifest is None:
        return "", "its manifest is missing or unreadable"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "", "its manifest names no files (written by an older version, or torn)"
    folder = Path(folder)
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return name, "is missing"
        if path.stat().st_size != want.get("bytes"):
            return name, f"is {path.stat().st_size} bytes, its manifest says {want.get('bytes')} (torn or replaced)"
        if check_hash and file_sha256(path) != want.get("sha256"):
            return name, "does not match the sha256 its manifest records (replaced or torn)"
    return "", ""


def manifest_problem(folder: str | os.PathLike, manifest: dict | None, check_hash: bool = True) -> str:
    """'' when every file the manifest names is there with its recorded size (and hash), else what is wrong, in a
    line that names the file (manifest_fault)."""
    return " ".join(part for part in manifest_fault(folder, manifest, check_hash) if part)


# ---- locks ------------------------------------------------------------------------------------------------------

def lock_holder(path: str | os.PathLike) -> dict | None:
    """What the holder of the lock file at `path` wrote of itself (pid, host, what, since); {} when it has not written
    yet (it does so just after taking the lock), None when the file cannot be read."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _holder_text(path: Path) -> str:
    holder = lock_holder(path)
    if holder is None:
        return "another process"
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('what', '?')}, since "
            f"{holder.get('since', '?')})")


@contextmanager
def state_lock(path: str | os.PathLike, what: str, wait: float | None = None):
    """Hold an exclusive lock on `path` (a lock file, created if missing and never deleted) for the block.

    `wait=None` waits as long as it takes (a second writer queues behind the first, saying so once); a number waits
    that many seconds and then raises a DataError naming the holder; 0 refuses at once. The kernel releases the
    lock when its process ends, however it ends, so a killed writer never leaves a lock to clean up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder_text(path)
                if wait is not None and time.monotonic() - start >= wait:
                    raise DataError(f"{path} is held by {holder}: {what} waits for it. Wait until it finishes and "
                                    "run again (the lock goes when its process ends)") from None
                if not said:
                    print(f"waiting for {path}: held by {holder}")
                    said = True
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---- caches: never fatal ------------------------------------------------------------------------------------------

_SAID: set[str] = set()


def say_once(key: str, message: str) -> None:
    """Print `message` the first time `key` is seen in this process (a cache folder that cannot be written is
    reported once, not per file)."""
    if key not in _SAID:
        _SAID.add(key)
        print(message)


# what reading a torn, truncated or foreign file raises (np.load of a cut-short .npz: BadZipFile or EOFError)
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def read_cache(path: str | os.PathLike, read):
    """`read(path)` of a cache file; None when there is none, or when it cannot be read (torn by a kill, cut short,
    written by another version), said in one line, so that the caller computes it again and rewrites it."""
    path = Path(path)
    try:
        if not path.is_file():
            return None
        return read(path)
    except READ_ERRORS as e:
        say_once(f"torn:{path}:{e}", f"note: cache file {path} cannot be read ({type(e).__name__}: {e}); computing "
                                     "it again")
        return None


def read_json_cache(path: str | os.PathLike) -> dict:
    """The JSON object a cache file holds; {} when there is none or it cannot be read (read_cache) or is not one."""
    table = read_cache(path, lambda p: json.loads(p.read_text(encoding="utf-8")))
    return table if isinstance(table, dict) else {}


def try_write_cache(path: str | os.PathLike, write, *args, **kwargs) -> bool:
    """Call `write(path, *args, **kwargs)` (one of this module's writers); a cache folder that cannot be written
    (read-only, full, a file where a folder should be) is said once and the job goes on without the cache."""
    try:
        write(path, *args, **kwargs)
        return True
    except OSError as e:
        say_once(f"cache:{Path(path).parent}", f"note: cache {Path(path).parent} cannot be written ({e}); "
                                              "working on without caching there")
        return False


RUN_STATE_LOCK = "state.lock"  # in a run folder: enrolment, gallery index and thresholds writers (not training's)


def run_state_lock(run_dir: str | os.PathLike, what: str, wait: float | None = None):
    """The short lock every writer of a run's evaluation-side state (enrolment, the saved gallery index, thresholds)
    holds while it reads, changes and writes that state; training keeps its own train.lock, so a run can be
    evaluated while it trains."""
    return state_lock(Path(run_dir) / RUN_STATE_LOCK, what, wait)
