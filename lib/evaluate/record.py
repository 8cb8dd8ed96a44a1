"""The evaluation record: what notebook 03 computes for one split and notebooks 04/05 read back.

One query per row of `queries` (the index rows of the evaluated split, in embedding order) with its decision;
`neighbours`/`distances` point into `gallery` rows. Saved as plain files under run_dir/eval/<split>/ so any tool
can open them: queries.csv, gallery.csv, class_scores.csv, arrays.npz, metrics.json, and class_probs.csv for a run with
a softmax classifier (loss="ce").
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.retrieval.exclusion import OLD_LOO_RULE

# Columns every `queries` table carries besides the index columns (path, label, group, [context]).
DECISION_COLUMNS = ("pred", "score", "margin", "top1_distance", "verdict", "correct", "rank_of_true")
# and, from evaluate_run, `ap`: the query's average precision over its whole ranking (NaN: no relevant photo)
VERDICTS = ("accepted", "unclassifiable", "reshoot")


@dataclass
class Evaluation:
    split: str                       # 'val', 'test', or a name for photos from elsewhere
    data_root: str
    gallery: pd.DataFrame            # gallery rows (train split; the split itself when leave-one-out), embedding order
    queries: pd.DataFrame            # query rows + DECISION_COLUMNS
    neighbours: np.ndarray           # (n_q, K) int64 gallery rows, nearest first
    distances: np.ndarray            # (n_q, K) float32 squared L2 (= 2 - 2 cos on unit vectors)
    class_scores: pd.DataFrame       # (n_q, n_classes) vote score of every class, columns = class names
    gallery_emb: np.ndarray          # (n_g, d) float32
    query_emb: np.ndarray            # (n_q, d) float32
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)   # run + evaluation settings (k, voting, thresholds, tta, checkpoint)
    class_probs: pd.DataFrame | None = None      # (n_q, n_classes) softmax of a loss="ce" run's classifier; else None


def save_evaluation(ev: Evaluation, folder: str | os.PathLike) -> Path:
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    ev.queries.to_csv(d / "queries.csv", index=False)
    ev.gallery.to_csv(d / "gallery.csv", index=False)
    ev.class_scores.to_csv(d / "class_scores.csv", index=False)
    if ev.class_probs is not None:
        ev.class_probs.to_csv(d / "class_probs.csv", index=False)
    np.savez(d / "arrays.npz", neighbours=ev.neighbours, distances=ev.distances, gallery_emb=ev.gallery_emb,
             query_emb=ev.query_emb)
    (d / "metrics.json").write_text(json.dumps({"split": ev.split, "data_root": ev.data_root, "metrics": ev.metrics,
                                                "config": ev.config}, indent=2, default=str) + "\n")
    return d


def load_evaluation(folder: str | os.PathLike) -> Evaluation:
    d = Path(folder)
    if not (d / "queries.csv").exists():
        raise DataError(f"no evaluation in {d}: run notebook 03 for this run and split first")
    read = lambda name: pd.read_csv(d / name, keep_default_na=False,  # noqa: E731
                                    dtype={"path": str, "label": str, "group": str, "pred": str})
    queries = read("queries.csv")
    if "ap" in queries:  # kept as text by keep_default_na=False, where NaN was written as ''
        queries["ap"] = pd.to_numeric(queries["ap"], errors="coerce")
    arrays = np.load(d / "arrays.npz")
    meta = json.loads((d / "metrics.json").read_text())
    return Evaluation(split=meta["split"], data_root=meta["data_root"], gallery=read("gallery.csv"),
                      queries=queries, neighbours=arrays["neighbours"], distances=arrays["distances"],
                      class_scores=pd.read_csv(d / "class_scores.csv"), gallery_emb=arrays["gallery_emb"],
                      query_emb=arrays["query_emb"], metrics=meta["metrics"], config=meta["config"],
                      class_probs=pd.read_csv(d / "class_probs.csv") if (d / "class_probs.csv").exists() else None)


def loo_rule(ev: Evaluation) -> str | None:
    """The leave-one-out rule of an evaluation ('group' or 'photo', lib.retrieval.exclusion); None for the gallery
    protocol. Records written before the rule existed say nothing and used 'photo'."""
    if ev.config.get("protocol") != "loo":
        return None
    return ev.config.get("loo_rule") or OLD_LOO_RULE
