"""Probe: how well do retrieval methods identify individuals, on one split, with pretrained or fine-tuned
backbones? One row per method x backbone with identity-balanced mAP, CMC and the time each costs per query.

Methods, each a full ranking of the gallery per query:
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
needs a dense all-pairs matrix and is left out, with a warning, where that would not fit (MAX_PAIRS).
"""
from __future__ import annotations

import dataclasses
import functools
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
from lib.probe.crossfit import QueryModels, cross_fit, fitted_once
from lib.probe.ensemble import COMBINERS, combine, fit_weights, training_pairs
from lib.probe.features import embeddings, inlier_table, load_backbone, photo_table, sift_table
from lib.probe.fusion import ScoreFusion
from lib.probe.hybrid import HybridScorer, gbm_params
from lib.probe.local_match import SiftConfig
from lib.probe.pair_features import HYBRID_FEATURES, SIFT_GROUPS, pair_features
from lib.probe.photo_features import PHOTO_FEATURES
from lib.probe.rerank import k_reciprocal_distances, query_expansion, rerank_shortlist
from lib.retrieval.ann_index import (
    EF_SEARCH,
    NPROBE,
    IndexSpec,
    approximation_recall,
    build_search_index,
    describe,
    is_exact,
    new_index,
    resolve_factory,
)
from lib.retrieval.embed import EMBED_BATCH_SIZE
from lib.retrieval.exclusion import NO_NEIGHBOUR, Exclusion, leave_one_out, resolve_loo_rule
from lib.retrieval.faiss_index import knn, unit_rows
from lib.retrieval.ranking import RankingTally, query_chunks, resolve_val_protocol

METHODS = ("global", "qe", "kreciprocal", "local", "fusion", "ensemble", "hybrid")
SIFT_PHOTOS = ("shortlisted", "all")  # gallery photos whose SIFT features the probe computes
LEARNED = ("fusion", "ensemble", "hybrid")  # methods fitted on pairs with known answers (calibrate_on)
ENSEMBLE_JOIN = " and "  # the ensemble row's backbone: its members' names joined so (MLflow refuses '+' in names)
TOP_KEPT = 5  # first gallery photos of each query kept for the per-query table and figures
MAX_PAIRS = 40_000_000  # k-reciprocal's dense (items x items) matrices beyond this take GBs: it is left out
PROBE_COLUMNS = ("run_id", "time", "splits_dir", "split", "protocol", "loo_rule", "identity_col", "mask_col", "backbone",
                 "method", "recall@1", "recall@5", "mAP", "identity_balanced_mAP", "n_queries", "n_gallery",
                 "feature_ms_per_image", "method_ms_per_query", "ms_per_query", "features_cached", "importance")


@dataclass
class ProbeConfig:
    data_dir: str = "data/demo"
    splits_dir: str = "splits"
    split: str = "val"                 # the probed split; 'test' only when asked for, as everywhere
    identity_col: str = "label"        # column naming the individual ('group' = the folder layout's ID)
    protocol: str = "auto"             # auto | gallery (train photos are the gallery) | loo (split all-vs-all)
    # leave-one-out: what a query may not find besides itself (lib.retrieval.exclusion): group (the other photos of
    # its group: encounter, sighting, photo) | photo (itself only) | auto (group where the groups are finer than
    # the individuals)
    loo_rule: str = "auto"
    methods: list = field(default_factory=lambda: list(METHODS))
    ranks: list = field(default_factory=lambda: [1, 5])  # CMC ranks, reported as recall@k
    backbones: list = field(default_factory=lambda: [
        {"name": "imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224}])
    shortlist_k: int = 20              # global candidates re-scored by local matching and fusion
    # the shortlist's search (notebook 03's `index`): flat | ivf | hnsw | ivfpq | auto (exact below 200,000 gallery
    # photos) | a faiss factory string; an approximate one says its recall against exact search
    index: str = "auto"
    nprobe: int = NPROBE
    ef_search: int = EF_SEARCH
    qe_n: int = 3
    qe_alpha: float = 3.0
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    sift: dict = field(default_factory=dict)  # SiftConfig fields (max_side, n_features, ratio, ransac_px, geometry)
    # shortlisted: SIFT of the queries and of the gallery photos in some query's shortlist, the only ones matched,
    # so the rankings are the same as with 'all' (every gallery photo) at a cost that grows with queries x
    # shortlist_k, not with the gallery; 'all' fills the cache for a whole gallery ahead of later probes.
    sift_photos: str = "shortlisted"
    calibrate_on: str = "val"          # split whose pairs fit fusion, the ensemble's weights and the hybrid's trees
    ensemble_members: list = field(default_factory=list)  # backbone names the ensemble combines; []: all probed
    ensemble_combine: str = "logistic"  # rank | score | logistic (weights learned on calibrate_on pairs)
    hybrid_features: list = field(default_factory=lambda: list(HYBRID_FEATURES))  # pair feature groups
    hybrid_params: dict = field(default_factory=dict)  # LightGBM overrides of lib.probe.hybrid.DEFAULT_PARAMS
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
        if self.sift_photos not in SIFT_PHOTOS:
            raise ValueError(f"sift_photos {self.sift_photos!r}: choose from {', '.join(SIFT_PHOTOS)}")
        if self.ensemble_combine not in COMBINERS:
            raise ValueError(f"ensemble_combine {self.ensemble_combine!r}: choose from {', '.join(COMBINERS)}")
        strangers = sorted(set(self.ensemble_members) - set(names))
        if strangers or len(set(self.ensemble_members)) == 1:
            raise ValueError(f"ensemble_members {self.ensemble_members}: name two or more of the backbones {names} "
                             "(or none: all of them)")
        unknown = sorted(set(self.hybrid_features) - set(HYBRID_FEATURES))
        if unknown or not self.hybrid_features:
            raise ValueError(f"hybrid_features {unknown or self.hybrid_features}: choose from "
                             f"{', '.join(HYBRID_FEATURES)}")
        gbm_params(self.hybrid_params)


@dataclass
class ProbeSet:
    """One probed split: query rows, gallery rows, whether the gallery is the queries themselves, and under
    leave-one-out the rule (lib.retrieval.exclusion) of what each query may not find: `exclude`, its `loo_rule`."""
    queries: pd.DataFrame
    gallery: pd.DataFrame
    protocol: str
    exclude: Exclusion | None = None

    @property
    def loo(self) -> bool:
        return self.protocol == "loo"

    @property
    def loo_rule(self) -> str:
        return self.exclude.rule if self.exclude is not None else ""

    def excluding(self, rows) -> Exclusion | None:
        """The rule for the queries `rows`, None without one."""
        return None if self.exclude is None else self.exclude.of(rows)


def probe_set(index: pd.DataFrame, split: str, identity_col: str, protocol: str, loo_rule: str = "auto") -> ProbeSet:
    if identity_col not in index.columns:
        raise DataError(f"identity_col {identity_col!r} is not a column of the split index; it has {list(index.columns)}")
    queries = index[index["split"] == split].reset_index(drop=True)
    train = index[index["split"] == "train"].reset_index(drop=True)
    if queries.empty:
        raise DataError(f"the split index has no '{split}' photos; splits: {sorted(set(index['split']) - {''})}")
    protocol = resolve_val_protocol(protocol, train[identity_col], queries[identity_col])
    if protocol != "loo":
        return ProbeSet(queries, train, protocol)
    rule = resolve_loo_rule(loo_rule, queries[identity_col], queries["group"])
    return ProbeSet(queries, queries, protocol,
                    leave_one_out(len(queries), queries["group"].to_numpy() if rule == "group" else None))


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


def _cosine(q_unit, g_unit, exclude: Exclusion | None = None) -> np.ndarray:
    """Cosine of unit query rows to every gallery row; with `exclude` (one key per query) the rows it leaves out at
    -inf."""
    s = q_unit @ g_unit.T
    return s if exclude is None else exclude.fill(s)


def _kreciprocal(q, g, s: ProbeSet, cfg: ProbeConfig) -> np.ndarray:
    """(n_q, n_g) scores (minus the final distance) of k-reciprocal re-ranking over all queries and gallery. Under
    leave-one-out the neighbourhoods are those of the whole split and the left-out rows leave only the final
    ranking, as Market-1501's evaluation leaves its junk images in the re-ranked gallery."""
    items = g if s.loo else np.concatenate([q, g])
    dist = np.clip(2 - 2 * items @ items.T, 0, 4)
    rows = np.arange(len(g)) if s.loo else np.arange(len(q))
    cols = np.arange(len(g)) if s.loo else len(q) + np.arange(len(g))
    scores = -k_reciprocal_distances(dist, rows, cols, cfg.k1, cfg.k2, cfg.lambda_value)
    return scores if s.exclude is None else s.exclude.fill(scores)


def _fit_fusion(cos, inliers, same) -> ScoreFusion:
    return ScoreFusion().fit({"global": cos.ravel(), "local": inliers.ravel()}, same.ravel())


def _shortlist(s: ProbeSet, q_unit, g_unit, cfg: ProbeConfig):
    """(shortlist gallery rows, their cosines, same-identity flags), each (n_q, K), of a probe set."""
    # every shortlist entry a photo the query may find: the most any query leaves out comes off k
    k = min(cfg.shortlist_k, len(g_unit) - (0 if s.exclude is None else int(s.exclude.counts().max())))
    top = _approximate_top(s, q_unit, g_unit, k, cfg)
    if top is None:
        top = _exact_top(s, q_unit, g_unit, k, np.arange(len(q_unit)))
    else:
        # an approximate index may find fewer than k for a query: that query's shortlist comes from exact search
        short = np.flatnonzero((top < 0).any(axis=1))
        top[short] = _exact_top(s, q_unit, g_unit, k, short)
    cos = np.empty((len(q_unit), k), dtype=np.float32)
    # Pair by pair, not taken from the chunk's matrix product: BLAS sums a product in an order that depends on its
    # shape, and the scorers learned from these cosines (fusion, hybrid) must get the same ones however the queries
    # were chunked (the hybrid's trees split on them).
    for rows in query_chunks(len(q_unit), k * q_unit.shape[1]):
        cos[rows] = np.einsum("qd,qkd->qk", q_unit[rows], g_unit[top[rows]])
    same = s.gallery[cfg.identity_col].to_numpy()[top] == s.queries[cfg.identity_col].to_numpy()[:, None]
    return top, cos, same


def _exact_top(s: ProbeSet, q_unit, g_unit, k: int, queries: np.ndarray) -> np.ndarray:
    """(len(queries), k) gallery rows of the `queries` rows' k highest cosines, a chunk of queries at a time."""
    top = np.empty((len(queries), k), dtype=np.int64)
    for rows in query_chunks(len(queries), len(g_unit)):
        q = queries[rows]
        top[rows] = _order(_cosine(q_unit[q], g_unit, s.excluding(q)))[:, :k]
    return top


def _approximate_top(s: ProbeSet, q_unit, g_unit, k: int, cfg: ProbeConfig) -> np.ndarray | None:
    """The k nearest gallery rows of every query through cfg.index's approximate Faiss index (padded with -1 where it
    finds fewer), printing what it costs against exact search; None where cfg.index resolves to exact search."""
    spec = IndexSpec(index=cfg.index, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    factory, _ = resolve_factory(spec.index, *g_unit.shape, spec.exact_below)
    if is_exact(new_index(factory, g_unit.shape[1])):
        return None
    index, info = build_search_index(g_unit, spec, device=cfg.device)
    _, top = knn(index, q_unit, k, s.exclude)
    info["recall_vs_exact"] = approximation_recall(index, g_unit, q_unit, k, spec.recall_sample, exclude_self=s.loo)
    print(f"shortlist {describe(info)}")
    return top


def _kreciprocal_fits(s: ProbeSet) -> bool:
    n_items = len(s.gallery) if s.loo else len(s.queries) + len(s.gallery)
    if n_items**2 <= MAX_PAIRS:
        return True
    warnings.warn(f"kreciprocal left out: it needs a dense {n_items:,} x {n_items:,} distance matrix, more than the "
                  f"probe holds in memory ({MAX_PAIRS:,} entries); probe a smaller split to include it")
    return False


class _Features:
    """Each backbone's embeddings and the engineered photo features, per row set, and the SIFT features, per photo,
    computed on first use (through the cache) and kept for the rest of the probe: the ensemble reuses every
    member's."""

    def __init__(self, cfg: ProbeConfig, settings, progress: bool):
        self.cfg, self.settings, self.progress = cfg, settings, progress
        self.cache_dir = cfg.cache_dir or None
        self.cached, self._embedded, self._sift, self._photos = [], {}, {}, {}

    def embed(self, backbone, rows: pd.DataFrame):
        """(unit vectors, ms per image of their extraction) of the rows' photos by `backbone`."""
        key = backbone.name, tuple(rows["path"])
        if key not in self._embedded:
            emb, info = embeddings(backbone, rows, self.cfg.data_dir, self.settings, self.cfg.mask_col,
                                   self.cache_dir, self.cfg.batch_size, self.progress)
            self._embedded[key] = (unit_rows(emb, f"{backbone.name} embeddings"), info["ms_per_image"],
                                   bool(info.get("cached")))
        return self.kept(backbone.name, rows)

    def kept(self, name: str, rows: pd.DataFrame):
        """(unit vectors, ms per image) that embed() made of the rows' photos by the backbone called `name`."""
        vectors, ms, cached = self._embedded[name, tuple(rows["path"])]
        self.cached.append(cached)
        return vectors, ms

    def vectors(self, backbone, s: ProbeSet):
        """(query vectors, gallery vectors) of a probe set."""
        q, _ = self.embed(backbone, s.queries)
        return q, q if s.loo else self.embed(backbone, s.gallery)[0]

    def sift(self, rows: pd.DataFrame, shortlists: np.ndarray | None = None):
        """([(keypoints, descriptors)] per row, mean ms per image of their extraction) of the rows' photos; given
        shortlists (row numbers of `rows`) and sift_photos 'shortlisted', of those rows only, the others None.
        Kept per photo: another backbone's or split's shortlist computes only the photos not held yet."""
        paths = rows["path"].tolist()
        wanted = set(range(len(paths)))
        if shortlists is not None and self.cfg.sift_photos == "shortlisted":
            wanted = set(np.ravel(shortlists).tolist())
        new = sorted(i for i in wanted if paths[i] not in self._sift)
        if new:
            feats, info = sift_table(rows.iloc[new], self.cfg.data_dir, SiftConfig(**self.cfg.sift),
                                     self.cfg.mask_col, self.cache_dir, self.progress)
            self.cached.append(info["cached"])
            self._sift.update(zip([paths[i] for i in new], zip(feats, info["ms_per_photo"])))
        held = [self._sift[p] if i in wanted else (None, np.nan) for i, p in enumerate(paths)]
        return [f for f, _ in held], float(np.nanmean([ms for _, ms in held])) if wanted else 0.0

    def keypoints(self, rows: pd.DataFrame, shortlists: np.ndarray | None = None) -> np.ndarray:
        """Keypoint counts of the rows' photos as sift() gives them: NaN where it computed none."""
        return np.array([np.nan if f is None else len(f[0]) for f in self.sift(rows, shortlists)[0]])

    def photos(self, rows: pd.DataFrame):
        """({'colour', 'lbp', 'hog'}: (n, d) engineered features, ms per image) of the rows' photos."""
        key = tuple(rows["path"])
        if key not in self._photos:
            table, info = photo_table(rows, self.cfg.data_dir, self.cfg.mask_col, self.cache_dir, self.progress)
            self.cached.append(bool(info.get("cached")))
            self._photos[key] = table, info["ms_per_image"]
        return self._photos[key]


def _inliers(s: ProbeSet, top: np.ndarray, feats: _Features, cfg: ProbeConfig) -> np.ndarray:
    return inlier_table(feats.sift(s.queries)[0], feats.sift(s.gallery, top)[0], top, SiftConfig(**cfg.sift),
                        feats.cache_dir)[0]


def _fitted(s: ProbeSet, cfg: ProbeConfig, fit_here, fit_calibration=None) -> QueryModels:
    """The model scoring each query: fit_calibration() (pairs of another split) when given, else cross-fitted by
    identity on this split, fit_here(rows) with rows a bool mask of the queries to fit on."""
    if fit_calibration is not None:
        return fitted_once(fit_calibration(), len(s.queries))
    return cross_fit(s.queries[cfg.identity_col].to_numpy(), fit_here)


def _fusion_scores(s: ProbeSet, cos, inliers, same, calibration, cfg: ProbeConfig) -> np.ndarray:
    """Fused shortlist scores; calibration = (cos, inliers, same) of another split, or None to cross-fit on s."""
    models = _fitted(s, cfg, lambda rows: _fit_fusion(cos[rows], inliers[rows], same[rows]),
                     None if calibration is None else lambda: _fit_fusion(*calibration))
    return models.apply(np.arange(len(cos)),
                        lambda fusion, rows: fusion.fuse({"global": cos[rows], "local": inliers[rows]}))


def _hybrid_features(s: ProbeSet, top, cos, inliers, feats: _Features, cfg: ProbeConfig) -> dict:
    """The hybrid's pair features ({name: (n_q, K)}) of a probe set's shortlist."""
    groups = set(cfg.hybrid_features)
    photos = (feats.photos(s.queries)[0], feats.photos(s.gallery)[0]) if groups & set(PHOTO_FEATURES) else (None,) * 2
    keypoints = (None, None)
    if "keypoints" in groups:
        keypoints = feats.keypoints(s.queries), feats.keypoints(s.gallery, top)
    return pair_features(top, cos, cfg.hybrid_features, *photos, *keypoints, inliers)


def _hybrid_scores(s: ProbeSet, features: dict, same, calibration, cfg: ProbeConfig) -> tuple[np.ndarray, dict]:
    """(P(same) of the shortlist pairs, each feature's gain share averaged over the fitted models); calibration =
    (features, same) of another split's shortlists, or None to cross-fit on s."""
    def rows_of(rows):
        return {name: f[rows] for name, f in features.items()}

    models = _fitted(s, cfg, lambda rows: HybridScorer(cfg.hybrid_params).fit(rows_of(rows), same[rows]),
                     None if calibration is None else lambda: HybridScorer(cfg.hybrid_params).fit(*calibration))
    importance = pd.concat([m.importances() for m in models.each()], axis=1).mean(axis=1)
    scores = models.apply(np.arange(len(same)), lambda model, rows: model.score(rows_of(rows)))
    return scores, importance.sort_values(ascending=False).round(4).to_dict()


def _rank(s: ProbeSet, cfg: ProbeConfig, n_gallery: int, order_of, prepare=lambda: None, shared_s: float = 0.0):
    """(metrics with 'ap' and 'top', method ms per query, what prepare() returned) of one method: order_of(rows,
    prepared) ranks the whole gallery for those queries, a chunk of queries at a time; prepare() runs once before,
    timed with it; shared_s: seconds of work this method shares with another (the shortlist)."""
    t0 = time.perf_counter()
    prepared = prepare()
    seconds = shared_s + time.perf_counter() - t0
    tally = RankingTally(s.gallery[cfg.identity_col].to_numpy(), s.queries[cfg.identity_col].to_numpy(), s.exclude,
                         cfg.ranks, keep=TOP_KEPT)
    for rows in query_chunks(len(s.queries), n_gallery):
        t0 = time.perf_counter()
        order = order_of(rows, prepared)
        seconds += time.perf_counter() - t0
        tally.add(rows, order)
    return tally.metrics(), 1000 * seconds / len(s.queries), prepared


def _probe_backbone(backbone, s: ProbeSet, cal: ProbeSet | None, feats: _Features, cfg: ProbeConfig):
    """{method: (metrics with 'ap' and 'top', feature ms per image, method ms per query, importance or None)} for one
    backbone.

    Each method ranks the whole gallery for every query, a chunk of queries at a time; its time is what its own
    work takes (shortlists and fitting on calibration pairs included), not the scoring. Every photo's features
    (embeddings, SIFT, engineered) are made before, and charged per image."""
    q, q_ms = feats.embed(backbone, s.queries)
    g = q if s.loo else feats.embed(backbone, s.gallery)[0]
    methods, out = set(cfg.methods), {}
    excluding = s.excluding

    def rank(method, feature_ms, order_of, prepare=lambda: None, shared_s=0.0, importance=lambda prepared: None):
        m, method_ms, prepared = _rank(s, cfg, len(g), order_of, prepare, shared_s)
        out[method] = (m, feature_ms, method_ms, importance(prepared))

    if "global" in methods:
        rank("global", q_ms, lambda rows, _: _order(_cosine(q[rows], g, excluding(rows))))
    if "qe" in methods:
        rank("qe", q_ms, lambda rows, _: _order(_cosine(
            query_expansion(q[rows], g, cfg.qe_n, cfg.qe_alpha, exclude=excluding(rows)), g, excluding(rows))))
    if "kreciprocal" in methods and _kreciprocal_fits(s):
        rank("kreciprocal", q_ms, lambda rows, scores: _order(scores[rows]), lambda: _kreciprocal(q, g, s, cfg))
    if not {"local", "fusion", "hybrid"} & methods:
        return out

    hybrid_groups = set(cfg.hybrid_features) if "hybrid" in methods else set()
    with_inliers = bool({"local", "fusion"} & methods) or "inliers" in hybrid_groups
    sift_ms = photo_ms = inliers_s = 0.0
    t0 = time.perf_counter()
    top, cos, same = _shortlist(s, q, g, cfg)
    shortlist_s = time.perf_counter() - t0
    if with_inliers or hybrid_groups & SIFT_GROUPS:  # before the timed matching, charged per image like the rest
        sift_ms = feats.sift(s.queries)[1]
        feats.sift(s.gallery, top)
    if hybrid_groups & set(PHOTO_FEATURES):
        photo_ms = feats.photos(s.queries)[1]
        feats.photos(s.gallery)
    inliers = None
    if with_inliers:
        t0 = time.perf_counter()
        inliers = _inliers(s, top, feats, cfg)
        inliers_s = time.perf_counter() - t0

    @functools.cache
    def calibration():
        """(top, cos, same, inliers or None) of the calibration split's shortlists, for fusion and the hybrid."""
        c_top, c_cos, c_same = _shortlist(cal, *feats.vectors(backbone, cal), cfg)
        return c_top, c_cos, c_same, _inliers(cal, c_top, feats, cfg) if with_inliers else None

    def reranked(rows, scores):
        return rerank_shortlist(_order(_cosine(q[rows], g, excluding(rows))), scores[rows])

    def fused():
        c = None if cal is None else calibration()
        return _fusion_scores(s, cos, inliers, same, None if c is None else (c[1], c[3], c[2]), cfg)

    def boosted():
        c = None
        if cal is not None:
            c_top, c_cos, c_same, c_inliers = calibration()
            c = _hybrid_features(cal, c_top, c_cos, c_inliers, feats, cfg), c_same
        return _hybrid_scores(s, _hybrid_features(s, top, cos, inliers, feats, cfg), same, c, cfg)

    if "local" in methods:
        rank("local", q_ms + sift_ms, reranked, lambda: inliers, shortlist_s + inliers_s)
    if "fusion" in methods:
        rank("fusion", q_ms + sift_ms, reranked, fused, shortlist_s + inliers_s)
    if "hybrid" in methods:
        uses_sift = bool(hybrid_groups & SIFT_GROUPS)
        rank("hybrid", q_ms + photo_ms + sift_ms * uses_sift, lambda rows, p: reranked(rows, p[0]), boosted,
             shortlist_s + inliers_s * ("inliers" in hybrid_groups), importance=lambda p: p[1])
    return out


def _ensemble_members(cfg: ProbeConfig) -> list[str]:
    """The backbones the ensemble combines; none (with a warning) when the probe has fewer than two."""
    if "ensemble" not in cfg.methods:
        return []
    members = cfg.ensemble_members or [b["name"] for b in cfg.backbones]
    if len(members) < 2:
        warnings.warn("ensemble left out: it combines two or more backbones and the probe has one; add backbones or "
                      "runs to include it")
        return []
    return list(members)


def _member_cosines(vectors: list, s: ProbeSet, rows: np.ndarray) -> list[np.ndarray]:
    return [_cosine(q[rows], g, s.excluding(rows)) for q, g in vectors]


def _ensemble_weights(vectors: list, s: ProbeSet, query_rows: np.ndarray, cfg: ProbeConfig) -> np.ndarray:
    """The members' logistic-regression weights, fitted on pairs of the queries `query_rows` (indices) of s."""
    g_labels, q_labels = s.gallery[cfg.identity_col].to_numpy(), s.queries[cfg.identity_col].to_numpy()
    pairs = [training_pairs(_member_cosines(vectors, s, rows), q_labels[rows, None] == g_labels[None], rows)
             for rows in (query_rows[chunk] for chunk in query_chunks(len(query_rows), len(g_labels)))]
    return fit_weights(np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs]))


def _probe_ensemble(members: list[str], s: ProbeSet, cal: ProbeSet | None, feats: _Features, cfg: ProbeConfig):
    """(metrics, feature ms per image, method ms per query, {member: weight} or None) of the ensemble of the
    members' global cosines; their vectors are the ones their own probes made."""
    def set_vectors(p: ProbeSet):
        return [(feats.kept(m, p.queries)[0], feats.kept(m, p.gallery)[0]) for m in members]

    vectors = set_vectors(s)
    feature_ms = sum(feats.kept(m, s.queries)[1] for m in members)  # every member embeds each query photo

    def prepare():
        n_q = len(s.queries)
        if cfg.ensemble_combine != "logistic":
            return fitted_once(None, n_q), None
        if cal is not None:
            models = fitted_once(_ensemble_weights(set_vectors(cal), cal, np.arange(len(cal.queries)), cfg), n_q)
        else:
            models = cross_fit(s.queries[cfg.identity_col].to_numpy(),
                               lambda rows: _ensemble_weights(vectors, s, np.flatnonzero(rows), cfg))
        return models, dict(zip(members, np.mean(models.each(), axis=0).round(4).tolist()))

    def order_of(rows, prepared):
        return _order(prepared[0].apply(rows, lambda weights, sub: combine(
            _member_cosines(vectors, s, sub), cfg.ensemble_combine, weights)))

    m, method_ms, (_, importance) = _rank(s, cfg, len(vectors[0][1]), order_of, prepare)
    return m, feature_ms, method_ms, importance


def run_probe(cfg: ProbeConfig, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """(one row per backbone x method, and one for the ensemble, {(backbone, method): per-query table with the top-5
    gallery rows and AP}); the ensemble's backbone is its members' names joined by ENSEMBLE_JOIN."""
    index, splits = load_split_index(cfg.splits_dir)
    index = with_masks(index, cfg.masks_csv, cfg.mask_col)
    s = probe_set(index, cfg.split, cfg.identity_col, cfg.protocol, cfg.loo_rule)
    cal = None
    if set(LEARNED) & set(cfg.methods) and cfg.calibrate_on != cfg.split:
        cal = probe_set(index, cfg.calibrate_on, cfg.identity_col, cfg.protocol, cfg.loo_rule)
    settings = auto_settings(device=cfg.device)
    feats = _Features(cfg, settings, progress)
    members = _ensemble_members(cfg)
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
        if backbone.name in members and cal is not None and cfg.ensemble_combine == "logistic":
            feats.vectors(backbone, cal)  # while the backbone is loaded: the ensemble's weights are fitted on them
        for method, result in _probe_backbone(backbone, s, cal, feats, cfg).items():
            results[backbone.name, method] = (*result, all(feats.cached))
    if members:
        feats.cached = []
        ensemble = _probe_ensemble(members, s, cal, feats, cfg)
        results[ENSEMBLE_JOIN.join(members), "ensemble"] = (*ensemble, all(feats.cached))
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
        rankings[name, method] = _ranking_table(s, m["top"], m["ap"], cfg.identity_col)
    table = pd.DataFrame(rows)
    return table[[c for c in PROBE_COLUMNS if c in table] + [c for c in table if c not in PROBE_COLUMNS]], rankings


def _ranking_table(s: ProbeSet, top: np.ndarray, ap: np.ndarray, identity_col: str) -> pd.DataFrame:
    """Per query: path, identity, AP and the paths and identities of its first gallery photos (`top`: gallery rows,
    the left-out ones already out in loo; '' past the end of a short ranking), for figures and the per-query table."""
    def of(column):
        return list(np.where(top == NO_NEIGHBOUR, "", s.gallery[column].to_numpy().astype(str)[top]))

    return pd.DataFrame({"path": s.queries["path"], "identity": s.queries[identity_col], "ap": ap,
                         "top_paths": of("path"), "top_identities": of(identity_col)})


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
