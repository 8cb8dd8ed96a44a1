"""The split report: what a split holds (counts per class and split, the classes too small for every split, the
unknown individuals of an open set, exclusions, asked and achieved ratios), as JSON for code and Markdown for people.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import asdict

import pandas as pd

from lib.data.split_assign import SPLITS, group_table, split_fingerprint
from lib.data.split_modes import split_mode


def unknown_individuals(index: pd.DataFrame, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """val/test: the labels of the split with no photo in train (the gallery will not know them)."""
    split_of = {g: s for s, gs in groups.items() for g in gs}
    where = index["group"].map(split_of)
    in_train = set(index.loc[where == "train", "label"])
    return {s: sorted(set(index.loc[where == s, "label"]) - in_train) for s in ("val", "test")}


def split_report(index: pd.DataFrame, groups: dict[str, list[str]], cfg, exclusions: pd.DataFrame | None,
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
    per_class_mode = split_mode(cfg.mode).per_class
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(cfg),
        "data_fingerprint": fingerprint,
        "split_fingerprint": split_fingerprint(groups),  # absent in reports written before it was recorded
        "min_size": min_size,  # check_images' floor: prediction flags smaller photos (None: not recorded)
        "n_images": n_images,
        "ratios_asked": dict(zip(SPLITS, cfg.ratios)),
        "ratios_achieved": {s: round(n_images[s] / total, 4) for s in SPLITS},  # shares of images
        "n_groups": {s: len(groups[s]) for s in SPLITS},
        "n_classes": int(index["label"].nunique()),
        "n_labels": {s: int(labelled.loc[labelled["split"] == s, "label"].nunique()) for s in SPLITS},
        "per_class": {label: {s: int(v) for s, v in row.items()} for label, row in per_class.iterrows()},
        # the few-groups rule shares out each class's groups; open and given modes place whole labels or follow the CSV
        "train_only_classes": sorted(unevaluated) if per_class_mode else [],
        "no_test_classes": sorted(untested) if per_class_mode else [],
        # absent in reports written before the open-set holdout: no individual was marked unknown
        "unknown_individuals": unknown_individuals(index, groups),
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


def _unknown_lines(report: dict) -> list[str]:
    unknown = report.get("unknown_individuals") or {}
    if not any(unknown.values()):
        return []
    lines = ["## Unknown individuals (no photo in train, so none in the gallery)", ""]
    for s, labels in unknown.items():
        known = report["n_labels"][s] - len(labels)
        lines.append(f"- {s}: {len(labels)} unknown, {known} known: {labels}")
    return lines + [""]


def report_markdown(report: dict) -> str:
    lines = ["# Split report", "", f"- created: {report['created']}", f"- seed: {report['config']['seed']}",
             f"- ratios (train/val/test): {report['config']['ratios']}", *_ratio_lines(report),
             f"- data fingerprint: {report['data_fingerprint']}",
             f"- split fingerprint (which group in which split): {report.get('split_fingerprint', 'not recorded')}",
             f"- mode: {report['config']['mode']}", f"- images: {report['n_images']}", f"- groups: {report['n_groups']}",
             f"- classes: {report['n_classes']} (per split: {report['n_labels']})", ""]
    lines += split_mode(report["config"]["mode"]).describe(report) + _unknown_lines(report)
    if report["multi_label_groups"]:
        lines += [f"Groups holding several labels (kept whole, placed by their most common label): "
                  f"{report['multi_label_groups']}", ""]
    lines += ["## Images per class and split", "", "| class | train | val | test |", "|---|---|---|---|"]
    lines += [f"| {c} | {v['train']} | {v['val']} | {v['test']} |" for c, v in report["per_class"].items()]
    lines += ["", f"## Excluded groups ({len(report['excluded_groups'])})", ""]
    lines += [f"- {g}: {r}" for g, r in report["excluded_groups"].items()] or ["none"]
    return "\n".join(lines) + "\n"
