"""photo-predict --group-new: the photos called new grouped into candidate individuals, one step before enrolling them
(photo-enroll RUN --from-predictions p.csv --cluster N --label NAME).

A photo is called new when its verdict is 'unclassifiable' (its nearest gallery photo is farther than the threshold
notebook 03 chose); a run without thresholds gives no verdicts, and then every readable photo is grouped, as said on
screen. The photos are clustered by lib.retrieval.clustering at the threshold notebook 03 saved in
run_dir/eval/val/clustering.json (chosen on val's calibration part, checked against this prediction's checkpoint and
TTA as the verdict thresholds are), or at DEFAULT_THRESHOLD with a note when the run has none.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from lib.evaluate.calibrate import check_provenance
from lib.evaluate.cluster_eval import CLUSTER_FILE, load_cluster_choice
from lib.retrieval.clustering import DEFAULT_THRESHOLD, ClusterSettings, cluster_photos, tightness

NEW_VERDICT = "unclassifiable"   # lib.retrieval.decide: nothing like the photo in the gallery
COLUMNS = ("new_cluster", "new_cluster_size", "new_cluster_tightness")
NOT_GROUPED = -1                 # new_cluster of a photo not called new (or unreadable)


def cluster_choice(run_dir: str | os.PathLike, checkpoint_sha256: str | None, tta: bool, allow_mismatch: bool = False,
                   threshold: float | None = None) -> tuple[dict, str]:
    """(threshold and ClusterSettings fields to apply, a line saying where they came from): `threshold` when given,
    else notebook 03's clustering.json (refused, as the verdict thresholds are, when chosen for another checkpoint or
    TTA unless allow_mismatch), else DEFAULT_THRESHOLD."""
    defaults = asdict(ClusterSettings())
    if threshold is not None:
        return {**defaults, "threshold": float(threshold)}, f"cluster threshold {threshold:g} (given)"
    saved = load_cluster_choice(run_dir)
    source = Path(run_dir) / CLUSTER_FILE
    if saved is None:
        return ({**defaults, "threshold": DEFAULT_THRESHOLD},
                f"note: no {source} (notebook 03 chooses the cluster threshold); grouped at the default cosine "
                f"distance {DEFAULT_THRESHOLD}, a guess: check the groups, or pass --cluster-threshold")
    check_provenance(saved, {"checkpoint_sha256": checkpoint_sha256, "tta": tta}, source, allow_mismatch)
    on = saved.get("chosen_on", {})
    return saved, (f"cluster threshold {saved['threshold']:.4f} ({saved['method']}, {saved['linkage']} linkage) from "
                   f"{source}, chosen on {on.get('n_photos', '?')} photos of {on.get('split', '?')}'s calibration part")


def group_new(table: pd.DataFrame, emb: np.ndarray, choice: dict) -> pd.DataFrame:
    """`table` (photo-predict's rows) with COLUMNS: the same new_cluster id (0 the largest) for photos believed to
    show one new individual, the cluster's size and tightness (mean cosine similarity between its photos; empty for a
    photo alone); NOT_GROUPED and empty for the others. emb: the readable rows' embeddings (error == ''), in order."""
    table = table.copy()
    readable = (table["error"] == "").to_numpy()
    verdict = table["verdict"].fillna("").astype(str).to_numpy()
    new = readable & (verdict == NEW_VERDICT) if (verdict[readable] != "").any() else readable
    table["new_cluster"], table["new_cluster_size"], table["new_cluster_tightness"] = NOT_GROUPED, 0, np.nan
    if new.any():
        vectors = np.asarray(emb)[new[readable]]
        settings = ClusterSettings(choice["method"], choice["linkage"], choice["min_cluster_size"])
        found = cluster_photos(vectors, choice["threshold"], settings=settings)
        table.loc[new, "new_cluster"] = found
        table.loc[new, "new_cluster_size"] = np.bincount(found)[found]
        table.loc[new, "new_cluster_tightness"] = np.round(tightness(vectors, found), 6)
    return table


def add_new_groups(table: pd.DataFrame, run_dir: str | os.PathLike, tta: bool = False, allow_mismatch: bool = False,
                   threshold: float | None = None) -> tuple[pd.DataFrame, str]:
    """group_new on predict_photos' table (its attrs carry the embeddings and checkpoint), with cluster_choice's
    threshold; returns (the table, lines to print: where the threshold came from and what was grouped)."""
    emb = table.attrs.get("embeddings", np.zeros((0, 0), np.float32))
    choice, source = cluster_choice(run_dir, table.attrs.get("checkpoint_sha256"), tta, allow_mismatch, threshold)
    out = group_new(table, emb, choice)
    grouped = out["new_cluster"] != NOT_GROUPED
    no_verdicts = (out.loc[out["error"] == "", "verdict"].fillna("") == "").all()
    called = ("no verdicts (no thresholds saved by notebook 03): every readable photo grouped" if no_verdicts
              else f"{int(grouped.sum())} photos called new")
    sizes = out.loc[grouped, "new_cluster"].value_counts()
    return out, (f"{source}\n{called} -> {len(sizes)} candidate individuals"
                 + (f" ({int((sizes > 1).sum())} of several photos, largest {int(sizes.max())})" if len(sizes) else ""))
