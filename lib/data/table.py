"""The dataset index: one table, one row per image, built from a folder layout or a metadata CSV, then checked.

Everything downstream reads only this table. Columns: `path` (posix, relative to the data
root), `label`, `group` (the leakage unit), optional `context`, `given_split` (a CSV's ready-made split), `seq`,
`width`, `height`, and any extra columns a CSV brings. Problems that are safe to survive are returned as a
`problems` table (path, problem, action); problems that would make the index wrong raise `DataError`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from lib.core.cpus import map_files
from lib.core.errors import DataError
from lib.data.images import looks_like_image, probe_image

PROBLEM_COLUMNS = ["path", "problem", "action"]
EXCLUSION_COLUMNS = ["group", "label", "path", "reason"]
GROUP_BY = ("id", "file")
MIN_SIZE = 224  # check_images' default floor: EfficientNet's minimum input


def _problems(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=PROBLEM_COLUMNS)


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def _printable_name(rel: Path) -> bool:
    try:
        rel.as_posix().encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(rel: Path) -> str:
    return rel.as_posix().encode("utf-8", "backslashreplace").decode("utf-8")


def _split_name(stem: str, sep: str) -> tuple[str, str] | None:
    head, found, tail = stem.partition(sep)
    if not found or not head:
        return None
    return head, tail


def index_from_folder(data_root: str | os.PathLike, group_by: str = "id", id_sep: str = "_") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read `data_root/{label}/{ID}_{seq}.ext` (files in nested folders under a class count for that class).

    group_by='id': the text before the first `id_sep` is the group, and one ID must not appear under two classes
    (it would be one object with two labels); group_by='file': every file is its own group, for collections whose
    file names carry no object ID (camera names like IMG_0001.jpg) - the user then accepts possible leakage.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by={group_by!r}; valid: {', '.join(GROUP_BY)}")
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (expected {root}/{{class}}/{{ID}}_{{seq}}.jpg)")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        loose = sorted(p.name for p in root.iterdir() if p.is_file())[:5]
        hint = f"; it holds loose files such as {loose}: put each class's photos in a folder named after the class" if loose else ""
        raise DataError(f"data folder {root} has no class folders (expected {root}/{{class}}/{{ID}}_{{seq}}.jpg){hint}")

    rows, problems = [], []
    for class_dir in class_dirs:
        n_before = len(rows)
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() or p.is_symlink()):
            rel = path.relative_to(root)
            if _is_hidden(rel):
                continue
            if not path.exists():
                problems.append({"path": _printable(rel), "problem": "link to a missing file", "action": "file skipped"})
                continue
            if not _printable_name(rel):
                # split files, CSVs and JSON hold names as UTF-8 text; such a name cannot be written there
                problems.append({"path": _printable(rel), "problem": "file name is not valid UTF-8: rename it",
                                 "action": "file skipped"})
                continue
            if not looks_like_image(path):
                problems.append({"path": rel.as_posix(), "problem": "not an image", "action": "file skipped"})
                continue
            parts = _split_name(path.stem, id_sep)
            if group_by == "file":
                group, seq = rel.with_suffix("").as_posix(), ""
            elif parts is None:
                group, seq = path.stem, ""
                problems.append({"path": rel.as_posix(),
                                 "problem": f"name has no '{id_sep}' between ID and sequence (expected {{ID}}{id_sep}{{seq}})",
                                 "action": f"treated as its own group '{group}'"})
            else:
                group, seq = parts
            rows.append({"path": rel.as_posix(), "label": class_dir.name, "group": group, "seq": seq})
        if len(rows) == n_before:
            problems.append({"path": class_dir.relative_to(root).as_posix() + "/", "problem": "class folder has no images",
                             "action": "class left out"})
    if not rows:
        raise DataError(f"data folder {root} has class folders but no images in them")
    index = pd.DataFrame(rows)
    labels_per_group = index.groupby("group")["label"].unique()
    shared = labels_per_group[labels_per_group.map(len) > 1]
    if len(shared):
        examples = "; ".join(f"ID '{g}' in {sorted(ls)}" for g, ls in shared.head(5).items())
        raise DataError(f"{len(shared)} ID(s) appear under more than one class folder in {root} ({examples}). "
                        "An ID names one object, which cannot have two labels: rename the files, or, if file names carry "
                        "no object ID, index with group_by='file'.")
    return index, _problems(problems)


def index_from_csv(csv_path: str | os.PathLike, data_root: str | os.PathLike | None = None, path_col: str = "path",
                   label_col: str = "label", group_col: str | None = None, context_col: str | None = None,
                   split_col: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a metadata CSV whose columns the user names; paths are relative to `data_root` (default: the CSV's folder).

    Without a group column every image is its own group (reported, since near-duplicate photos can then leak).
    Other columns (masks, viewpoint, date) are kept as they are.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"metadata CSV {csv_path} does not exist")
    root = Path(data_root) if data_root is not None else csv_path.parent
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if table.empty:
        raise DataError(f"metadata CSV {csv_path} has no rows")
    named = {"path": path_col, "label": label_col, "group": group_col, "context": context_col,
             "given_split": split_col}
    missing = [f"{role} column '{col}'" for role, col in named.items() if col is not None and col not in table.columns]
    if missing:
        raise DataError(f"{csv_path} lacks the {', '.join(missing)}; its columns are {list(table.columns)}")

    # CSV line numbers (header is line 1) name rows the way a spreadsheet user finds them.
    line = pd.Series(table.index + 2, index=table.index)
    for role in ("path", "label"):
        empty = table[named[role]].str.strip() == ""
        if empty.any():
            raise DataError(f"{csv_path}: empty {role} column '{named[role]}' on line(s) {line[empty].head(10).tolist()}")

    # Columns that already use a contract name but are not the one the user chose are kept under another name.
    chosen = {col for col in named.values() if col is not None}
    clashing = {c: f"{c}_csv" for c in named if c in table.columns and c not in chosen}
    out = table.rename(columns=clashing).rename(columns={col: role for role, col in named.items() if col is not None})
    out["path"] = out["path"].str.strip().str.replace("\\", "/", regex=False)
    out["path"] = [_relative_to(p, root) for p in out["path"]]

    problems = []
    dup = out.duplicated("path", keep=False)
    if dup.any():
        conflicting = out[dup].groupby("path").filter(lambda rows: len(rows.drop_duplicates()) > 1)
        if len(conflicting):
            p = conflicting["path"].iloc[0]
            raise DataError(f"{csv_path}: '{p}' is listed on lines {line[out['path'] == p].tolist()} with different values; "
                            "one image can have only one row")
        for p, rows in out[dup].groupby("path"):
            problems.append({"path": p, "problem": f"duplicate row on lines {line[rows.index].tolist()}",
                             "action": "first row kept"})
        out = out.drop_duplicates("path")
    if group_col is None:
        out["group"] = out["path"]
        problems.append({"path": csv_path.name, "problem": "no group column named: every image is its own group",
                         "action": "photos of one object may land in different splits"})
    return out.reset_index(drop=True), _problems(problems)


def _relative_to(path: str, root: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        try:
            return p.relative_to(root).as_posix()
        except ValueError:
            return p.as_posix()
    return p.as_posix()


def _probe(args: tuple[str, int]):
    return probe_image(args[0], min_size=args[1])


def check_images(index: pd.DataFrame, data_root: str | os.PathLike, min_size: int = MIN_SIZE,
                 workers: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Probe every image; a missing, unreadable, truncated or undersized file excludes its whole group,
    so that no group is split between what is kept and what is not.

    Returns (kept index with `width`/`height` as displayed after EXIF rotation, exclusions with one row per image
    left out and the reason). Runs the probes in parallel processes: decoding dominates on real collections.
    """
    root = Path(data_root)
    jobs = [(str(root / p), min_size) for p in index["path"]]
    infos = map_files(_probe, jobs, workers)
    checked = index.assign(width=[i.width for i in infos], height=[i.height for i in infos],
                           _reason=[("" if i.ok else i.reason) for i in infos])
    bad = checked[checked["_reason"] != ""]
    bad_groups = set(bad["group"])
    cause = {g: f"group member {rows['path'].iloc[0]}: {rows['_reason'].iloc[0]}" for g, rows in bad.groupby("group")}
    excluded = checked[checked["group"].isin(bad_groups)]
    reasons = [r if r else cause[g] for r, g in zip(excluded["_reason"], excluded["group"])]
    exclusions = pd.DataFrame({"group": excluded["group"], "label": excluded["label"], "path": excluded["path"],
                               "reason": reasons}, columns=EXCLUSION_COLUMNS).reset_index(drop=True)
    kept = checked[~checked["group"].isin(bad_groups)].drop(columns="_reason").reset_index(drop=True)
    if kept.empty:
        sizes = checked[["width", "height"]].min(axis=1)
        raise DataError(f"every image group in {root} was excluded ({len(exclusions)} images; e.g. "
                        f"{exclusions['path'].iloc[0]}: {exclusions['reason'].iloc[0]}). Median image side is "
                        f"{int(sizes.median())} px: if the photos are small by nature, lower min_size (now {min_size}).")
    kept[["width", "height"]] = kept[["width", "height"]].astype(int)
    return kept, exclusions
