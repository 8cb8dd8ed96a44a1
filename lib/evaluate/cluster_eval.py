"""Notebook 03's grouping of photos into individuals (lib.retrieval.clustering), as a user's "new" photos are grouped
by `photo-predict --group-new`: the threshold chosen on the calibration part of val, measured elsewhere.

The photos clustered: on an open split (gallery protocol, some queries' individuals absent from the gallery) the
unknown queries, and separately all queries; where no query is unknown (a closed split, or leave-one-out, where the
split is its own gallery) all queries only. The threshold is chosen on the calibration part that lib.evaluate.calibrate
drew for the decision thresholds (its queries' CALIBRATION_COLUMN), for the best ARI against the true individuals, and
measured on the held-out part of val (and on the whole test split, with val's threshold).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lib.core.errors import DataError
from lib.core.state_io import write_json
from lib.evaluate.calibrate import CALIBRATION_COLUMN
from lib.evaluate.record import Evaluation
from lib.retrieval.cluster_metrics import cluster_scores
from lib.retrieval.clustering import DEFAULT_THRESHOLD, ClusterSettings, choose_threshold, cluster_photos

CLUSTER_FILE = Path("eval") / "val" / "clustering.json"  # inside the run folder: what photo-predict --group-new reads
RESULT_SCORES = ("ari", "ami", "pair_f1", "bcubed_f1", "n_clusters", "n_individuals")


def cluster_subsets(ev: Evaluation) -> dict[str, np.ndarray]:
    """Row masks of the queries clustered: 'unknown' (an open split's queries whose individual has no gallery photo)
    when there are any, and 'all'."""
    subsets = {}
    if ev.config.get("protocol") == "gallery":
        unknown = ~ev.queries["label"].isin(ev.gallery["label"]).to_numpy()
        if unknown.any():
            subsets["unknown"] = unknown
    subsets["all"] = np.ones(len(ev.queries), dtype=bool)
    return subsets


def _clustered(ev: Evaluation, rows: np.ndarray, threshold: float, settings: ClusterSettings) -> np.ndarray:
    q = ev.queries[rows]
    contexts = q["context"] if ev.config.get("restrict_to_context") and "context" in q else None
    return cluster_photos(ev.query_emb[rows], threshold, q["group"], contexts, settings)


def choose_cluster_threshold(ev: Evaluation, settings: ClusterSettings | None = None, score: str = "ari") -> dict:
    """The threshold with the best `score` on the calibration part of the unknown queries (all where none), with
    what it was chosen on and the score curve; DEFAULT_THRESHOLD, with a note, when that part has under 2 photos."""
    settings = settings or ClusterSettings()
    if CALIBRATION_COLUMN not in ev.queries:
        raise ValueError("choose the cluster threshold after lib.evaluate.calibrate.calibrate drew the calibration "
                         "part")
    subsets = cluster_subsets(ev)
    which = "unknown" if "unknown" in subsets else "all"
    part = subsets[which] & ev.queries[CALIBRATION_COLUMN].to_numpy(dtype=bool)
    q = ev.queries[part]
    contexts = q["context"] if ev.config.get("restrict_to_context") and "context" in q else None
    threshold, curve = choose_threshold(ev.query_emb[part], q["label"], q["group"], contexts, settings, score)
    chosen = {"threshold": threshold, **asdict(settings), "score": score,
              "chosen_on": {"split": ev.split, "part": "calibration", "queries": which, "n_photos": int(part.sum()),
                            "n_individuals": int(q["label"].nunique()),
                            "calibration": (ev.metrics.get("thresholds") or {}).get("calibration")},
              "curve": curve[["threshold", "ari", "ami", "pair_f1", "n_clusters"]].to_dict("records")
              if len(curve) else []}
    if np.isnan(threshold):
        chosen.update(threshold=DEFAULT_THRESHOLD, note=f"{int(part.sum())} calibration photo(s): too few to choose "
                                                        f"on; the default {DEFAULT_THRESHOLD} is used")
    return chosen


def add_cluster_metrics(ev: Evaluation, chosen: dict) -> dict:
    """ev.metrics['clustering']: `chosen` (choose_cluster_threshold, on this split or val) and, per subset of
    cluster_subsets, the scores of lib.retrieval.cluster_metrics at its threshold, measured on the held-out part
    when the threshold was chosen on this evaluation's own calibration part, else on every query. The queries get a
    `cluster_<subset>` column (the cluster id; -1 for a query not clustered)."""
    settings = ClusterSettings(chosen["method"], chosen["linkage"], chosen["min_cluster_size"])
    held_out = chosen["chosen_on"]["split"] == ev.split and CALIBRATION_COLUMN in ev.queries
    measured = ~ev.queries[CALIBRATION_COLUMN].to_numpy(dtype=bool) if held_out else np.ones(len(ev.queries), bool)
    report = {**chosen, "measured_on": f"held-out part of {ev.split}" if held_out else f"all of {ev.split}"}
    for name, subset in cluster_subsets(ev).items():
        rows = subset & measured
        found = _clustered(ev, rows, chosen["threshold"], settings)
        ev.queries[f"cluster_{name}"] = -1
        ev.queries.loc[rows, f"cluster_{name}"] = found
        report[name] = cluster_scores(ev.queries.loc[rows, "label"], found)
    ev.metrics["clustering"] = report
    return report


def cluster_columns(ev: Evaluation) -> dict:
    """The clustering figures for the evaluation's results row ({} when it has none)."""
    report = ev.metrics.get("clustering")
    if not report:
        return {}
    return {"cluster_threshold": report["threshold"]} | {
        f"cluster_{name}_{key}": report[name][key] for name in ("unknown", "all") if name in report
        for key in RESULT_SCORES}


def save_cluster_choice(path: str | os.PathLike, chosen: dict, provenance: dict) -> Path:
    """clustering.json: the threshold and settings photo-predict --group-new applies, with what they were chosen on
    and the evaluation settings they depend on (lib.evaluate.calibrate.provenance)."""
    return write_json(path, {**{k: v for k, v in chosen.items() if k != "curve"}, **provenance})


def load_cluster_choice(run_dir: str | os.PathLike) -> dict | None:
    """What notebook 03 saved in run_dir/CLUSTER_FILE, or None when it has not run (or predates clustering)."""
    path = Path(run_dir) / CLUSTER_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        float(saved["threshold"]), ClusterSettings(saved["method"], saved["linkage"], saved["min_cluster_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable cluster threshold ({e}); run notebook 03 again or delete the "
                        "file") from None
    return saved
