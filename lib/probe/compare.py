"""Probe: how well do retrieval methods identify individuals, on one split, with pretrained or fine-tuned
backbones? One row per method x backbone with identity-balanced mAP, CMC and the time each costs per query.

Methods, each a full ranking of the gallery per query (lib.probe.methods):
- global: cosine similarity of the embeddings;
- qe: alpha-weighted query expansion, then cosine;
- kreciprocal: k-reciprocal re-ranking (Jaccard distance of k-reciprocal neighbour sets blended with the original);
- local: the global top-`shortlist_k` re-sorted by SIFT + ratio test + RANSAC inliers;
- fusion: on that shortlist, cosine and inliers each calibrated into P(same individual) by isotonic regression on
  pairs of the `calibrate_on` split, and averaged (WildFusion);
- ensemble: the global cosines of several backbones / runs (`ensemble_members`) combined by rank averaging, score
  averaging or weights learned by logistic regression on pairs of the `calibrate_on` split (lib.probe.ensemble);
- hybrid: the shortlist re-sorted by LightGBM's P(same individual) from the deep cosine and engineered pair
  features (colour and texture distances, keypoint counts, inliers; lib.probe.hybrid), trained on pairs of the
  `calibrate_on` split.
Whatever learns from pairs (fusion, the ensemble's weights, the hybrid) is cross-fitted by identity when
`calibrate_on` is the probed split itself (lib.probe.crossfit), so no query's own pairs fit its scores.
Every method ranks the whole gallery for each query, a chunk of queries at a time, and the rankings feed the one
ranking-metrics engine (lib.retrieval.ranking), so memory stays bounded for large splits; k-reciprocal re-ranking
needs a dense all-pairs matrix and is left out, with a warning, where that would not fit (methods.MAX_PAIRS).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from lib.core.device import auto_settings
from lib.core.errors import DataError
from lib.core.state_io import write_csv, write_json
from lib.data.splits import load_split_index
from lib.evaluate.results_table import append_benchmark_row
from lib.probe.config import ProbeConfig, learns
from lib.probe.features import ProbeFeatures, load_backbone
from lib.probe.methods import probe_backbone, probe_backbones
from lib.probe.probe_set import probe_set, ranking_table, with_masks

ENSEMBLE_JOIN = " and "  # the ensemble row's backbone: its members' names joined so (MLflow refuses '+' in names)
PROBE_COLUMNS = ("run_id", "time", "splits_dir", "split", "protocol", "loo_rule", "identity_col", "mask_col", "backbone",
                 "method", "recall@1", "recall@5", "mAP", "identity_balanced_mAP", "n_queries", "n_gallery",
                 "feature_ms_per_image", "method_ms_per_query", "ms_per_query", "features_cached", "importance")


def run_probe(cfg: ProbeConfig, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """(one row per backbone x method, and one for the ensemble, {(backbone, method): per-query table with the top-5
    gallery rows and AP}); the ensemble's backbone is its members' names joined by ENSEMBLE_JOIN."""
    index, splits = load_split_index(cfg.splits_dir)
    index = with_masks(index, cfg.masks_csv, cfg.mask_col)
    s = probe_set(index, cfg.split, cfg.identity_col, cfg.protocol, cfg.loo_rule)
    calibration_set = None
    if learns(cfg) and cfg.calibrate_on != cfg.split:
        calibration_set = probe_set(index, cfg.calibrate_on, cfg.identity_col, cfg.protocol, cfg.loo_rule)
    settings = auto_settings(device=cfg.device)
    feats = ProbeFeatures(cfg, settings, progress)
    results = {}  # (backbone, method) -> (metrics, feature ms, method ms, importance, features_cached)
    stamp = datetime.now(timezone.utc)
    run_id = stamp.strftime("%Y%m%d-%H%M%S-%f")
    for spec in cfg.backbones:
        backbone = load_backbone(spec)
        trained_on = backbone.data_fingerprint
        if trained_on and trained_on != splits.report.get("data_fingerprint"):
            raise DataError(f"backbone {backbone.name!r} was trained on other data than {cfg.splits_dir} describes "
                            "(data fingerprints differ): its training photos could be among the probed ones")
        feats.cached = []
        for method, result in probe_backbone(backbone, s, calibration_set, feats, cfg).items():
            results[backbone.name, method] = (*result, all(feats.cached))
    feats.cached = []
    for method, (members, result) in probe_backbones(s, calibration_set, feats, cfg).items():
        results[ENSEMBLE_JOIN.join(members), method] = (*result, all(feats.cached))
    rows, rankings = [], {}
    for (name, method), (m, feature_ms, method_ms, importance, cached) in results.items():
        rows.append({"run_id": run_id, "time": stamp.isoformat(timespec="seconds"), "splits_dir": cfg.splits_dir,
                     "split": cfg.split, "protocol": s.protocol, "loo_rule": s.loo_rule,
                     "identity_col": cfg.identity_col,
                     "mask_col": cfg.mask_col, "backbone": name, "method": method,
                     **{f"recall@{k}": m[f"recall@{k}"] for k in cfg.ranks},
                     "mAP": m["mAP"], "identity_balanced_mAP": m["identity_balanced_mAP"],
                     "n_queries": len(s.queries), "n_gallery": len(s.gallery) - s.loo,
                     "feature_ms_per_image": feature_ms, "method_ms_per_query": method_ms,
                     "ms_per_query": feature_ms + method_ms, "features_cached": cached,
                     "importance": json.dumps(importance) if importance else ""})
        rankings[name, method] = ranking_table(s, m["top"], m["ap"])
    table = pd.DataFrame(rows)
    return table[[c for c in PROBE_COLUMNS if c in table] + [c for c in table if c not in PROBE_COLUMNS]], rankings


def save_probe(table: pd.DataFrame, cfg: ProbeConfig, results_dir: str | os.PathLike = "results",
               rankings: dict | None = None) -> Path:
    """Append the rows to results_dir/probe.csv and write the config snapshot results_dir/probe/<run_id>.json; with
    `rankings`, also each query's AP and top-1 per backbone and method (<run_id>_queries.csv: which photos fail)."""
    results_dir = Path(results_dir)
    for row in table.to_dict("records"):
        append_benchmark_row(results_dir / "probe.csv", row, PROBE_COLUMNS)
    run_id = table["run_id"].iloc[0]
    snapshot = results_dir / "probe" / f"{run_id}.json"
    write_json(snapshot, {"config": asdict(cfg), "rows": table.to_dict("records")})
    if rankings:
        queries = pd.concat([r.assign(backbone=b, method=m, top1_identity=r["top_identities"].str[0],
                                      top1_path=r["top_paths"].str[0]).drop(columns=["top_paths", "top_identities"])
                             for (b, m), r in rankings.items()], ignore_index=True)
        cols = ["backbone", "method", "path", "identity", "ap", "top1_identity", "top1_path"]
        write_csv(snapshot.with_name(f"{run_id}_queries.csv"), queries[cols])
    return snapshot
