"""Where each group goes: the per-class share-out, the time-ordered fill, the move-back that holds the ratios, and the
open-set holdout of whole individuals. lib.data.splits calls these; they take group tables and return
{group: split name}.
"""
from __future__ import annotations

import hashlib
import heapq

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
RATIO_AIM = 1 / 3  # once moving, groups that cost no class a split move until within this part of ratio_tol


def split_fingerprint(groups: dict[str, list[str]]) -> str:
    """Hash of which group is in which split (the sorted (group, split) pairs): another seed, ratio or mode gives
    another one, the same data and settings the same one. A checkpoint records it, so that evaluation can refuse a
    split whose val or test holds photos the model trained on."""
    digest = hashlib.sha256()
    for group, split in sorted((str(g), s) for s, gs in groups.items() for g in gs):
        digest.update(f"{group}\x1f{split}\n".encode())
    return digest.hexdigest()


def group_table(index: pd.DataFrame) -> pd.DataFrame:
    """One row per group: its label (most common, ties by name), image count and whether its labels disagree."""
    counts = index.groupby(["group", "label"]).size().rename("n").reset_index()
    counts = counts.sort_values(["group", "n", "label"], ascending=[True, False, True])
    table = counts.groupby("group").agg(label=("label", "first"), n_images=("n", "sum"), n_labels=("label", "size"))
    return table.reset_index()


def fill_to_targets(order: pd.DataFrame, target: np.ndarray) -> dict[str, str]:
    """Groups in the given order, each to the split furthest below its target number of images."""
    filled = np.zeros(len(SPLITS))
    where: dict[str, str] = {}
    for g, size in zip(order["group"], order["n_images"]):
        s = int(np.argmax(target - filled))
        where[g], filled[s] = SPLITS[s], filled[s] + size
    return where


def biggest_first(groups: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Biggest groups first, shuffled among equals."""
    return groups.iloc[rng.permutation(len(groups))].sort_values("n_images", ascending=False, kind="stable")


def assign_class(groups: pd.DataFrame, ratios: tuple[float, ...], rng: np.random.Generator) -> dict[str, str]:
    """One class's groups, biggest first, each to the split furthest below its share of images; 1 group: train,
    2: train + val, 3+: at least one in every split with a ratio."""
    order = biggest_first(groups, rng)
    n = len(order)
    if n <= 2:
        return dict(zip(order["group"], SPLITS[:n]))
    where = fill_to_targets(order, np.asarray(ratios) * order["n_images"].sum())
    for s in ("val", "test"):
        if s not in where.values() and ratios[SPLITS.index(s)] > 0:
            # Take the smallest train group so train loses as little as possible; train keeps at least one.
            train_groups = [g for g in reversed(order["group"].tolist()) if where[g] == "train"]
            if len(train_groups) > 1:
                where[train_groups[0]] = s
    return where


def assign_in_order(groups: pd.DataFrame, ratios: tuple[float, ...]) -> dict[str, str]:
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


class RatioHolder:
    """Moves groups between splits until each split's share of images is within `tol` of its ratio.

    Two stages of single-group moves from an over-full split to an under-full one, each accepted only when it brings
    the totals closer:
      1. groups a class can spare (it keeps another group in that split), from the class holding the largest part of
         its images there, until within RATIO_AIM * tol: larger classes give up their extra val/test groups first;
      2. only while still outside `tol`: a class's last group in val or test, preferring classes that stay evaluated
         in the other split, then classes with more groups, then bigger groups (fewer classes lose a split).
    Train keeps at least one group of every class. `ordered` (time mode; `table` in time order within each class):
    only moves that keep train before val before test within a class. Ties follow a seeded order of the classes.
    """

    def __init__(self, table: pd.DataFrame, where: dict[str, str], ratios: tuple[float, ...],
                 rng: np.random.Generator, ordered: bool = False):
        self.total = float(table["n_images"].sum())
        self.asked = np.asarray(ratios, dtype=float)
        self.ordered = ordered
        self.sizes = dict(zip(table["group"], table["n_images"].astype(int)))
        self.members = {label: groups.tolist() for label, groups in table.groupby("label", sort=True)["group"]}
        self.class_images = table.groupby("label")["n_images"].sum().to_dict()
        self.rank = {label: i for i, label in enumerate(rng.permutation(sorted(self.members)))}
        self.at = {g: SPLITS.index(where[g]) for g in self.sizes}
        self.filled = np.zeros(len(SPLITS))
        for g, s in self.at.items():
            self.filled[s] += self.sizes[g]

    def share_error(self) -> np.ndarray:
        """Per split: its share of the images minus the asked ratio (positive: over-full)."""
        return self.filled / self.total - self.asked

    def hold(self, tol: float) -> dict[str, str]:
        if self.total and np.abs(self.share_error()).max() > tol:
            for stage, limit in ((1, RATIO_AIM * tol), (2, tol)):
                while np.abs(self.share_error()).max() > limit:
                    d = self.share_error()
                    pairs = sorted(((s, t) for s in range(3) for t in range(3) if d[s] > 0 > d[t]),
                                   key=lambda p: (d[p[1]] - d[p[0]], p))
                    if not any(self.move_pair(stage, src, dst, limit) for src, dst in pairs):
                        break
        return {g: SPLITS[a] for g, a in self.at.items()}

    def movable(self, label: str, src: int, dst: int) -> list[str]:
        """The groups of `label` in src that may move to dst (time mode: only one at its split's boundary)."""
        groups = self.members[label]
        splits = [self.at[g] for g in groups]
        if not self.ordered:
            return [g for g, a in zip(groups, splits) if a == src]
        # the first group stays train, and train < val < test holds within the class
        return [g for i, (g, a) in enumerate(zip(groups, splits)) if i > 0 and a == src
                and splits[i - 1] <= dst and (i == len(splits) - 1 or splits[i + 1] >= dst)]

    def candidate(self, label: str, stage: int, src: int, dst: int):
        """(priority key, group) of the group `label` would move from src to dst in this stage, or None."""
        groups = self.members[label]
        splits = [self.at[g] for g in groups]
        n_src = splits.count(src)
        if (n_src >= 2) != (stage == 1) or (src == 0 and n_src < 2):
            return None  # stage 1 only spares; train keeps one group of every class
        movable = self.movable(label, src, dst)
        if not movable:
            return None
        if stage == 1:  # the smallest spare group, from the class with the largest part of its images in src
            g = min(movable, key=lambda h: (self.sizes[h], h))
            share = sum(self.sizes[h] for h, a in zip(groups, splits) if a == src) / self.class_images[label]
            return (-share, self.rank[label], g), g
        g = movable[0]  # a class's only group in src
        evaluated = dst > 0 or any(a > 0 and h != g for h, a in zip(groups, splits))
        return (not evaluated, -len(groups), -self.sizes[g], self.rank[label], g), g

    def move_pair(self, stage: int, src: int, dst: int, limit: float) -> int:
        """Moves from src to dst while they stay over/under; the largest acceptable size only shrinks meanwhile."""
        heap = [(c[0], label) for label in self.members if (c := self.candidate(label, stage, src, dst))]
        heapq.heapify(heap)
        moved = 0
        while heap and np.abs(self.share_error()).max() > limit:
            d = self.share_error()
            if not d[src] > 0 > d[dst]:
                break
            key, label = heapq.heappop(heap)
            c = self.candidate(label, stage, src, dst)
            if c is None or c[0] != key:  # stale: the class moved since
                if c is not None:
                    heapq.heappush(heap, (c[0], label))
                continue
            g = c[1]
            if self.sizes[g] / self.total >= 2 * min(d[src], -d[dst]):
                continue  # would overshoot: the totals would get no closer, now or later in this run
            self.at[g] = dst
            self.filled[src] -= self.sizes[g]
            self.filled[dst] += self.sizes[g]
            moved += 1
            if (c := self.candidate(label, stage, src, dst)) is not None:
                heapq.heappush(heap, (c[0], label))
        return moved


def per_class_split(table: pd.DataFrame, ratios: tuple[float, ...], tol: float,
                    rng: np.random.Generator) -> dict[str, str]:
    """Group mode: each class's groups shared out over the splits, then moved back to hold the ratios."""
    where: dict[str, str] = {}
    for _, groups in table.groupby("label", sort=True):
        where.update(assign_class(groups.sort_values("group"), ratios, rng))
    return RatioHolder(table.sort_values(["label", "group"]), where, ratios, rng).hold(tol)


def label_units(index: pd.DataFrame) -> pd.Series:
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


def unit_table(index: pd.DataFrame, units: pd.Series) -> pd.DataFrame:
    """One row per unit (its name in `group`, for the share-out functions): images and groups, sorted by name."""
    rows = index.assign(unit=index["label"].map(units))
    table = rows.groupby("unit").agg(n_images=("path", "size"), n_groups=("group", "nunique"))
    return table.rename_axis("group").reset_index().sort_values("group", ignore_index=True)


def pick_unknown(units: pd.DataFrame, share: float, n_splits: int, rng: np.random.Generator) -> list[str]:
    """Units to hold out whole, in a seeded order, until they are closest to `share` of the evaluated units.

    Evaluated: the held-out units plus the others with 2+ groups (the per-class rule puts those in val or test). At
    least one per evaluated split (`n_splits`) when units allow, and always one unit with 2+ groups left known.
    """
    order = units.iloc[rng.permutation(len(units))]
    known_evaluated = int((units["n_groups"] >= 2).sum())
    picked: list[str] = []
    for unit, n_groups in zip(order["group"], order["n_groups"]):
        left = known_evaluated - (n_groups >= 2)
        if left < 1:
            continue
        now = abs(len(picked) / max(len(picked) + known_evaluated, 1) - share)
        after = abs((len(picked) + 1) / (len(picked) + 1 + left) - share)
        if after >= now and len(picked) >= n_splits:
            break
        picked.append(unit)
        known_evaluated = left
    return picked


def open_set_split(index: pd.DataFrame, table: pd.DataFrame, ratios: tuple[float, ...], unknown_share: float,
                   tol: float, rng: np.random.Generator) -> dict[str, str]:
    """Open mode: `unknown_share` of the val/test individuals held out whole (no photo in train), the others' groups
    shared out as in group mode, aiming the totals (unknown images included) at `ratios`. unknown_share=1: every
    individual whole in one split (identity-disjoint), as when no individual has two groups (none could be known in
    val/test: its only group would be in train)."""
    units = label_units(index)
    per_unit = unit_table(index, units)
    group_unit = table["label"].map(units)
    if unknown_share >= 1 or not (per_unit["n_groups"] >= 2).any():
        unit_split = assign_class(per_unit[["group", "n_images"]], ratios, rng)
        return {g: unit_split[u] for g, u in zip(table["group"], group_unit)}
    asked = np.asarray(ratios, dtype=float)
    evaluated = [s for s in (1, 2) if asked[s] > 0]
    picked = pick_unknown(per_unit, unknown_share, len(evaluated), rng) if evaluated else []
    held = per_unit[per_unit["group"].isin(picked)]
    eval_share = np.where(np.isin(np.arange(3), evaluated), asked, 0.0)
    eval_target = eval_share / max(eval_share.sum(), 1e-12) * held["n_images"].sum()
    unit_split = fill_to_targets(biggest_first(held, rng), eval_target)
    where = {g: unit_split[u] for g, u in zip(table["group"], group_unit) if u in unit_split}
    known = table[~group_unit.isin(picked)]
    filled = np.array([held.loc[held["group"].map(unit_split) == s, "n_images"].sum() for s in SPLITS])
    # the known groups make up what the held-out ones leave of each split's share, but keep at least half their own
    # share of val/test, so that every evaluated split mixes known and unknown individuals
    room = np.maximum(asked * float(table["n_images"].sum()) - filled, asked * float(known["n_images"].sum()) / 2)
    where.update(per_class_split(known, tuple(room / room.sum()), tol, rng))
    return where
