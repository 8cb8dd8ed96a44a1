"""The split modes, one record each: how a mode places every group, whether it shares out each class's groups (so
the few-groups rule and its report section apply), whether it can hold individuals out of train (open set), and what
the split report says about it. Adding a mode is one SplitMode in MODES (its knobs, if new, are SplitConfig fields).

Each `assign(index, table, cfg, rng)` takes the checked index, its group table (lib.data.split_assign.group_table),
the SplitConfig and the seeded generator, and returns {group: 'train' | 'val' | 'test'} for every group.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.data.split_assign import RatioHolder, assign_in_order, group_table, open_set_split, per_class_split

DEFAULT_UNKNOWN_SHARE = 0.2
GIVEN_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "query": "test"}
# SplitConfig.ratio_tol's default, and the tolerance of the val carved from a given CSV's train whatever the run set
DEFAULT_RATIO_TOL = 0.03


@dataclass(frozen=True)
class SplitMode:
    name: str
    assign: Callable  # (index, group table, SplitConfig, rng) -> {group: split name}
    per_class: bool   # shares out each class's groups: the few-groups rule holds, the report lists the small classes
    open_set: bool    # can hold individuals out of train: takes unknown_share (default DEFAULT_UNKNOWN_SHARE)
    describe: Callable[[dict], list[str]]  # split report -> the Markdown lines about this mode
    # what split files written before unknown_share was recorded did
    unknown_share_before: float = 0.0
    check: Callable = lambda cfg: None  # raises ValueError for a SplitConfig this mode cannot use


def _group_assign(index, table, cfg, rng) -> dict[str, str]:
    return per_class_split(table, cfg.ratios, cfg.ratio_tol, rng)


def _time_check(cfg) -> None:
    if not cfg.time_col:
        raise ValueError("mode='time' needs time_col: the index column holding each photo's date or order")


def _time_assign(index, table, cfg, rng) -> dict[str, str]:
    if cfg.time_col not in index.columns:
        raise DataError(f"mode='time': the index has no column '{cfg.time_col}'; columns: {list(index.columns)}")
    first_seen = index.groupby("group")[cfg.time_col].min()
    table = table.assign(t=table["group"].map(first_seen)).sort_values(["label", "t", "group"])
    where: dict[str, str] = {}
    for _, groups in table.groupby("label", sort=True):
        where.update(assign_in_order(groups, cfg.ratios))
    return RatioHolder(table, where, cfg.ratios, rng, ordered=True).hold(cfg.ratio_tol)


def _open_assign(index, table, cfg, rng) -> dict[str, str]:
    return open_set_split(index, table, cfg.ratios, cfg.unknown_share, cfg.ratio_tol, rng)


def _given_assign(index, table, cfg, rng) -> dict[str, str]:
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
        # The CSV has no val: carve one from its train groups, group-aware, at val's share of train + val, holding
        # unknown_share of its individuals out of train (as a CSV's open-set test does).
        train = index[index["group"].map(where) == "train"]
        share = cfg.ratios[1] / (cfg.ratios[0] + cfg.ratios[1])
        carved = open_set_split(train, group_table(train), (1 - share, share, 0.0), cfg.unknown_share,
                                DEFAULT_RATIO_TOL, rng)
        where.update({g: "val" for g, s in carved.items() if s == "val"})
    return where


def _per_class_lines(report: dict) -> list[str]:
    return ["## Classes too small for every split", "",
            f"- train only (in the gallery, never evaluated): {report['train_only_classes'] or 'none'}",
            f"- no test images (train + val): {report['no_test_classes'] or 'none'}", ""]


def _open_lines(report: dict) -> list[str]:
    share = report["config"].get("unknown_share", MODES["open"].unknown_share_before)
    if share >= 1:
        return ["Open set, identity-disjoint (unknown_share 1): each label lies in one split only, so val and test "
                "labels are never seen in training and are evaluated among themselves (leave-one-out).", ""]
    return [f"Open set: {share:.2f} of the val/test individuals are held out whole (unknown: no photo in "
            "train); the others' groups are shared out as in group mode, so their queries have gallery photos.", ""]


MODES: dict[str, SplitMode] = {m.name: m for m in (
    # groups shared out per label (classification; closed-set re-ID when label = individual)
    SplitMode("group", _group_assign, per_class=True, open_set=False, describe=_per_class_lines),
    # the same, but each label's groups in time order (time_col): earliest to train, latest to test
    SplitMode("time", _time_assign, per_class=True, open_set=False, describe=_per_class_lines, check=_time_check),
    # unknown_share of the val/test individuals held out whole, the others by groups (open-set re-ID)
    SplitMode("open", _open_assign, per_class=False, open_set=True, describe=_open_lines, unknown_share_before=1.0),
    # the CSV's own split column (`given_split`); val carved from train (open-set rule) when the CSV has none
    SplitMode("given", _given_assign, per_class=False, open_set=True,
              describe=lambda report: ["Splits as the metadata CSV gives them.", ""]),
)}


def split_mode(name: str) -> SplitMode:
    """The mode called `name`; an unknown name is an error listing the valid ones."""
    if name not in MODES:
        raise ValueError(f"split mode {name!r}; valid: {', '.join(MODES)}")
    return MODES[name]


def assign_groups(index: pd.DataFrame, cfg) -> dict[str, str]:
    """{group: split} of every group of `index` under cfg.mode, seeded by cfg.seed."""
    return split_mode(cfg.mode).assign(index, group_table(index), cfg, np.random.default_rng(cfg.seed))
