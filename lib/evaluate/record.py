"""The evaluation record: what notebook 03 computes for one split and notebooks 04/05 read back.

One query per row of `queries` (the index rows of the evaluated split, in embedding order) with its decision;
`neighbours`/`distances` point into `gallery` rows. Saved as plain files under run_dir/eval/<split>/ so any tool
can open them: queries.csv, gallery.csv, class_scores.csv, arrays.npz, metrics.json, and class_probs.csv for a run with
a classifier head (one whose loss gives class probabilities).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.core.state_io import READ_ERRORS, manifest_problem, read_manifest, save_npz, write_csv, write_manifest
from lib.retrieval.exclusion import OLD_LOO_RULE
from lib.retrieval.retrieval_split import RetrievalSplit, retrieval_split

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
    class_probs: pd.DataFrame | None = None      # (n_q, n_classes) softmax of a classifier head's run; else None


RECORD_FILE = "metrics.json"  # written last, naming the sha256 of the record's other files (state_io manifest)


def save_evaluation(ev: Evaluation, folder: str | os.PathLike) -> Path:
    """The record's files, each written atomically, metrics.json last as their manifest: a save stopped half way
    leaves no metrics.json (or one that no longer matches), which load_evaluation refuses instead of mixing two
    evaluations."""
    d = Path(folder)
    (d / RECORD_FILE).unlink(missing_ok=True)
    tables = {"queries.csv": ev.queries, "gallery.csv": ev.gallery, "class_scores.csv": ev.class_scores}
    if ev.class_probs is not None:
        tables["class_probs.csv"] = ev.class_probs
    else:
        (d / "class_probs.csv").unlink(missing_ok=True)  # another evaluation's, which this one would be read with
    for name, table in tables.items():
        write_csv(d / name, table)
    save_npz(d / "arrays.npz", neighbours=ev.neighbours, distances=ev.distances, gallery_emb=ev.gallery_emb,
             query_emb=ev.query_emb)
    write_manifest(d, RECORD_FILE, [*tables, "arrays.npz"],
                   {"split": ev.split, "data_root": ev.data_root, "metrics": ev.metrics, "config": ev.config})
    return d


def load_evaluation(folder: str | os.PathLike) -> Evaluation:
    d = Path(folder)
    if not (d / "queries.csv").exists():
        raise DataError(f"no evaluation in {d}: run notebook 03 for this run and split first")
    meta = read_manifest(d, RECORD_FILE)
    # a record written before manifests names no files: read as it is
    problem = manifest_problem(d, meta) if meta is None or "files" in meta else ""
    if problem:
        raise DataError(f"the evaluation record in {d} cannot be read: {problem} (a save stopped half way?); run "
                        "notebook 03 for this split again")
    try:
        return _read_record(d, meta)
    except READ_ERRORS as e:  # a file cut short or edited: np.load raises BadZipFile or EOFError
        raise DataError(f"the evaluation record in {d} cannot be read ({type(e).__name__}: {e}); run notebook 03 "
                        "for this split again") from None


def _read_record(d: Path, meta: dict) -> Evaluation:
    read = lambda name: pd.read_csv(d / name, keep_default_na=False,  # noqa: E731
                                    dtype={"path": str, "label": str, "group": str, "pred": str})
    queries = read("queries.csv")
    if "ap" in queries:  # kept as text by keep_default_na=False, where NaN was written as ''
        queries["ap"] = pd.to_numeric(queries["ap"], errors="coerce")
    with np.load(d / "arrays.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in ("neighbours", "distances", "gallery_emb", "query_emb")}
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


def record_split(ev: Evaluation) -> RetrievalSplit:
    """The split the evaluation ranked (lib.retrieval.retrieval_split): its gallery and queries under the protocol
    and leave-one-out rule its record names (a record without a protocol: the gallery one), for recomputing its
    rankings under the same exclusion."""
    return retrieval_split(ev.gallery, ev.queries, ev.config.get("protocol") or "gallery", loo_rule(ev) or "auto")
