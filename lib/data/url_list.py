"""The URL list a download reads: each CSV row checked (an http(s) URL, a class, an ID when the CSV names an ID
column) and given the file name it will have, `{class}/{ID}_{seq}`, fixed by its URL before anything is fetched (seq
is a short hash of the URL; without an ID column the ID is a longer hash and seq is 1); rows the CSV contradicts (a
URL or an ID under two classes, a URL listed twice) fail before any download. Every CSV row ends as one row of the
report (REPORT_COLUMNS).
"""
from __future__ import annotations

import csv
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lib.core.errors import DataError

REPORT_COLUMNS = ["line", "source", "url", "class", "id", "status", "attempts", "path", "consolidated", "reason"]
# Path separators and control characters cannot stand in a folder name; leading dots would hide it from the indexer.
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
_MAX_NAME_BYTES = 200  # file systems allow 255 bytes per name; the rest is for "_{seq}.ext" and temp-file affixes


@dataclass(frozen=True)
class UrlJob:
    """A usable CSV row: the URL to fetch and the file name its photo gets."""
    line: int  # CSV line number (the header is line 1), as a spreadsheet user finds the row
    url: str
    label: str  # the class as the CSV writes it
    folder: str  # the class folder it becomes
    obj_id: str  # the ID part of the file name: the group the indexer reads back
    stem: str  # {ID}_{seq}: the file name without its extension, which only the content decides


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


def failed_row(line: int, cells: dict, reason: str, source: str) -> dict:
    return {"line": line, "source": source, "url": cells.get("url") or "", "class": cells.get("class") or "",
            "id": cells.get("id") or "", "status": "failed", "attempts": 0, "path": "", "consolidated": "",
            "reason": reason}


def job_row(job: UrlJob, source: str, status: str, attempts: int = 0, path="", reason: str = "") -> dict:
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


def read_url_csv(csv_path, url_col: str, class_col: str, id_col: str = "",
                 source: str = "") -> tuple[list[UrlJob], list[dict]]:
    """(jobs for the usable rows, report rows for the others: missing or empty cells, a bad URL or class name).

    DataError for what no row can survive: an unreadable file, missing columns, or two class (or ID) names that
    would become one folder (or ID)."""
    csv_path = Path(csv_path)
    columns = {"url": url_col, "class": class_col, **({"id": id_col} if id_col else {})}
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
                        obj_id = safe_id(cells["id"]) if id_col else h[:12]
                    except DataError as e:
                        problem = str(e)
                if problem:
                    failed.append(failed_row(line, cells, problem, source))
                    continue
                names["class"][folder][cells["class"]].append(line)
                if id_col:
                    names["ID"][obj_id][cells["id"]].append(line)
                stem = f"{obj_id}_{h[:10]}" if id_col else f"{obj_id}_1"
                jobs.append(UrlJob(line, cells["url"], cells["class"], folder, obj_id, stem))
    except OSError as e:
        raise DataError(f"URL list {csv_path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}, line {reader.line_num}: {e}") from None
    _check_one_name_each(names["class"], "class", csv_path)
    _check_one_name_each(names["ID"], "ID", csv_path)
    return jobs, failed


def _where(jobs: list[UrlJob]) -> str:
    """'a' (line 2), 'b' (lines 5, 7): which classes a URL or ID was listed under, and where."""
    lines = defaultdict(list)
    for j in jobs:
        lines[j.label].append(j.line)
    return ", ".join(f"'{label}' (line{'s' if len(ls) > 1 else ''} {', '.join(map(str, ls))})"
                     for label, ls in lines.items())


def conflicts(jobs: list[UrlJob], source: str) -> tuple[list[UrlJob], list[dict]]:
    """Rows the CSV itself contradicts: a URL or an ID under two classes (every such row fails: which class is right
    is the user's call), and a URL listed again under the same class (the first row is kept)."""
    failed = {}
    by_url = defaultdict(list)
    for j in jobs:
        by_url[j.url].append(j)
    for same in by_url.values():
        if len({j.folder for j in same}) > 1:
            failed |= {j.line: job_row(j, source, "failed", reason=f"URL listed under classes {_where(same)}")
                       for j in same}
        else:
            failed |= {j.line: job_row(j, source, "failed", reason=f"duplicate URL: line {same[0].line} has it")
                       for j in same[1:]}
    by_id = defaultdict(list)
    for j in jobs:
        if j.line not in failed:
            by_id[j.obj_id].append(j)
    for same in by_id.values():
        if len({j.folder for j in same}) > 1:
            failed |= {j.line: job_row(j, source, "failed", reason=f"ID '{j.obj_id}' listed under classes "
                                                                   f"{_where(same)}") for j in same}
    return [j for j in jobs if j.line not in failed], list(failed.values())
