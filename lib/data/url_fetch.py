"""Photos from a CSV of URLs into the folder layout `{class}/{ID}_{seq}.ext`: parallel, retried, resumable.

Each file's name comes from its CSV row (lib.data.url_list), so a second run knows what it already has from the names
alone, and a CSV edited between runs can never make one URL's file stand in for another's. A file appears under its
name only after it decoded completely (streamed into a hidden temp file, checked with PIL, then renamed), so its
presence proves it is good: nothing is fetched twice, nothing is overwritten, and an interrupted run keeps every file
it finished.

Every CSV row ends as one row of the report (REPORT_COLUMNS): downloaded, present (there from an earlier run),
failed (with the reason), or interrupted (not reached before Ctrl-C).
"""
from __future__ import annotations

import http.client
import os
import shutil
import threading
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import pandas as pd
from tqdm import tqdm

from lib.core.errors import DataError
from lib.core.state_io import write_csv
from lib.data.images import probe_image
from lib.data.url_list import REPORT_COLUMNS, UrlJob, conflicts, job_row, read_url_csv, safe_name

LINK_MODES = ("hard", "symlink", "copy")
# Some photo hosts refuse urllib's default agent; a named one also lets a host's operator see who is asking.
USER_AGENT = "photo-retrieval-download/0.1"
# HTTP answers worth asking again: the server is busy or briefly broken, not saying that the photo is gone.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# MPO is the multi-picture JPEG some cameras write; every JPEG viewer reads it as .jpg.
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
               "TIFF": ".tif", "HEIF": ".heic"}
_CHUNK = 1 << 16


@dataclass
class DownloadConfig:
    url_col: str = "url"
    class_col: str = "class"
    id_col: str = ""  # empty: every URL is its own object (its ID is a hash of the URL)
    source: str = ""  # set: files go to out_dir/{source}/, so sources stay apart until consolidated
    workers: int = 8  # downloads wait on the network, not the CPU: threads, more of them than cores
    timeout: float = 30.0  # seconds a server may stay silent (connecting, between chunks) before an attempt fails
    retries: int = 3  # further attempts after a timeout, a broken connection or HTTP 408/425/429/5xx
    backoff: float = 1.0  # seconds before the first retry, doubled before each next one
    max_bytes: int = 100 * 2**20  # more is no photo (a video, an archive): refused, not left to fill the disk
    link_mode: str = "hard"  # how consolidate_dir gets each file: hard link (no extra space), symlink or copy

    def __post_init__(self):
        if self.link_mode not in LINK_MODES:
            raise ValueError(f"link_mode={self.link_mode!r}; valid: {', '.join(LINK_MODES)}")
        if self.workers < 1 or self.retries < 0 or self.timeout <= 0 or self.backoff < 0 or self.max_bytes < 1:
            raise ValueError(f"need workers >= 1, retries >= 0, timeout > 0, backoff >= 0, max_bytes >= 1; got {self}")


class _Failed(Exception):
    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def destination(out_dir, config: DownloadConfig) -> Path:
    """The folder this run downloads into: out_dir, or out_dir/{source} when the config names a source."""
    return Path(out_dir) / safe_name(config.source, "source") if config.source else Path(out_dir)


@dataclass
class _Folder:
    """What a layout folder already holds: (class folder, file stem) -> path, and ID -> the class folders it is in."""
    files: dict[tuple[str, str], Path]
    classes_of: dict[str, set[str]]

    def add(self, folder: str, stem: str, path: Path) -> None:
        self.files[(folder, stem)] = path
        self.classes_of[stem.partition("_")[0]].add(folder)

    def elsewhere(self, job: UrlJob) -> set[str]:
        return self.classes_of.get(job.obj_id, set()) - {job.folder}


def _scan(root: Path) -> _Folder:
    found = _Folder({}, defaultdict(set))
    if not root.is_dir():
        return found
    for class_dir in root.iterdir():
        if class_dir.is_dir() and not class_dir.name.startswith("."):
            for p in class_dir.iterdir():
                # hidden: our temp files of an interrupted run; a link counts even if broken (it is not ours to fix)
                if not p.name.startswith(".") and (p.is_file() or p.is_symlink()):
                    found.add(class_dir.name, p.stem, p)
    return found


def _part_path(path: Path) -> Path:
    """A hidden name beside `path` to write to first: the indexer and a re-run skip it, and a rename then makes
    `path` appear whole or not at all."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.part"


def _attempt(job: UrlJob, folder: Path, config: DownloadConfig, stop: threading.Event) -> Path:
    """One GET of job.url, streamed into a hidden temp file beside its final name, renamed once it decodes."""
    request = Request(job.url, headers={"User-Agent": USER_AGENT})
    with urlopen(request, timeout=config.timeout) as response:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > config.max_bytes:
            raise _Failed(f"{declared} bytes, more than max_bytes={config.max_bytes}")
        content_type = response.headers.get_content_type()
        folder.mkdir(parents=True, exist_ok=True)
        part = _part_path(folder / job.stem)
        try:
            with open(part, "xb") as f:
                size = 0
                while chunk := response.read(_CHUNK):
                    if stop.is_set():
                        raise _Failed("interrupted while downloading")
                    size += len(chunk)
                    if size > config.max_bytes:
                        raise _Failed(f"more than max_bytes={config.max_bytes} bytes")
                    f.write(chunk)
            # http.client ends a body that stops short of its Content-Length quietly: catch it here
            if declared.isdigit() and size < int(declared):
                raise _Failed(f"connection broken: {size} of {declared} bytes arrived", retry=True)
            info = probe_image(part)
            if not info.ok:
                said = "" if content_type.startswith("image/") else f" (the server sent {content_type})"
                raise _Failed(f"{info.reason}{said}")
            path = folder / f"{job.stem}{_EXTENSIONS.get(info.format, '.' + info.format.lower())}"
            os.replace(part, path)
            return path
        finally:
            part.unlink(missing_ok=True)


def _fetch(job: UrlJob, folder: Path, config: DownloadConfig, stop: threading.Event) -> tuple[Path | None, int, str]:
    """(path, attempts, "") once downloaded, or (None, attempts, reason) after the last failed attempt."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return _attempt(job, folder, config, stop), attempt, ""
        except _Failed as e:
            reason, retry = e.reason, e.retry
        except HTTPError as e:
            reason, retry = f"HTTP {e.code} {e.reason}", e.code in _RETRY_STATUS
        except TimeoutError:  # no status line in time (urlopen lets this one through unwrapped)
            reason, retry = f"no answer within timeout={config.timeout:g} s", True
        except URLError as e:  # connecting failed (refused, unknown host, timed out)
            timed_out = isinstance(e.reason, TimeoutError)
            reason = f"no answer within timeout={config.timeout:g} s" if timed_out else f"cannot connect: {e.reason}"
            retry = True
        except (http.client.HTTPException, ConnectionError) as e:  # the body stopped short, the server hung up
            reason, retry = f"connection broken: {type(e).__name__} {e}".strip(), True
        if not retry or attempt > config.retries or stop.wait(config.backoff * 2 ** (attempt - 1)):
            return None, attempt, reason


def _link_or_copy(src: Path, dst: Path, link_mode: str) -> None:
    """Put src at dst by link or copy; dst appears whole or not at all, and an existing dst is never replaced."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link_mode == "hard":
        os.link(src, dst)  # creating a link is atomic and fails if dst exists
    elif link_mode == "symlink":
        # relative, so the two folders can move together (to another disk, another machine)
        os.symlink(os.path.relpath(src.resolve(), dst.parent.resolve()), dst)
    else:
        part = _part_path(dst)
        try:
            shutil.copyfile(src, part)
            os.link(part, dst)  # not os.replace: a dst that appeared meanwhile must not be overwritten
        finally:
            part.unlink(missing_ok=True)


def _consolidate(row: dict, job: UrlJob, target: Path, held: _Folder, link_mode: str) -> dict:
    """The report row after putting the row's file into the consolidated folder (or saying why it could not)."""
    if (job.folder, job.stem) in held.files:
        return row | {"consolidated": str(held.files[(job.folder, job.stem)])}
    if held.elsewhere(job):
        return row | {"status": "failed", "reason": f"{row['status']}, but not consolidated: ID '{job.obj_id}' is "
                      f"already under class {sorted(held.elsewhere(job))} in {target}"}
    src = Path(row["path"])
    dst = target / job.folder / src.name
    try:
        _link_or_copy(src, dst, link_mode)
    except OSError as e:
        hint = " (hard links cannot cross file systems: use link_mode 'copy' or 'symlink')" * (link_mode == "hard")
        return row | {"status": "failed", "reason": f"{row['status']}, but not consolidated into {dst}: "
                      f"{e.strerror or e}{hint}"}
    held.add(job.folder, job.stem, dst)
    return row | {"consolidated": str(dst)}


def _check_apart(dest: Path, target: Path) -> None:
    a, b = dest.resolve(), target.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise DataError(f"consolidate folder {target} and download folder {dest} must lie apart: one inside the other "
                        "would make the source folder look like a class")


def _write_report(rows: list[dict], path: Path) -> None:
    write_csv(path, pd.DataFrame(rows, columns=REPORT_COLUMNS))


def _to_fetch(jobs: list[UrlJob], have: _Folder, dest: Path, source: str, report: dict) -> list[UrlJob]:
    """The jobs still to fetch; each job's report row goes into `report` (by line): present, failed (its ID already
    downloaded under another class) or, until its download ends, interrupted."""
    todo = []
    for job in jobs:
        if (job.folder, job.stem) in have.files:
            report[job.line] = job_row(job, source, "present", path=have.files[(job.folder, job.stem)])
        elif have.elsewhere(job):
            report[job.line] = job_row(job, source, "failed", reason=f"ID '{job.obj_id}' is already downloaded under "
                                       f"class {sorted(have.elsewhere(job))} in {dest}: move or delete those files")
        else:
            report[job.line] = job_row(job, source, "interrupted", reason="not reached before the run stopped")
            todo.append(job)
    return todo


def download_from_csv(csv_path, out_dir, config: DownloadConfig | None = None, consolidate_dir=None,
                      report_path=None, progress: bool = False) -> pd.DataFrame:
    """Download every photo the CSV lists into destination(out_dir, config)/{class}/{ID}_{seq}.ext; return the report.

    Files already there are kept and not fetched again. With consolidate_dir, each good file (new or from an earlier
    run, of this source or another) is also put at consolidate_dir/{class}/ by config.link_mode. The report (one row
    per CSV row, REPORT_COLUMNS) is written to report_path (default: download_report.csv in the download folder),
    also when the run is interrupted: rows not reached then say 'interrupted'.
    """
    config = config or DownloadConfig()
    dest = destination(out_dir, config)
    target = Path(consolidate_dir) if consolidate_dir is not None else None
    if target is not None:
        _check_apart(dest, target)
    report_path = Path(report_path) if report_path is not None else dest / "download_report.csv"
    source = config.source

    jobs, failed = read_url_csv(csv_path, config.url_col, config.class_col, config.id_col, source)
    jobs, contradicted = conflicts(jobs, source)
    report = {row["line"]: row for row in failed + contradicted}
    todo = _to_fetch(jobs, _scan(dest), dest, source, report)
    held = _scan(target) if target is not None else None

    stop = threading.Event()
    futures, recorded = {}, set()

    def record(future) -> None:
        job = futures[future]
        path, attempts, reason = future.result()
        # a download that failed once Ctrl-C was pressed failed because of it, and runs again next time
        status = "downloaded" if path else "interrupted" if stop.is_set() else "failed"
        row = job_row(job, source, status, attempts, path or "", reason)
        report[job.line] = _consolidate(row, job, target, held, config.link_mode) if path and held else row
        recorded.add(future)

    pool = ThreadPoolExecutor(config.workers)
    try:
        if held is not None:
            for job in jobs:
                if report[job.line]["status"] == "present":
                    report[job.line] = _consolidate(report[job.line], job, target, held, config.link_mode)
        futures = {pool.submit(_fetch, job, dest / job.folder, config, stop): job for job in todo}
        for future in tqdm(as_completed(futures), total=len(futures), disable=not progress, desc="download"):
            record(future)
    finally:
        # On Ctrl-C: queued rows never start and the ones in flight stop at their next chunk, so the report is
        # written promptly; every file finished is on disk under its final name already.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures.keys() - recorded:
            if future.done() and not future.cancelled() and future.exception() is None:
                record(future)
        _write_report([report[line] for line in sorted(report)], report_path)
    return pd.DataFrame([report[line] for line in sorted(report)], columns=REPORT_COLUMNS)