"""Candidate individuals from `photo-predict --group-new` enrolled in one step, and enrolled labels renamed:

    photo-enroll RUN_DIR --from-predictions p.csv --cluster 3 --label NAME   one cluster as individual NAME
    photo-enroll RUN_DIR --from-predictions p.csv --all-clusters            every cluster, named new_001, new_002...
    photo-enroll RUN_DIR --rename new_002 NAME                              give a generated name its real one

Generated names skip any label the run already knows (train or enrolled); renaming to a known individual's label
merges the cluster into that individual (it was a new encounter of a known one, not a new individual).
"""
from __future__ import annotations

import os
import unicodedata
from dataclasses import replace

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.core.state_io import run_state_lock
from lib.evaluate.enroll_cli import canonical_label, enroll_photos
from lib.evaluate.enrolled_store import load_enrolled, save_enrolled
from lib.evaluate.new_groups import NOT_GROUPED
from lib.train.trained_run import load_trained

NAME_PREFIX = "new_"


def predicted_clusters(predictions_csv: str | os.PathLike) -> pd.DataFrame:
    """path and new_cluster of the grouped rows of a photo-predict --group-new CSV."""
    try:
        table = pd.read_csv(predictions_csv, dtype={"path": str}, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{predictions_csv}: cannot read predictions ({e})") from None
    if "new_cluster" not in table or "path" not in table:
        raise DataError(f"{predictions_csv}: no new_cluster column; make it with photo-predict ... --group-new")
    clusters = pd.to_numeric(table["new_cluster"], errors="coerce")
    if clusters.isna().any():
        row = int(np.flatnonzero(clusters.isna())[0])
        raise DataError(f"{predictions_csv}, row {row + 2}: new_cluster {table['new_cluster'].iat[row]!r} is not a "
                        "number; write the file again with photo-predict --group-new")
    grouped = table.assign(new_cluster=clusters.astype(int))
    return grouped.loc[grouped["new_cluster"] != NOT_GROUPED, ["path", "new_cluster"]].reset_index(drop=True)


def generated_names(n: int, taken, prefix: str = NAME_PREFIX) -> list[str]:
    """n names prefix001, prefix002... that no label in `taken` spells (case and spaces aside)."""
    taken = {t.strip().casefold() for t in taken}
    names, i = [], 0
    while len(names) < n:
        i += 1
        name = f"{prefix}{i:03d}"
        if name.casefold() not in taken:
            names.append(name)
    return names


def enrol_clusters(run_dir: str | os.PathLike, predictions_csv: str | os.PathLike, cluster: int | None = None,
                   label: str | None = None, prefix: str = NAME_PREFIX, **enrol) -> pd.DataFrame:
    """Enrol one cluster of the predictions under `label`, or (cluster None) every cluster under generated_names,
    in one enrolment refused whole on any problem (lib.evaluate.enroll_cli.enroll_photos, given `enrol`'s options)."""
    grouped = predicted_clusters(predictions_csv)
    if cluster is not None:
        if label is None or not label.strip():
            raise DataError("--cluster needs --label NAME (or use --all-clusters for generated names)")
        rows = grouped[grouped["new_cluster"] == cluster]
        if rows.empty:
            raise DataError(f"{predictions_csv}: no cluster {cluster} (clusters: "
                            f"{', '.join(map(str, sorted(grouped['new_cluster'].unique()))) or 'none'})")
        return enroll_photos(run_dir, rows["path"].tolist(), [label] * len(rows), **enrol)
    if grouped.empty:
        raise DataError(f"{predictions_csv}: no photo was grouped (no photo called new); nothing to enrol")
    run = load_trained(run_dir, enrol.get("checkpoint", "best"))
    ids = sorted(grouped["new_cluster"].unique())
    taken = set(run.config["class_to_idx"]) | set(load_enrolled(run_dir).table["label"])
    names = dict(zip(ids, generated_names(len(ids), taken, prefix)))
    return enroll_photos(run_dir, grouped["path"].tolist(), grouped["new_cluster"].map(names).tolist(), **enrol)


def rename_enrolled(run_dir: str | os.PathLike, old: str, new: str) -> int:
    """Relabel every enrolled photo labelled `old` as `new`; returns how many. A `new` that differs from a known label
    only by case or spaces is refused (as enrolment refuses it); the exact label of a known individual merges."""
    if not new.strip():
        raise DataError("the new name is empty")
    with run_state_lock(run_dir, f"renaming enrolled {old!r}"):
        enrolled = load_enrolled(run_dir)
        hit = (enrolled.table["label"] == unicodedata.normalize("NFC", old)).to_numpy()
        if not hit.any():
            raise DataError(f"no enrolled photo of {run_dir} is labelled {old!r} (photo-enroll {run_dir} --list)")
        known = set(load_trained(run_dir).config["class_to_idx"]) | set(enrolled.table.loc[~hit, "label"])
        new = canonical_label(new, known)
        near = sorted(k for k in known if k.strip().casefold() == new.strip().casefold() and k != new)
        if near:
            raise DataError(f"{new!r} differs only by case or spaces from the known {near[0]!r}; use that name, or a "
                            "clearly different one")
        table = enrolled.table.copy()
        table.loc[hit, "label"] = new
        save_enrolled(run_dir, replace(enrolled, table=table))
    return int(hit.sum())
