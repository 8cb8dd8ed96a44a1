"""Probe: how well do retrieval methods identify individuals, on one split, with pretrained or fine-tuned
backbones? One row per method x backbone with identity-balanced mAP, CMC and the time each costs per query.

Methods, each a full ranking of the gallery per query:
- global: cosine similarity of the embeddings;
- qe: alpha-weighted query expansion, then cosine;
- kreciprocal: k-reciprocal re-ranking (Jaccard distance of k-reciprocal neighbour sets blended with the original);
- local: the global top-`shortlist_k` re-sorted by SIFT + ratio test + RANSAC inliers;
- fusion: on that shortlist, cosine and inliers each calibrated into P(same individual) by isotonic regression on
  pairs of the `calibrate_on` split, and averaged (WildFusion). When that is the probed split itself, identities
  are cross-fitted in two halves, so no query's own pairs calibrate its scores.
Every method ranks the whole gallery for each query, a chunk of queries at a time, and the rankings feed the one
ranking-metrics engine (lib.retrieval.ranking), so memory stays bounded for large splits; k-reciprocal re-ranking
needs a dense all-pairs matrix and is left out, with a warning, where that would not fit (MAX_PAIRS).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.device import auto_settings
from lib.core.errors import DataError
from lib.data.splits import load_split_index
from lib.evaluate.results_table import append_benchmark_row
from lib.probe.features import embeddings, load_backbone, sift_table
from lib.probe.fusion import ScoreFusion
from lib.probe.local_match import SiftConfig, shortlist_inliers
from lib.probe.rerank import k_reciprocal_distances, query_expansion, rerank_shortlist
from lib.retrieval.embed import EMBED_BATCH_SIZE
from lib.retrieval.faiss_index import unit_rows
from lib.retrieval.ranking import RankingTally, drop_self, query_chunks, resolve_val_protocol

METHODS = ("global", "qe", "kreciprocal", "local", "fusion")
TOP_KEPT = 5  # first gallery photos of each query kept for the per-query table and figures
MAX_PAIRS = 40_000_000  # k-reciprocal's dense (items x items) matrices beyond this take GBs: it is left out
PROBE_COLUMNS = ("run_id", "time", "splits_dir", "split", "protocol", "identity_col", "mask_col", "backbone", "method",
                 "recall@1", "recall@5", "mAP", "identity_balanced_mAP", "n_queries", "n_gallery",
                 "feature_ms_per_image", "method_ms_per_query", "ms_per_query", "features_cached")


@dataclass
class ProbeConfig:
    data_dir: str = "data/demo"
    splits_dir: str = "splits"
    split: str = "val"                 # the probed split; 'test' only when asked for, as everywhere
    identity_col: str = "label"        # column naming the individual ('group' = the folder layout's ID)
    protocol: str = "auto"             # auto | gallery (train photos are the gallery) | loo (split all-vs-all)
    methods: list = field(default_factory=lambda: list(METHODS))
    ranks: list = field(default_factory=lambda: [1, 5])  # CMC ranks, reported as recall@k
    backbones: list = field(default_factory=lambda: [
        {"name": "imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224}])
    shortlist_k: int = 20              # global candidates re-scored by local matching and fusion
    qe_n: int = 3
    qe_alpha: float = 3.0
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    sift: dict = field(default_factory=dict)  # SiftConfig fields (max_side, n_features, ratio, ransac_px, geometry)
    calibrate_on: str = "val"          # split whose pairs calibrate the fused scores
    mask_col: str = ""                 # column with polygon / RLE / mask image path: background painted out
    masks_csv: str = ""                # CSV (path + mask_col) to take the masks from when the index has none
    cache_dir: str = "runs/probe_cache"  # "" = no feature cache
    device: str = "auto"
    batch_size: int = EMBED_BATCH_SIZE

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods {unknown or self.methods}: choose from {', '.join(METHODS)}")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"ranks must be CMC ranks >= 1, got {self.ranks}")
        if self.shortlist_k < 1:
            raise ValueError(f"shortlist_k must be >= 1, got {self.shortlist_k}")
        names = [b.get("name") for b in self.backbones]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"backbones need distinct names, got {names}")
        SiftConfig(**self.sift)  # a bad SIFT knob fails here, before any feature is computed


@dataclass
class ProbeSet:
    """One probed split: query rows, gallery rows and whether the gallery is the queries themselves."""
    queries: pd.DataFrame
    gallery: pd.DataFrame
    protocol: str

    @property
    def loo(self) -> bool:
        return self.protocol == "loo"


def probe_set(index: pd.DataFrame, split: str, identity_col: str, protocol: str) -> ProbeSet:
    if identity_col not in index.columns:
        raise DataError(f"identity_col {identity_col!r} is not a column of the split index; it has {list(index.columns)}")
    queries = index[index["split"] == split].reset_index(drop=True)
    train = index[index["split"] == "train"].reset_index(drop=True)
    if queries.empty:
        raise DataError(f"the split index has no '{split}' photos; splits: {sorted(set(index['split']) - {''})}")
    protocol = resolve_val_protocol(protocol, train[identity_col], queries[identity_col])
    return ProbeSet(queries, queries if protocol == "loo" else train, protocol)


def with_masks(index: pd.DataFrame, masks_csv: str, mask_col: str) -> pd.DataFrame:
    """The index with mask_col joined from masks_csv by path (photos it does not list are used whole)."""
    if not masks_csv:
        if mask_col and mask_col not in index.columns:
            raise DataError(f"mask_col {mask_col!r} is not a column of the split index (columns: {list(index.columns)}); "
                            "name a CSV that has it in masks_csv")
        return index
    table = pd.read_csv(masks_csv, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", mask_col) if c not in table.columns]
    if missing:
        raise DataError(f"{masks_csv} lacks the column(s) {missing}; its columns are {list(table.columns)}")
    masks = table.drop_duplicates("path").set_index("path")[mask_col]
    return index.drop(columns=mask_col, errors="ignore").assign(**{mask_col: index["path"].map(masks).fillna("")})


def _order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def _cosine(q_unit, g_unit, self_rows=None) -> np.ndarray:
    """Cosine of unit query rows to every gallery row; self_rows (leave-one-out): each query's own row at -inf."""
    s = q_unit @ g_unit.T
    if self_rows is not None:
        s[np.arange(len(s)), self_rows] = -np.inf
    return s


def _kreciprocal(q, g, loo: bool, cfg: ProbeConfig) -> np.ndarray:
    """(n_q, n_g) scores (minus the final distance) of k-reciprocal re-ranking over all queries and gallery."""
    items = g if loo else np.concatenate([q, g])
    dist = np.clip(2 - 2 * items @ items.T, 0, 4)
    rows = np.arange(len(g)) if loo else np.arange(len(q))
    cols = np.arange(len(g)) if loo else len(q) + np.arange(len(g))
    final = k_reciprocal_distances(dist, rows, cols, cfg.k1, cfg.k2, cfg.lambda_value)
    if loo:
        np.fill_diagonal(final, np.inf)
    return -final


def _identity_halves(labels: np.ndarray) -> np.ndarray:
    """0/1 per query: its identity's half of the sorted identities, alternating, so both halves hold similar mixes."""
    names = np.unique(labels)
    return (np.searchsorted(names, labels) % 2).astype(int)


def _fit_fusion(cos, inliers, same) -> ScoreFusion:
    return ScoreFusion().fit({"global": cos.ravel(), "local": inliers.ravel()}, same.ravel())


def _shortlist(s: ProbeSet, q_unit, g_unit, q_sift, g_sift, cfg: ProbeConfig):
    """(shortlist gallery rows, their cosines, their inliers, same-identity flags), each (n_q, K), of a probe set."""
    k = min(cfg.shortlist_k, len(g_unit) - s.loo)
    top = np.empty((len(q_unit), k), dtype=np.int64)
    cos = np.empty((len(q_unit), k), dtype=np.float32)
    for rows in query_chunks(len(q_unit), len(g_unit)):
        c = _cosine(q_unit[rows], g_unit, rows if s.loo else None)
        top[rows] = _order(c)[:, :k]
        cos[rows] = np.take_along_axis(c, top[rows], axis=1)
    inliers = shortlist_inliers(q_sift, g_sift, top, SiftConfig(**cfg.sift))
    same = s.gallery[cfg.identity_col].to_numpy()[top] == s.queries[cfg.identity_col].to_numpy()[:, None]
    return top, cos, inliers, same


def _kreciprocal_fits(s: ProbeSet) -> bool:
    n_items = len(s.gallery) if s.loo else len(s.queries) + len(s.gallery)
    if n_items**2 <= MAX_PAIRS:
        return True
    warnings.warn(f"kreciprocal left out: it needs a dense {n_items:,} x {n_items:,} distance matrix, more than the "
                  f"probe holds in memory ({MAX_PAIRS:,} entries); probe a smaller split to include it")
    return False


class _Features:
    """Each backbone's embeddings and the SIFT features, per row set, computed on first use (through the cache)."""

    def __init__(self, cfg: ProbeConfig, settings, progress: bool):
        self.cfg, self.settings, self.progress = cfg, settings, progress
        self.cache_dir = cfg.cache_dir or None
        self.cached, self._sift = [], {}

    def embed(self, backbone, rows: pd.DataFrame):
        emb, info = embeddings(backbone, rows, self.cfg.data_dir, self.settings, self.cfg.mask_col, self.cache_dir,
                               self.cfg.batch_size, self.progress)
        self.cached.append(bool(info.get("cached")))
        return unit_rows(emb, f"{backbone.name} embeddings"), info["ms_per_image"]

    def sift(self, rows: pd.DataFrame):
        key = tuple(rows["path"])
        if key not in self._sift:
            feats, info = sift_table(rows, self.cfg.data_dir, SiftConfig(**self.cfg.sift), self.cfg.mask_col,
                                     self.cache_dir, self.progress)
            self.cached.append(bool(info.get("cached")))
            self._sift[key] = feats, info["ms_per_image"]
        return self._sift[key]

    def set_features(self, backbone, s: ProbeSet):
        """(query vectors, gallery vectors, query SIFT, gallery SIFT) of a probe set."""
        q, _ = self.embed(backbone, s.queries)
        g = q if s.loo else self.embed(backbone, s.gallery)[0]
        q_sift = self.sift(s.queries)[0]
        return q, g, q_sift, q_sift if s.loo else self.sift(s.gallery)[0]


def _fusion_scores(s: ProbeSet, cos, inliers, same, calibration, cfg: ProbeConfig) -> np.ndarray:
    """Fused shortlist scores; calibration = (cos, inliers, same) of another split, or None to cross-fit on s."""
    if calibration is not None:
        fusion = _fit_fusion(*calibration)
        return fusion.fuse({"global": cos, "local": inliers})
    half = _identity_halves(s.queries[cfg.identity_col].to_numpy())
    fused = np.empty_like(cos, dtype=np.float64)
    for h in (0, 1):
        fit_rows, apply_rows = half != h, half == h
        if apply_rows.any():
            fusion = _fit_fusion(cos[fit_rows], inliers[fit_rows], same[fit_rows])
            fused[apply_rows] = fusion.fuse({"global": cos[apply_rows], "local": inliers[apply_rows]})
    return fused


def _probe_backbone(backbone, s: ProbeSet, cal: ProbeSet | None, feats: _Features, cfg: ProbeConfig):
    """{method: (metrics with 'ap' and 'top', feature ms per image, method ms per query)} for one backbone.

    Each method ranks the whole gallery for every query, a chunk of queries at a time; its time is what its own
    work takes (shortlists and fusion calibration included), not the scoring."""
    q, q_ms = feats.embed(backbone, s.queries)
    g = q if s.loo else feats.embed(backbone, s.gallery)[0]
    n_q, out = len(q), {}
    g_labels, q_labels = s.gallery[cfg.identity_col].to_numpy(), s.queries[cfg.identity_col].to_numpy()
    self_rows = (lambda rows: rows) if s.loo else (lambda rows: None)

    def rank(method, feature_ms, order_of, prepare=lambda: None, shared_s=0.0):
        """order_of(rows, prepared) -> rankings of those queries; prepare() runs once before, timed with it;
        shared_s: seconds of work this method shares with another (the shortlist)."""
        t0 = time.perf_counter()
        prepared = prepare()
        seconds = shared_s + time.perf_counter() - t0
        tally = RankingTally(g_labels, q_labels, s.loo, cfg.ranks, keep=TOP_KEPT)
        for rows in query_chunks(n_q, len(g)):
            t0 = time.perf_counter()
            order = order_of(rows, prepared)
            seconds += time.perf_counter() - t0
            tally.add(rows, drop_self(rows, order) if s.loo else order)
        out[method] = (tally.metrics(), feature_ms, 1000 * seconds / n_q)

    if "global" in cfg.methods:
        rank("global", q_ms, lambda rows, _: _order(_cosine(q[rows], g, self_rows(rows))))
    if "qe" in cfg.methods:
        rank("qe", q_ms, lambda rows, _: _order(_cosine(
            query_expansion(q[rows], g, cfg.qe_n, cfg.qe_alpha, self_rows=self_rows(rows)), g, self_rows(rows))))
    if "kreciprocal" in cfg.methods and _kreciprocal_fits(s):
        rank("kreciprocal", q_ms, lambda rows, scores: _order(scores[rows]), lambda: _kreciprocal(q, g, s.loo, cfg))
    if {"local", "fusion"} & set(cfg.methods):
        q_sift, sift_ms = feats.sift(s.queries)
        g_sift = q_sift if s.loo else feats.sift(s.gallery)[0]
        t0 = time.perf_counter()
        _, cos, inliers, same = _shortlist(s, q, g, q_sift, g_sift, cfg)
        shortlist_s = time.perf_counter() - t0

        def reranked(rows, scores):
            return rerank_shortlist(_order(_cosine(q[rows], g, self_rows(rows))), scores[rows])

        def fused():
            calibration = _shortlist(cal, *feats.set_features(backbone, cal), cfg)[1:] if cal is not None else None
            return _fusion_scores(s, cos, inliers, same, calibration, cfg)

        if "local" in cfg.methods:
            rank("local", q_ms + sift_ms, reranked, lambda: inliers, shortlist_s)
        if "fusion" in cfg.methods:
            rank("fusion", q_ms + sift_ms, reranked, fused, shortlist_s)
    return out


def run_probe(cfg: ProbeConfig, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """(one row per backbone x method, {(backbone, method): per-query table with the top-5 gallery rows and AP})."""
    index, splits = load_split_index(cfg.splits_dir)
    index = with_masks(index, cfg.masks_csv, cfg.mask_col)
    s = probe_set(index, cfg.split, cfg.identity_col, cfg.protocol)
    cal = None
    if "fusion" in cfg.methods and cfg.calibrate_on != cfg.split:
        cal = probe_set(index, cfg.calibrate_on, cfg.identity_col, cfg.protocol)
    settings = auto_settings(device=cfg.device)
    feats = _Features(cfg, settings, progress)
    rows, rankings = [], {}
    stamp = datetime.now(timezone.utc)
    run_id = stamp.strftime("%Y%m%d-%H%M%S-%f")
    for spec in cfg.backbones:
        backbone = load_backbone(spec)
        trained_on = backbone.data_fingerprint
        if trained_on and trained_on != splits.report.get("data_fingerprint"):
            raise DataError(f"backbone {backbone.name!r} was trained on other data than {cfg.splits_dir} describes "
                            "(data fingerprints differ): its training photos could be among the probed ones")
        feats.cached = []
        for method, (m, feature_ms, method_ms) in _probe_backbone(backbone, s, cal, feats, cfg).items():
            rows.append({"run_id": run_id, "time": stamp.isoformat(timespec="seconds"), "splits_dir": cfg.splits_dir,
                         "split": cfg.split, "protocol": s.protocol, "identity_col": cfg.identity_col,
                         "mask_col": cfg.mask_col, "backbone": backbone.name, "method": method,
                         **{f"recall@{k}": m[f"recall@{k}"] for k in cfg.ranks},
                         "mAP": m["mAP"], "identity_balanced_mAP": m["identity_balanced_mAP"],
                         "n_queries": len(s.queries), "n_gallery": len(s.gallery) - s.loo,
                         "feature_ms_per_image": feature_ms, "method_ms_per_query": method_ms,
                         "ms_per_query": feature_ms + method_ms, "features_cached": all(feats.cached)})
            rankings[backbone.name, method] = _ranking_table(s, m["top"], m["ap"], cfg.identity_col)
    table = pd.DataFrame(rows)
    return table[[c for c in PROBE_COLUMNS if c in table] + [c for c in table if c not in PROBE_COLUMNS]], rankings


def _ranking_table(s: ProbeSet, top: np.ndarray, ap: np.ndarray, identity_col: str) -> pd.DataFrame:
    """Per query: path, identity, AP and the paths and identities of its first gallery photos (`top`: gallery rows,
    self already out in loo), for figures and the per-query table."""
    return pd.DataFrame({"path": s.queries["path"], "identity": s.queries[identity_col], "ap": ap,
                         "top_paths": list(s.gallery["path"].to_numpy()[top]),
                         "top_identities": list(s.gallery[identity_col].to_numpy()[top])})


def save_probe(table: pd.DataFrame, cfg: ProbeConfig, results_dir: str | os.PathLike = "results",
               rankings: dict | None = None) -> Path:
    """Append the rows to results_dir/probe.csv and write the config snapshot results_dir/probe/<run_id>.json; with
    `rankings`, also each query's AP and top-1 per backbone and method (<run_id>_queries.csv: which photos fail)."""
    results_dir = Path(results_dir)
    for row in table.to_dict("records"):
        append_benchmark_row(results_dir / "probe.csv", row, PROBE_COLUMNS)
    run_id = table["run_id"].iloc[0]
    snapshot = results_dir / "probe" / f"{run_id}.json"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.write_text(json.dumps({"config": asdict(cfg), "rows": table.to_dict("records")}, indent=2, default=str))
    if rankings:
        queries = pd.concat([r.assign(backbone=b, method=m, top1_identity=r["top_identities"].str[0],
                                      top1_path=r["top_paths"].str[0]).drop(columns=["top_paths", "top_identities"])
                             for (b, m), r in rankings.items()], ignore_index=True)
        cols = ["backbone", "method", "path", "identity", "ap", "top1_identity", "top1_path"]
        queries[cols].to_csv(snapshot.with_name(f"{run_id}_queries.csv"), index=False)
    return snapshot


def probe_config(**params) -> ProbeConfig:
    """ProbeConfig from flat notebook parameters; an unknown name is an error listing the valid ones."""
    valid = {f.name for f in dataclasses.fields(ProbeConfig)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"unknown probe parameter(s) {unknown}; valid: {sorted(valid)}")
    return ProbeConfig(**params)
