"""Photos from a CSV of URLs into the folder layout `{class}/{ID}_{seq}.ext`: parallel, retried, resumable.

A file's name is fixed by its URL before it is fetched (seq is a short hash of the URL; without an ID column the ID
is a longer hash and seq is 1), so a second run knows what it already has from the names alone, and a CSV edited
between runs can never make one URL's file stand in for another's. A file appears under its name only after it
decoded completely (streamed into a hidden temp file, checked with PIL, then renamed), so its presence proves it is
good: nothing is fetched twice, nothing is overwritten, and an interrupted run keeps every file it finished.

Every CSV row ends as one row of the report (REPORT_COLUMNS): downloaded, present (there from an earlier run),
failed (with the reason), or interrupted (not reached before Ctrl-C).
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import os
import re
import shutil
import threading
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

import pandas as pd
from tqdm import tqdm

from lib.core.errors import DataError
from lib.data.images import probe_image

LINK_MODES = ("hard", "symlink", "copy")
REPORT_COLUMNS = ["line", "source", "url", "class", "id", "status", "attempts", "path", "consolidated", "reason"]
# Some photo hosts refuse urllib's default agent; a named one also lets a host's operator see who is asking.
USER_AGENT = "photo-retrieval-download/0.1"
# HTTP answers worth asking again: the server is busy or briefly broken, not saying that the photo is gone.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# MPO is the multi-picture JPEG some cameras write; every JPEG viewer reads it as .jpg.
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
               "TIFF": ".tif", "HEIF": ".heic"}
_CHUNK = 1 << 16
# Path separators and control characters cannot stand in a folder name; leading dots would hide it from the indexer.
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
_MAX_NAME_BYTES = 200  # file systems allow 255 bytes per name; the rest is for "_{seq}.ext" and temp-file affixes


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


@dataclass(frozen=True)
class _Job:
    line: int  # CSV line number (the header is line 1), as a spreadsheet user finds the row
    url: str
    label: str  # the class as the CSV writes it
    folder: str  # the class folder it becomes
    obj_id: str  # the ID part of the file name: the group the indexer reads back
    stem: str  # {ID}_{seq}: the file name without its extension, which only the content decides


class _Failed(Exception):
    def __init__(self, reason: str, retry: bool = False):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def safe_name(raw: str, what: str = "class") -> str:
    """The folder name a class (or source) becomes: blanks around it dropped, path separators and control characters
    turned into '-', leading dots dropped (a hidden folder is skipped by the indexer). DataError when nothing usable
    is left ('', '.', '..') or the name is too long for a file system."""
    name = _UNSAFE.sub("-", raw.strip()).lstrip(".").strip()
    if not name:
        raise DataError(f"{what} {raw!r} cannot be a folder name: nothing is left once path separators, leading dots "
                        "and blanks are removed")
    if len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        raise DataError(f"{what} {raw[:40]!r}... is longer than {_MAX_NAME_BYTES} bytes, too long for a folder name")
    return name


def safe_id(raw: str) -> str:
    """The ID part of a file name: as safe_name, and '_' becomes '-' because the indexer reads the ID up to the first
    '_' of the file name."""
    return safe_name(raw, "ID").replace("_", "-")


def destination(out_dir, config: DownloadConfig) -> Path:
    """The folder this run downloads into: out_dir, or out_dir/{source} when the config names a source."""
    return Path(out_dir) / safe_name(config.source, "source") if config.source else Path(out_dir)


def _failed_row(line: int, cells: dict, reason: str, source: str) -> dict:
    return {"line": line, "source": source, "url": cells.get("url") or "", "class": cells.get("class") or "",
            "id": cells.get("id") or "", "status": "failed", "attempts": 0, "path": "", "consolidated": "",
            "reason": reason}


def _job_row(job: _Job, source: str, status: str, attempts: int = 0, path="", reason: str = "") -> dict:
    return {"line": job.line, "source": source, "url": job.url, "class": job.label, "id": job.obj_id,
            "status": status, "attempts": attempts, "path": str(path), "consolidated": "", "reason": reason}


def _cell_problem(rec: dict, cells: dict, columns: dict) -> str:
    if None in rec:  # csv.DictReader files surplus cells under the key None
        return "more cells than the header has columns (an unquoted comma in a cell?)"
    for role, value in cells.items():
        if value is None:
            return f"missing '{columns[role]}' cell (the line has fewer cells than the header)"
        if not value:
            return f"empty '{columns[role]}' cell"
    parts = urlsplit(cells["url"])
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"'{cells['url']}' is not an http(s) URL"
    return ""


def _check_one_name_each(names: dict[str, dict[str, list[int]]], what: str, csv_path: Path) -> None:
    """Two CSV names that would share one folder (or ID) would silently merge two classes (or objects)."""
    merged = {safe: raws for safe, raws in names.items() if len(raws) > 1}
    if merged:
        safe, raws = next(iter(merged.items()))
        listed = "; ".join(f"{raw!r} on line {lines[0]}" for raw, lines in raws.items())
        raise DataError(f"{csv_path}: {len(merged)} {what} name(s) become one after making them safe for file names, "
                        f"e.g. {listed} all become '{safe}'; rename them in the CSV so they stay distinct")


def _read_url_csv(csv_path, config: DownloadConfig) -> tuple[list[_Job], list[dict]]:
    """(jobs for the usable rows, report rows for the others: missing or empty cells, a bad URL or class name).

    DataError for what no row can survive: an unreadable file, missing columns, or two class (or ID) names that
    would become one folder (or ID)."""
    csv_path = Path(csv_path)
    columns = {"url": config.url_col, "class": config.class_col, **({"id": config.id_col} if config.id_col else {})}
    source = config.source
    jobs, failed = [], []
    names = {"class": defaultdict(lambda: defaultdict(list)), "ID": defaultdict(lambda: defaultdict(list))}
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:  # -sig: Excel writes a BOM before the header
            reader = csv.DictReader(f)
            missing = [c for c in columns.values() if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{csv_path}: no column {', '.join(map(repr, missing))} "
                                f"(its columns: {', '.join(reader.fieldnames or [])})")
            for rec in reader:
                line = reader.line_num
                cells = {role: (None if rec.get(col) is None else rec[col].strip()) for role, col in columns.items()}
                problem = _cell_problem(rec, cells, columns)
                if not problem:
                    try:
                        folder = safe_name(cells["class"])
                        h = hashlib.sha1(cells["url"].encode("utf-8")).hexdigest()
                        obj_id = safe_id(cells["id"]) if config.id_col else h[:12]
                    except DataError as e:
                        problem = str(e)
                if problem:
                    failed.append(_failed_row(line, cells, problem, source))
                    continue
                names["class"][folder][cells["class"]].append(line)
                if config.id_col:
                    names["ID"][obj_id][cells["id"]].append(line)
                stem = f"{obj_id}_{h[:10]}" if config.id_col else f"{obj_id}_1"
                jobs.append(_Job(line, cells["url"], cells["class"], folder, obj_id, stem))
    except OSError as e:
        raise DataError(f"URL list {csv_path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}, line {reader.line_num}: {e}") from None
    _check_one_name_each(names["class"], "class", csv_path)
    _check_one_name_each(names["ID"], "ID", csv_path)
    return jobs, failed


def _where(jobs: list[_Job]) -> str:
    """'a' (line 2), 'b' (lines 5, 7): which classes a URL or ID was listed under, and where."""
    lines = defaultdict(list)
    for j in jobs:
        lines[j.label].append(j.line)
    return ", ".join(f"'{label}' (line{'s' if len(ls) > 1 else ''} {', '.join(map(str, ls))})"
                     for label, ls in lines.items())


def _conflicts(jobs: list[_Job], source: str) -> tuple[list[_Job], list[dict]]:
    """Rows the CSV itself contradicts: a URL or an ID under two classes (every such row fails: which class is right
    is the user's call), and a URL listed again under the same class (the first row is kept)."""
    failed = {}
    by_url = defaultdict(list)
    for j in jobs:
        by_url[j.url].append(j)
    for same in by_url.values():
        if len({j.folder for j in same}) > 1:
            failed |= {j.line: _job_row(j, source, "failed", reason=f"URL listed under classes {_where(same)}")
                       for j in same}
        else:
            failed |= {j.line: _job_row(j, source, "failed", reason=f"duplicate URL: line {same[0].line} has it")
                       for j in same[1:]}
    by_id = defaultdict(list)
    for j in jobs:
        if j.line not in failed:
            by_id[j.obj_id].append(j)
    for same in by_id.values():
        if len({j.folder for j in same}) > 1:
            failed |= {j.line: _job_row(j, source, "failed", reason=f"ID '{j.obj_id}' listed under classes "
                                                                    f"{_where(same)}") for j in same}
    return [j for j in jobs if j.line not in failed], list(failed.values())


@dataclass
class _Folder:
    """What a layout folder already holds: (class folder, file stem) -> path, and ID -> the class folders it is in."""
    files: dict[tuple[str, str], Path]
    classes_of: dict[str, set[str]]

    def add(self, folder: str, stem: str, path: Path) -> None:
        self.files[(folder, stem)] = path
        self.classes_of[stem.partition("_")[0]].add(folder)

    def elsewhere(self, job: _Job) -> set[str]:
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


def _attempt(job: _Job, folder: Path, config: DownloadConfig, stop: threading.Event) -> Path:
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


def _fetch(job: _Job, folder: Path, config: DownloadConfig, stop: threading.Event) -> tuple[Path | None, int, str]:
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


def _place(src: Path, dst: Path, link_mode: str) -> None:
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


def _consolidate(row: dict, job: _Job, target: Path, held: _Folder, link_mode: str) -> dict:
    """The report row after putting the row's file into the consolidated folder (or saying why it could not)."""
    if (job.folder, job.stem) in held.files:
        return row | {"consolidated": str(held.files[(job.folder, job.stem)])}
    if held.elsewhere(job):
        return row | {"status": "failed", "reason": f"{row['status']}, but not consolidated: ID '{job.obj_id}' is "
                      f"already under class {sorted(held.elsewhere(job))} in {target}"}
    src = Path(row["path"])
    dst = target / job.folder / src.name
    try:
        _place(src, dst, link_mode)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(path)
    try:
        pd.DataFrame(rows, columns=REPORT_COLUMNS).to_csv(part, index=False)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


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

    jobs, failed = _read_url_csv(csv_path, config)
    jobs, contradicted = _conflicts(jobs, source)
    report = {row["line"]: row for row in failed + contradicted}
    have = _scan(dest)
    held = _scan(target) if target is not None else None
    todo = []
    for job in jobs:
        if (job.folder, job.stem) in have.files:
            report[job.line] = _job_row(job, source, "present", path=have.files[(job.folder, job.stem)])
        elif have.elsewhere(job):
            report[job.line] = _job_row(job, source, "failed", reason=f"ID '{job.obj_id}' is already downloaded under "
                                        f"class {sorted(have.elsewhere(job))} in {dest}: move or delete those files")
        else:
            report[job.line] = _job_row(job, source, "interrupted", reason="not reached before the run stopped")
            todo.append(job)

    stop = threading.Event()
    futures, recorded = {}, set()

    def record(future) -> None:
        job = futures[future]
        path, attempts, reason = future.result()
        # a download that failed once Ctrl-C was pressed failed because of it, and runs again next time
        status = "downloaded" if path else "interrupted" if stop.is_set() else "failed"
        row = _job_row(job, source, status, attempts, path or "", reason)
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
