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
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import heapq
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from lib.core.errors import DataError

SPLITS = ("train", "val", "test")
SPLIT_FILES = {s: f"{s}_ids.json" for s in SPLITS}


SPLIT_MODES = ("group", "time", "open", "given")
GIVEN_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "query": "test"}


@dataclass
class SplitConfig:
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 42
    n_folds: int = 0  # >1: also write K train/val folds around the fixed test split (k-fold cross-validation)
    # group: groups shared out per label (classification; closed-set re-ID when label = individual)
    # time:  the same, but each label's groups in time order: earliest to train, latest to test (closed-set re-ID)
    # open:  whole labels shared out, so val/test individuals are never seen in training (open-set re-ID)
    # given: the CSV's own split column (`given_split`); val carved from train by groups when the CSV has none
    mode: str = "group"
    time_col: str = ""  # mode='time': the index column to order groups by (a date or any sortable value)
    # group/time: how far each split's share of images may stray from `ratios` before groups are moved to hold it
    ratio_tol: float = 0.03

    def __post_init__(self):
        if self.mode not in SPLIT_MODES:
            raise ValueError(f"split mode {self.mode!r}; valid: {', '.join(SPLIT_MODES)}")
        if self.mode == "time" and not self.time_col:
            raise ValueError("mode='time' needs time_col: the index column holding each photo's date or order")
        self.ratios = tuple(float(r) for r in self.ratios)
        if len(self.ratios) != 3 or min(self.ratios) < 0 or abs(sum(self.ratios) - 1) > 1e-6 or self.ratios[0] == 0:
            raise ValueError(f"ratios must be three non-negative numbers summing to 1 with train > 0, got {self.ratios}")
        if not 0 <= self.ratio_tol < 1:
            raise ValueError(f"ratio_tol must be in [0, 1), got {self.ratio_tol}")


@dataclass
class Splits:
    groups: dict[str, list[str]]            # split name -> sorted group IDs
    class_to_idx: dict[str, int]
    report: dict = field(default_factory=dict)
    folds: list[dict[str, list[str]]] = field(default_factory=list)


def data_fingerprint(index: pd.DataFrame) -> str:
    """Hash of what a split depends on: each kept image's path, label, group and size, in a fixed order."""
    cols = [c for c in ("path", "label", "group", "width", "height") if c in index.columns]
    rows = index[cols].astype(str).sort_values("path").itertuples(index=False, name=None)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(("\x1f".join(row) + "\n").encode())
    return digest.hexdigest()


def class_to_idx(index: pd.DataFrame) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted(index["label"].unique()))}


def group_table(index: pd.DataFrame) -> pd.DataFrame:
    """One row per group: its label (most common, ties by name), image count and whether its labels disagree."""
    counts = index.groupby(["group", "label"]).size().rename("n").reset_index()
    counts = counts.sort_values(["group", "n", "label"], ascending=[True, False, True])
    table = counts.groupby("group").agg(label=("label", "first"), n_images=("n", "sum"), n_labels=("label", "size"))
    return table.reset_index()


def _assign_class(groups: pd.DataFrame, ratios: tuple[float, ...], rng: np.random.Generator) -> dict[str, str]:
    """Greedy: biggest groups first (shuffled among equals), each to the split furthest below its share of images."""
    order = groups.iloc[rng.permutation(len(groups))].sort_values("n_images", ascending=False, kind="stable")
    n = len(order)
    if n <= 2:
        return dict(zip(order["group"], SPLITS[:n]))
    target = np.asarray(ratios) * order["n_images"].sum()
    filled = np.zeros(3)
    where: dict[str, str] = {}
    for g, size in zip(order["group"], order["n_images"]):
        s = int(np.argmax(target - filled))
        where[g], filled[s] = SPLITS[s], filled[s] + size
    for s in ("val", "test"):
        if s not in where.values() and ratios[SPLITS.index(s)] > 0:
            # Take the smallest train group so train loses as little as possible; train keeps at least one.
            train_groups = [g for g in reversed(order["group"].tolist()) if where[g] == "train"]
            if len(train_groups) > 1:
                where[train_groups[0]] = s
    return where


def _assign_in_order(groups: pd.DataFrame, ratios: tuple[float, ...]) -> dict[str, str]:
    """Groups already in time order fill train, then val, then test, by cumulative share of images."""
    n = len(groups)
    if n <= 2:
        return dict(zip(groups["group"], SPLITS[:n]))
    bounds = np.cumsum(ratios)[:2] * groups["n_images"].sum()
    done = groups["n_images"].cumsum() - groups["n_images"]  # images placed before each group
    splits = np.array(SPLITS)[np.searchsorted(bounds, done.to_numpy(), side="right")]
    splits[0] = "train"
    for s in ("test", "val"):  # the latest groups give way, so train keeps the early ones
        if s not in splits and ratios[SPLITS.index(s)] > 0:
            splits[-1 if s == "test" else -2] = s
    return dict(zip(groups["group"], splits))


RATIO_AIM = 1 / 3  # once moving, groups that cost no class a split move until within this part of ratio_tol


def _hold_ratios(table: pd.DataFrame, where: dict[str, str], ratios: tuple[float, ...], tol: float,
                 rng: np.random.Generator, ordered: bool = False) -> dict[str, str]:
    """Move groups between splits until each split's share of images is within `tol` of its ratio.

    Does nothing when the per-class assignment already is. Otherwise, two stages of single-group moves from an
    over-full split to an under-full one, each accepted only when it brings the totals closer:
      1. groups a class can spare (it keeps another group in that split), from the class holding the largest part of
         its images there, until within RATIO_AIM * tol: larger classes give up their extra val/test groups first;
      2. only while still outside `tol`: a class's last group in val or test, preferring classes that stay evaluated
         in the other split, then classes with more groups, then bigger groups (fewer classes lose a split).
    Train keeps at least one group of every class. `ordered` (time mode; `table` in time order within each class):
    only moves that keep train before val before test within a class. Ties follow a seeded order of the classes.
    """
    total = float(table["n_images"].sum())
    asked = np.asarray(ratios, dtype=float)
    if total == 0:
        return where
    sizes = dict(zip(table["group"], table["n_images"].astype(int)))
    members = {label: groups.tolist() for label, groups in table.groupby("label", sort=True)["group"]}
    class_images = table.groupby("label")["n_images"].sum().to_dict()
    rank = {label: i for i, label in enumerate(rng.permutation(sorted(members)))}
    at = {g: SPLITS.index(where[g]) for g in sizes}
    filled = np.zeros(3)
    for g, s in at.items():
        filled[s] += sizes[g]

    def off() -> np.ndarray:
        return filled / total - asked

    if np.abs(off()).max() <= tol:
        return where

    def candidate(label: str, stage: int, src: int, dst: int):
        """(priority key, group) of the group `label` would move from src to dst in this stage, or None."""
        groups = members[label]
        splits = [at[g] for g in groups]
        n_src = splits.count(src)
        if (n_src >= 2) != (stage == 1) or (src == 0 and n_src < 2):
            return None  # stage 1 only spares; train keeps one group of every class
        if ordered:  # only a group at its split's boundary moves, so train < val < test holds; the first stays train
            movable = [g for i, (g, a) in enumerate(zip(groups, splits)) if i > 0 and a == src
                       and splits[i - 1] <= dst and (i == len(splits) - 1 or splits[i + 1] >= dst)]
        else:
            movable = [g for g, a in zip(groups, splits) if a == src]
        if not movable:
            return None
        if stage == 1:  # the smallest spare group, from the class with the largest part of its images in src
            g = min(movable, key=lambda h: (sizes[h], h))
            share = sum(sizes[h] for h, a in zip(groups, splits) if a == src) / class_images[label]
            return (-share, rank[label], g), g
        g = movable[0]  # a class's only group in src
        evaluated = dst > 0 or any(a > 0 and h != g for h, a in zip(groups, splits))
        return (not evaluated, -len(groups), -sizes[g], rank[label], g), g

    def run_pair(stage: int, src: int, dst: int, limit: float) -> int:
        """Moves from src to dst while they stay over/under; the largest acceptable size only shrinks meanwhile."""
        heap = [(c[0], label) for label in members if (c := candidate(label, stage, src, dst))]
        heapq.heapify(heap)
        moved = 0
        while heap and np.abs(off()).max() > limit:
            d = off()
            if not d[src] > 0 > d[dst]:
                break
            key, label = heapq.heappop(heap)
            c = candidate(label, stage, src, dst)
            if c is None or c[0] != key:  # stale: the class moved since
                if c is not None:
                    heapq.heappush(heap, (c[0], label))
                continue
            g = c[1]
            if sizes[g] / total >= 2 * min(d[src], -d[dst]):
                continue  # would overshoot: the totals would get no closer, now or later in this run
            at[g] = dst
            filled[src] -= sizes[g]
            filled[dst] += sizes[g]
            moved += 1
            if (c := candidate(label, stage, src, dst)) is not None:
                heapq.heappush(heap, (c[0], label))
        return moved

    for stage, limit in ((1, RATIO_AIM * tol), (2, tol)):
        while np.abs(off()).max() > limit:
            d = off()
            pairs = sorted(((s, t) for s in range(3) for t in range(3) if d[s] > 0 > d[t]),
                           key=lambda p: (d[p[1]] - d[p[0]], p))
            if not any(run_pair(stage, src, dst, limit) for src, dst in pairs):
                break
    return {g: SPLITS[a] for g, a in at.items()}


def _label_units(index: pd.DataFrame) -> pd.Series:
    """label -> unit: labels that share a group (two animals in one encounter) must move together."""
    parent = {label: label for label in index["label"].unique()}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for labels in index.groupby("group")["label"].unique():
        for other in labels[1:]:
            parent[root(other)] = root(labels[0])
    return pd.Series({label: root(label) for label in parent})


def _given_split(index: pd.DataFrame, cfg: SplitConfig) -> dict[str, str]:
    if "given_split" not in index.columns:
        raise DataError("mode='given' needs the CSV's split column: name it with split_col in notebook 01")
    values = index["given_split"].astype(str).str.strip().str.lower()
    unknown = sorted(set(values) - set(GIVEN_NAMES))
    if unknown:
        rows = index.loc[values.isin(unknown), "path"].head(3).tolist()
        raise DataError(f"split column holds {unknown} (e.g. {rows}); valid values: {sorted(GIVEN_NAMES)}")
    per_group = pd.DataFrame({"group": index["group"], "split": values.map(GIVEN_NAMES)}).drop_duplicates()
    torn = per_group["group"][per_group["group"].duplicated()].unique()
    if len(torn):
        raise DataError(f"the CSV's split column puts group(s) {list(torn[:5])} in more than one split")
    where = dict(zip(per_group["group"], per_group["split"]))
    if "val" not in where.values():
        # The CSV has no val: carve one from its train groups, group-aware, at val's share of train + val.
        train = index[index["group"].map(where) == "train"]
        share = cfg.ratios[1] / (cfg.ratios[0] + cfg.ratios[1])
        carved = split_groups(train, SplitConfig(ratios=(1 - share, share, 0.0), seed=cfg.seed))
        where.update({g: "val" for g in carved["val"]})
    return where


def split_groups(index: pd.DataFrame, cfg: SplitConfig) -> dict[str, list[str]]:
    rng = np.random.default_rng(cfg.seed)
    table = group_table(index)
    where: dict[str, str] = {}
    if cfg.mode == "given":
        where = _given_split(index, cfg)
    elif cfg.mode == "open":
        units = _label_units(index)
        sizes = index.groupby("label").size().groupby(units).sum()
        unit_table = pd.DataFrame({"group": sizes.index, "n_images": sizes.to_numpy()}).sort_values("group")
        unit_split = _assign_class(unit_table, cfg.ratios, rng)
        where = {g: unit_split[units[label]] for g, label in zip(table["group"], table["label"])}
    elif cfg.mode == "time":
        first_seen = index.groupby("group")[cfg.time_col].min() if cfg.time_col in index.columns else None
        if first_seen is None:
            raise DataError(f"mode='time': the index has no column '{cfg.time_col}'; columns: {list(index.columns)}")
        table = table.assign(t=table["group"].map(first_seen)).sort_values(["label", "t", "group"])
        for _, groups in table.groupby("label", sort=True):
            where.update(_assign_in_order(groups, cfg.ratios))
        where = _hold_ratios(table, where, cfg.ratios, cfg.ratio_tol, rng, ordered=True)
    else:
        for _, groups in table.groupby("label", sort=True):
            where.update(_assign_class(groups.sort_values("group"), cfg.ratios, rng))
        where = _hold_ratios(table.sort_values(["label", "group"]), where, cfg.ratios, cfg.ratio_tol, rng)
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


PER_CLASS_MODES = ("group", "time")  # modes that share out each class's groups over the splits


def split_report(index: pd.DataFrame, groups: dict[str, list[str]], cfg: SplitConfig, exclusions: pd.DataFrame | None,
                 fingerprint: str, min_size: int | None = None) -> dict:
    split_of = {g: s for s, gs in groups.items() for g in gs}
    labelled = index.assign(split=index["group"].map(split_of))
    per_class = (labelled.groupby(["label", "split"]).size().unstack(fill_value=0)
                 .reindex(columns=list(SPLITS), fill_value=0))
    multi = group_table(index).query("n_labels > 1")["group"].tolist()
    n_images = {s: int((labelled["split"] == s).sum()) for s in SPLITS}
    total = max(sum(n_images.values()), 1)
    # where the classes landed: the few-groups rule, and any val/test group moved to hold the ratios
    unevaluated = per_class[(per_class["val"] == 0) & (per_class["test"] == 0)].index
    untested = per_class[(per_class["val"] > 0) & (per_class["test"] == 0)].index if cfg.ratios[2] > 0 else []
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "data_fingerprint": fingerprint,
        "min_size": min_size,  # check_images' floor: prediction flags smaller photos (None: not recorded)
        "n_images": n_images,
        "ratios_asked": dict(zip(SPLITS, cfg.ratios)),
        "ratios_achieved": {s: round(n_images[s] / total, 4) for s in SPLITS},  # shares of images
        "n_groups": {s: len(groups[s]) for s in SPLITS},
        "n_classes": int(index["label"].nunique()),
        "n_labels": {s: int(labelled.loc[labelled["split"] == s, "label"].nunique()) for s in SPLITS},
        "per_class": {label: {s: int(v) for s, v in row.items()} for label, row in per_class.iterrows()},
        # the few-groups rule shares out each class's groups; open and given modes place whole labels or follow the CSV
        "train_only_classes": sorted(unevaluated) if cfg.mode in PER_CLASS_MODES else [],
        "no_test_classes": sorted(untested) if cfg.mode in PER_CLASS_MODES else [],
        "multi_label_groups": multi,
        "excluded_groups": ({} if exclusions is None or exclusions.empty else
                            {g: rows["reason"].iloc[0] for g, rows in exclusions.groupby("group")}),
    }


def _ratio_lines(report: dict) -> list[str]:
    """Asked vs achieved shares of images; reports written before these were recorded have neither."""
    if "ratios_achieved" not in report:
        return []
    asked, got = report["ratios_asked"], report["ratios_achieved"]
    pairs = ", ".join(f"{s} {asked[s]:.2f} -> {got[s]:.3f}" for s in SPLITS)
    return [f"- ratios by images, asked -> achieved: {pairs}"]


def _report_markdown(report: dict) -> str:
    lines = ["# Split report", "", f"- created: {report['created']}", f"- seed: {report['config']['seed']}",
             f"- ratios (train/val/test): {report['config']['ratios']}", *_ratio_lines(report),
             f"- data fingerprint: {report['data_fingerprint']}",
             f"- mode: {report['config']['mode']}", f"- images: {report['n_images']}", f"- groups: {report['n_groups']}",
             f"- classes: {report['n_classes']} (per split: {report['n_labels']})", ""]
    mode = report["config"]["mode"]
    if mode in PER_CLASS_MODES:
        lines += ["## Classes too small for every split", "",
                  f"- train only (in the gallery, never evaluated): {report['train_only_classes'] or 'none'}",
                  f"- no test images (train + val): {report['no_test_classes'] or 'none'}", ""]
    elif mode == "open":
        lines += ["Open set: each label lies in one split only, so val and test labels are never seen in training "
                  "and are evaluated among themselves (leave-one-out).", ""]
    else:
        lines += ["Splits as the metadata CSV gives them.", ""]
    if report["multi_label_groups"]:
        lines += [f"Groups holding several labels (kept whole, placed by their most common label): "
                  f"{report['multi_label_groups']}", ""]
    lines += ["## Images per class and split", "", "| class | train | val | test |", "|---|---|---|---|"]
    lines += [f"| {c} | {v['train']} | {v['val']} | {v['test']} |" for c, v in report["per_class"].items()]
    lines += ["", f"## Excluded groups ({len(report['excluded_groups'])})", ""]
    lines += [f"- {g}: {r}" for g, r in report["excluded_groups"].items()] or ["none"]
    return "\n".join(lines) + "\n"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_splits(splits_dir: str | os.PathLike, splits: Splits, index: pd.DataFrame, exclusions: pd.DataFrame | None) -> None:
    d = Path(splits_dir)
    (d / "folds").mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        _write_json(d / SPLIT_FILES[s], splits.groups[s])
    _write_json(d / "class_to_idx.json", splits.class_to_idx)
    _write_json(d / "split_report.json", splits.report)
    (d / "split_report.md").write_text(_report_markdown(splits.report))
    for i, fold in enumerate(splits.folds):
        for s in ("train", "val"):
            _write_json(d / "folds" / f"fold{i}_{s}_ids.json", fold[s])
    assign_splits(index, splits.groups).to_csv(d / "index.csv", index=False)
    (exclusions if exclusions is not None else pd.DataFrame(columns=["group", "label", "path", "reason"])).to_csv(
        d / "exclusions.csv", index=False)


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
    return Splits(groups, c2i, report, folds)


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
        # files written before a setting existed were made with its default value
        old_config = {**json.loads(json.dumps(asdict(SplitConfig()))), **old.report.get("config", {})}
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
    splits = Splits(groups, class_to_idx(index), report, folds)
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
