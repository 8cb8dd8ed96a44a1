"""Group-aware, stratified train/val/test splits, written once and reused by every experiment.

Rules, in priority order: (1) a group never straddles two splits; (2) every class is in train, so the gallery
knows it; (3) each class's images are shared out close to the ratios. Classes with too few groups for every
split are handled the same way everywhere and reported:
  1 group  -> train only (the gallery keeps the class; it cannot be evaluated);
  2 groups -> train + val (model selection sees it; the test split does not);
  3+       -> at least one group in each split, the rest by ratio.
When that leaves the totals (by images) more than `ratio_tol` off the asked ratios, as on long-tailed data with many
2-3 group classes, groups move back until they are within it: first from classes with groups to spare in the over-full
split, so larger classes give more to train; only then the one val/test group of small classes, keeping each
evaluated in the other split where it can be. The report gives the asked and the achieved ratios.
A group whose images carry several labels (an encounter with two animals) follows its most common label.

Open sets (mode 'open', and the val carved for a 'given' CSV without one) break rule (2) on purpose for a share of
the individuals: `unknown_share` of the val/test individuals are held out whole, so val and test queries mix known
individuals (other encounters in train, the gallery) with unknown ones (wildlife-datasets' open-set split, counted
in individuals). `unknown_individuals.json` and the report list them; splits written before have neither.
The assignment itself lives in lib.data.split_assign, the report in lib.data.split_report.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lib.core.errors import DataError
from lib.core.state_io import write_csv, write_json, write_text
from lib.data.split_assign import SPLITS, group_table, split_fingerprint
from lib.data.split_modes import DEFAULT_RATIO_TOL, DEFAULT_UNKNOWN_SHARE, MODES, assign_groups, split_mode
from lib.data.split_report import report_markdown, split_report

SPLIT_FILES = {s: f"{s}_ids.json" for s in SPLITS}
UNKNOWN_FILE = "unknown_individuals.json"


@dataclass
class SplitConfig:
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 42
    n_folds: int = 0  # >1: also write K train/val folds around the fixed test split (k-fold cross-validation)
    mode: str = "group"  # a name in lib.data.split_modes.MODES: group | time | open | given
    time_col: str = ""  # mode='time': the index column to order groups by (a date or any sortable value)
    # group/time: how far each split's share of images may stray from `ratios` before groups are moved to hold it
    ratio_tol: float = DEFAULT_RATIO_TOL
    # open-set modes (open/given): share of the val/test individuals with no photo in train (1: identity-disjoint,
    # every individual in one split); None: DEFAULT_UNKNOWN_SHARE there, 0 in the others
    unknown_share: float | None = None

    def __post_init__(self):
        mode = split_mode(self.mode)
        mode.check(self)
        self.ratios = tuple(float(r) for r in self.ratios)
        if len(self.ratios) != 3 or min(self.ratios) < 0 or abs(sum(self.ratios) - 1) > 1e-6 or self.ratios[0] == 0:
            raise ValueError(f"ratios must be three non-negative numbers summing to 1 with train > 0, got {self.ratios}")
        if not 0 <= self.ratio_tol < 1:
            raise ValueError(f"ratio_tol must be in [0, 1), got {self.ratio_tol}")
        if self.unknown_share is None:
            self.unknown_share = DEFAULT_UNKNOWN_SHARE if mode.open_set else 0.0
        self.unknown_share = float(self.unknown_share)
        if not 0 <= self.unknown_share <= 1:
            raise ValueError(f"unknown_share must be in [0, 1], got {self.unknown_share}")
        if self.unknown_share and not mode.open_set:
            raise ValueError(f"unknown_share applies to split modes {open_set_modes()}, not {self.mode!r}")


def open_set_modes() -> tuple[str, ...]:
    """The split modes that can hold individuals out of train (and so take unknown_share)."""
    return tuple(name for name, mode in MODES.items() if mode.open_set)


@dataclass
class Splits:
    groups: dict[str, list[str]]            # split name -> sorted group IDs
    class_to_idx: dict[str, int]
    report: dict = field(default_factory=dict)
    folds: list[dict[str, list[str]]] = field(default_factory=list)
    # val/test -> the individuals with no photo in train ({}: split files written before these were recorded)
    unknown: dict[str, list[str]] = field(default_factory=dict)


def data_fingerprint(index: pd.DataFrame) -> str:
    """Hash of what a split depends on: each kept image's path, label, group and size, in a fixed order."""
    cols = [c for c in ("path", "label", "group", "width", "height") if c in index.columns]
    rows = index[cols].astype(str).sort_values("path").itertuples(index=False, name=None)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(("\x1f".join(row) + "\n").encode())
    return digest.hexdigest()


def index_split_fingerprint(index: pd.DataFrame) -> str:
    """split_fingerprint of a split index (its `split` column, a fold's train/val where load_split_index applied
    one): what a checkpoint records of the split it trained on."""
    placed = index.loc[index["split"] != "", ["group", "split"]].drop_duplicates()
    return split_fingerprint({s: rows["group"].tolist() for s, rows in placed.groupby("split")})


def class_to_idx(index: pd.DataFrame) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted(index["label"].unique()))}


def split_groups(index: pd.DataFrame, cfg: SplitConfig) -> dict[str, list[str]]:
    """Split name -> sorted group IDs, each group placed by cfg.mode's record (lib.data.split_modes)."""
    where = assign_groups(index, cfg)
    return {s: sorted(g for g, w in where.items() if w == s) for s in SPLITS}


def kfold_groups(index: pd.DataFrame, test_groups: list[str], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """K train/val folds over the non-test groups (StratifiedGroupKFold); the test split stays fixed."""
    table = group_table(index)
    pool = index[~index["group"].isin(set(test_groups))]
    counts = group_table(pool)["label"].value_counts()
    too_few = counts[counts < n_folds]
    if len(too_few):
        # sklearn only warns here; a class missing from some folds' val is worth saying, not fatal.
        print(f"note: {len(too_few)} class(es) have fewer than {n_folds} groups outside test and miss some folds' val: "
              f"{list(too_few.index[:5])}")
    group_label = dict(zip(table["group"], table["label"]))
    folds = []
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    y = pool["group"].map(group_label)
    for train_idx, val_idx in cv.split(pool, y, groups=pool["group"]):
        folds.append({"train": sorted(pool["group"].iloc[train_idx].unique()),
                      "val": sorted(pool["group"].iloc[val_idx].unique())})
    return folds


def write_splits(splits_dir: str | os.PathLike, splits: Splits, index: pd.DataFrame, exclusions: pd.DataFrame | None) -> None:
    d = Path(splits_dir)
    (d / "folds").mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        write_json(d / SPLIT_FILES[s], splits.groups[s])
    write_json(d / "class_to_idx.json", splits.class_to_idx)
    write_json(d / "split_report.json", splits.report)
    write_json(d / UNKNOWN_FILE, splits.unknown)
    write_text(d / "split_report.md", report_markdown(splits.report))
    for i, fold in enumerate(splits.folds):
        for s in ("train", "val"):
            write_json(d / "folds" / f"fold{i}_{s}_ids.json", fold[s])
    write_csv(d / "index.csv", assign_splits(index, splits.groups))
    write_csv(d / "exclusions.csv",
              exclusions if exclusions is not None else pd.DataFrame(columns=["group", "label", "path", "reason"]))


def read_splits(splits_dir: str | os.PathLike) -> Splits:
    d = Path(splits_dir)
    try:
        groups = {s: json.loads((d / SPLIT_FILES[s]).read_text()) for s in SPLITS}
        c2i = json.loads((d / "class_to_idx.json").read_text())
        report = json.loads((d / "split_report.json").read_text())
    except FileNotFoundError as e:
        raise DataError(f"split folder {d} is incomplete: {Path(e.filename).name} is missing; run notebook 01 "
                        "(or delete the folder and split again)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"split file in {d} is not valid JSON ({e}); it was edited or cut short") from None
    folds = []
    i = 0
    while (d / "folds" / f"fold{i}_train_ids.json").exists():
        folds.append({s: json.loads((d / "folds" / f"fold{i}_{s}_ids.json").read_text()) for s in ("train", "val")})
        i += 1
    unknown = json.loads((d / UNKNOWN_FILE).read_text()) if (d / UNKNOWN_FILE).exists() else {}
    return Splits(groups, c2i, report, folds, unknown)


def _mismatch(index: pd.DataFrame, old: Splits, fingerprint: str) -> str:
    known = {g for gs in old.groups.values() for g in gs}
    now = set(index["group"])
    added, removed = sorted(now - known), sorted(known - now)
    parts = [f"fingerprint {old.report.get('data_fingerprint', '?')[:12]} -> {fingerprint[:12]}"]
    if added:
        parts.append(f"{len(added)} group(s) not in any split (e.g. {added[:3]})")
    if removed:
        parts.append(f"{len(removed)} split group(s) no longer in the data (e.g. {removed[:3]})")
    if not added and not removed:
        parts.append("same groups, but images, labels or sizes changed")
    return "; ".join(parts)


def _stored_config(report: dict) -> dict:
    """The config split files were made with; a setting they predate was made with its default value (and
    unknown_share with what the mode did before it existed)."""
    stored = report.get("config", {})
    mode = stored.get("mode", SplitConfig.mode)
    defaults = {**json.loads(json.dumps(asdict(SplitConfig()))), "unknown_share": split_mode(mode).unknown_share_before}
    return {**defaults, **stored}


def prepare_splits(index: pd.DataFrame, splits_dir: str | os.PathLike, cfg: SplitConfig | None = None,
                   exclusions: pd.DataFrame | None = None, fresh: bool = False, min_size: int | None = None) -> Splits:
    """Reuse the split files in `splits_dir` when they match `index`; write them when there are none. `min_size`
    (the floor check_images applied) goes into the split report, for prediction to flag smaller photos.

    Existing files made from other data (or another seed/ratio) are an error unless fresh=True, which moves them into
    `splits_dir/replaced-<time>/` rather than deleting them.
    """
    cfg = cfg or SplitConfig()
    d = Path(splits_dir)
    fingerprint = data_fingerprint(index)
    if (d / SPLIT_FILES["train"]).exists():
        old = read_splits(d)
        old_config = _stored_config(old.report)
        same_config = old_config == json.loads(json.dumps(asdict(cfg)))
        if not fresh:
            if old.report.get("data_fingerprint") != fingerprint:
                raise DataError(f"split files in {d} were made from other data ({_mismatch(index, old, fingerprint)}). "
                                "Use the data they were made for, or split again with fresh=True "
                                "(the old files are kept in a replaced-* folder).")
            if not same_config:
                raise DataError(f"split files in {d} were made with {old_config}, not {asdict(cfg)}; "
                                "pass the same settings, or fresh=True to split again")
            return old
        backup = d / f"replaced-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        backup.mkdir()
        for p in list(d.iterdir()):
            if p.is_file() or p.name == "folds":
                shutil.move(str(p), backup / p.name)
    groups = split_groups(index, cfg)
    folds = kfold_groups(index, groups["test"], cfg.n_folds, cfg.seed) if cfg.n_folds > 1 else []
    report = split_report(index, groups, cfg, exclusions, fingerprint, min_size)
    splits = Splits(groups, class_to_idx(index), report, folds, report["unknown_individuals"])
    write_splits(d, splits, index, exclusions)
    return splits


def assign_splits(index: pd.DataFrame, groups: dict[str, list[str]]) -> pd.DataFrame:
    """The index with a `split` column; a group in two splits is an error (the files were edited by hand)."""
    split_of: dict[str, str] = {}
    for s, gs in groups.items():
        for g in gs:
            if split_of.setdefault(g, s) != s:
                raise DataError(f"group '{g}' is listed in both {split_of[g]} and {s} split files")
    return index.assign(split=index["group"].map(split_of).fillna(""))


def load_split_index(splits_dir: str | os.PathLike, fold: int | None = None) -> tuple[pd.DataFrame, Splits]:
    """The checked index saved with the splits, with its `split` column (train/val from `fold` when given)."""
    d = Path(splits_dir)
    splits = read_splits(d)
    index = pd.read_csv(d / "index.csv", dtype={"path": str, "label": str, "group": str}, keep_default_na=False)
    if data_fingerprint(index) != splits.report.get("data_fingerprint"):
        raise DataError(f"{d / 'index.csv'} does not match the split report's data fingerprint; it was edited. "
                        "Run notebook 01 with fresh=True to rebuild")
    groups = dict(splits.groups)
    if fold is not None:
        if not 0 <= fold < len(splits.folds):
            raise DataError(f"fold {fold} requested but {d} holds {len(splits.folds)} folds")
        groups.update(splits.folds[fold])
    return assign_splits(index.drop(columns="split", errors="ignore"), groups), splits
