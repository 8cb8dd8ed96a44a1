"""Decode once: a folder of small JPEGs mirroring the data root, so training never decodes a 12-megapixel photo again.

Layout: `cache_dir/<rel path with suffix .jpg>` plus `cache_dir/manifest.json`. The settings are NOT part of the
folder name: the cache for a rel path is always `cache_path(cache_dir, rel)`, so readers need no other knob; the
manifest records per file the source's size and mtime_ns and the settings (size, mode, draft, quality) it was built
with, and a file whose source or settings changed is rebuilt in place. Keep caches of other sizes in other folders
(e.g. cache/480 and cache/224).
"""

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from lib.core.cpus import usable_cpus
from lib.core.errors import DataError
from lib.core.state_io import atomic_file, read_json_cache, say_once, try_write_cache, write_text
from lib.data.images import UnreadableImage, check_resize, load_resized

MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
# An interrupted build loses at most this much finished work: the manifest is rewritten this often.
_FLUSH_SECONDS = 30.0


@dataclass
class CacheReport:
    written: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (rel path, reason)
    unwritable: str = ""  # why the cache folder could not be written (the build stopped there), else ""


@dataclass(frozen=True)
class _Settings:
    size: int
    mode: str
    draft: bool
    quality: int


def cache_path(cache_dir, rel_path) -> Path:
    """Where the cached copy of data-root-relative `rel_path` lives: same relative path, suffix `.jpg`."""
    rel = PurePosixPath(rel_path)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{rel_path}: image paths must be relative to the data root and stay inside it")
    return Path(cache_dir) / rel.with_suffix(".jpg")


def _load_manifest(cache_dir: Path) -> dict:
    """The manifest's entries; none (every file rebuilt) when it is missing, torn (said once) or of another version."""
    manifest = read_json_cache(cache_dir / MANIFEST)
    if manifest.get("version") != _MANIFEST_VERSION:
        return {}
    return manifest.get("entries") or {}


def fresh_copies(data_root, rel_paths, cache_dir) -> list[Path]:
    """What to read for each of `rel_paths`: its cached copy where the manifest records it was built from the source
    as it is now (same size and mtime_ns), else the source itself. A photo replaced since the cache was built is so
    read, and fingerprints over these paths change, instead of the old copy standing in for it unnoticed. A source
    that is gone leaves its copy unverifiable: the source path is given, and whoever reads it says it is missing."""
    data_root, cache_dir = Path(data_root), Path(cache_dir)
    entries, out, changed = _load_manifest(cache_dir), [], 0
    for rel in rel_paths:
        src, entry = data_root / rel, entries.get(rel)
        try:
            st = src.stat() if isinstance(entry, dict) else None
        except OSError:
            st = None
        if st is not None and (entry.get("src_size"), entry.get("src_mtime_ns")) == (st.st_size, st.st_mtime_ns):
            dst = cache_path(cache_dir, rel)
            if dst.exists():
                out.append(dst)
                continue
        changed += st is not None
        out.append(src)
    if changed:
        say_once(f"resize-stale:{cache_dir}", f"note: {changed} photo(s) changed since the resize cache {cache_dir} "
                 "was built; reading their originals (data_prep/resize_cache.py brings the cache up to date)")
    return out


def _save_manifest(cache_dir: Path, entries: dict) -> None:
    text = json.dumps({"version": _MANIFEST_VERSION, "entries": entries}, indent=0, sort_keys=True)
    try_write_cache(cache_dir / MANIFEST, write_text, text)


def _check_collisions(rel_paths: list[str], cache_dir: Path) -> dict[str, Path]:
    targets, owner = {}, {}
    for rel in rel_paths:
        dst = cache_path(cache_dir, rel)
        if dst in owner:
            raise DataError(f"{owner[dst]} and {rel} would both be cached as {dst}; rename one of them")
        owner[dst], targets[rel] = rel, dst
    return targets


def _resize_one(task) -> tuple[str, str | None]:
    """(rel, None) when written, (rel, reason) for an image that cannot be read; a process-pool worker."""
    rel, src, dst, s = task
    try:
        im = load_resized(src, s.size, s.mode, s.draft)
    except UnreadableImage as e:
        return rel, e.reason
    with atomic_file(dst) as f:  # an OSError here (the cache cannot be written) ends build_cache's loop
        im.save(f, "JPEG", quality=s.quality)
    return rel, None


# 9 parameters: what to cache (3) beside the cache's settings (6), each one flag of data_prep/resize_cache.py and
# keyword-only in practice; a settings object would only repack that command's namespace.
def build_cache(
    data_root,
    rel_paths,
    cache_dir,
    size: int = 480,
    mode: str = "shorter",
    draft: bool = True,
    workers: int | None = None,
    quality: int = 95,
    progress: bool = False,
) -> CacheReport:
    """Bring `cache_dir` up to date for `rel_paths` (relative to data_root); only new or changed files are decoded.

    Unreadable images are listed in the report's `failed` and skipped; two paths that would share one cache file
    raise DataError before anything is written. workers > 1 decodes in that many processes (default: all cores).
    The settings are recorded in the manifest, not in the folder name (see the module docstring).
    """
    check_resize(size, mode)  # before any work, not once per file in the workers
    data_root, cache_dir = Path(data_root), Path(cache_dir)
    settings = _Settings(size, mode, draft, quality)
    targets = _check_collisions(list(dict.fromkeys(rel_paths)), cache_dir)
    entries = _load_manifest(cache_dir)
    report, todo, stamps = CacheReport(), [], {}
    for rel, dst in targets.items():
        src = data_root / rel
        try:
            st = src.stat()
        except OSError as e:
            report.failed.append((rel, f"cannot read file: {e.strerror or e}"))
            continue
        stamps[rel] = {"src_size": st.st_size, "src_mtime_ns": st.st_mtime_ns, **asdict(settings)}
        if entries.get(rel) == stamps[rel] and dst.exists():
            report.reused += 1
        else:
            todo.append((rel, src, dst, settings))

    workers = workers if workers is not None else usable_cpus()
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(todo) > 1 else None
    results = pool.map(_resize_one, todo, chunksize=4) if pool else map(_resize_one, todo)
    last_flush = time.monotonic()
    try:
        for rel, reason in tqdm(results, total=len(todo), disable=not progress, desc="resize cache"):
            if reason is None:
                report.written += 1
                entries[rel] = stamps[rel]
            else:
                report.failed.append((rel, reason))
                # the source changed into something unreadable: its old cached copy must not stand in for it
                entries.pop(rel, None)
                targets[rel].unlink(missing_ok=True)
            if time.monotonic() - last_flush > _FLUSH_SECONDS:
                _save_manifest(cache_dir, entries)
                last_flush = time.monotonic()
    except OSError as e:  # never fatal: the photos missing from the cache are read from the data root
        say_once(f"cache:{cache_dir}", f"note: resize cache {cache_dir} cannot be written ({e}); the photos it "
                                       "lacks are read from the data root")
        report.unwritable = str(e)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        if todo:
            _save_manifest(cache_dir, entries)
    report.failed.sort()
    return report
