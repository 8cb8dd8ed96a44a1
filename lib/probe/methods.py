"""Each method's ranking of one probe set by one backbone, and the ensemble's across backbones; the features they
share (embeddings, SIFT, engineered photo features), computed once per probe.

A method is what it costs and how it orders the gallery (_Method); rank_method ranks every query with it, a chunk
of queries at a time, into the one ranking-metrics engine (lib.retrieval.ranking). Its time is what its own work
takes (shortlists and fitting on calibration pairs included), not the scoring; every photo's features are made
before, and charged per image.
"""
from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from lib.probe.config import ProbeConfig
from lib.probe.crossfit import cross_fit, fitted_once
from lib.probe.ensemble import combine, fit_weights, training_pairs
from lib.probe.features import embeddings, inlier_table, photo_table, sift_table
from lib.probe.local_match import SiftConfig
from lib.probe.pair_features import SIFT_GROUPS, pair_features
from lib.probe.photo_features import PHOTO_FEATURES
from lib.probe.probe_set import ProbeSet
from lib.probe.rerank import query_expansion, rerank_shortlist
from lib.probe.scores import approximate_top, cosine, exact_top, fusion_scores, hybrid_scores, kreciprocal_scores, order
from lib.retrieval.faiss_index import unit_rows
from lib.retrieval.ranking import RankingTally, query_chunks

TOP_KEPT = 5  # first gallery photos of each query kept for the per-query table and figures
MAX_PAIRS = 40_000_000  # k-reciprocal's dense (items x items) matrices beyond this take GBs: it is left out


class ProbeFeatures:
    """Each backbone's embeddings and the engineered photo features, per row set, and the SIFT features, per photo,
    computed on first use (through the cache) and kept for the rest of the probe: the ensemble reuses every
    member's. `cached` collects, per lookup, whether the cache had it (the probe resets it per row of its table)."""

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


@dataclass
class _Method:
    """One method as rank_method runs it: order_of(query rows, prepared) ranks the whole gallery for those queries;
    prepare() runs once before, timed with it; shared_s: seconds of work it shares with another method (the
    shortlist); feature_ms: its features' extraction per image; importance(prepared): its feature weights or None."""
    feature_ms: float
    order_of: Callable
    prepare: Callable = lambda: None
    shared_s: float = 0.0
    importance: Callable = lambda prepared: None


def rank_method(s: ProbeSet, cfg: ProbeConfig, n_gallery: int, method: _Method):
    """(metrics with 'ap' and 'top', feature ms per image, method ms per query, importance or None) of one method."""
    t0 = time.perf_counter()
    prepared = method.prepare()
    seconds = method.shared_s + time.perf_counter() - t0
    tally = RankingTally(s.gallery[cfg.identity_col].to_numpy(), s.queries[cfg.identity_col].to_numpy(), s.exclude,
                         cfg.ranks, keep=TOP_KEPT)
    for rows in query_chunks(len(s.queries), n_gallery):
        t0 = time.perf_counter()
        ranked = method.order_of(rows, prepared)
        seconds += time.perf_counter() - t0
        tally.add(rows, ranked)
    return tally.metrics(), method.feature_ms, 1000 * seconds / len(s.queries), method.importance(prepared)


def _kreciprocal_fits(s: ProbeSet) -> bool:
    n_items = len(s.gallery) if s.loo else len(s.queries) + len(s.gallery)
    if n_items**2 <= MAX_PAIRS:
        return True
    warnings.warn(f"kreciprocal left out: it needs a dense {n_items:,} x {n_items:,} distance matrix, more than the "
                  f"probe holds in memory ({MAX_PAIRS:,} entries); probe a smaller split to include it")
    return False


def _global_methods(s: ProbeSet, q, g, q_ms: float, cfg: ProbeConfig) -> dict[str, _Method]:
    """Those of global, qe and kreciprocal that cfg.methods names: the embeddings alone rank the gallery."""
    methods, out = set(cfg.methods), {}
    if "global" in methods:
        out["global"] = _Method(q_ms, lambda rows, _: order(cosine(q[rows], g, s.exclusion_for(rows))))
    if "qe" in methods:
        out["qe"] = _Method(q_ms, lambda rows, _: order(cosine(
            query_expansion(q[rows], g, cfg.qe_n, cfg.qe_alpha, exclude=s.exclusion_for(rows)), g,
            s.exclusion_for(rows))))
    if "kreciprocal" in methods and _kreciprocal_fits(s):
        out["kreciprocal"] = _Method(q_ms, lambda rows, scores: order(scores[rows]),
                                     lambda: kreciprocal_scores(q, g, s, cfg))
    return out


def _shortlist(s: ProbeSet, q_unit, g_unit, cfg: ProbeConfig):
    """(shortlist gallery rows, their cosines, same-identity flags), each (n_q, K), of a probe set."""
    # every shortlist entry a photo the query may find: the most any query leaves out comes off k
    k = min(cfg.shortlist_k, len(g_unit) - (0 if s.exclude is None else int(s.exclude.counts().max())))
    top = approximate_top(s, q_unit, g_unit, k, cfg)
    if top is None:
        top = exact_top(s, q_unit, g_unit, k, np.arange(len(q_unit)))
    else:
        # an approximate index may find fewer than k for a query: that query's shortlist comes from exact search
        short = np.flatnonzero((top < 0).any(axis=1))
        top[short] = exact_top(s, q_unit, g_unit, k, short)
    cos = np.empty((len(q_unit), k), dtype=np.float32)
    # Pair by pair, not taken from the chunk's matrix product: BLAS sums a product in an order that depends on its
    # shape, and the scorers learned from these cosines (fusion, hybrid) must get the same ones however the queries
    # were chunked (the hybrid's trees split on them).
    for rows in query_chunks(len(q_unit), k * q_unit.shape[1]):
        cos[rows] = np.einsum("qd,qkd->qk", q_unit[rows], g_unit[top[rows]])
    same = s.gallery[cfg.identity_col].to_numpy()[top] == s.queries[cfg.identity_col].to_numpy()[:, None]
    return top, cos, same


class _Shortlists(NamedTuple):
    """A probe set's shortlists: global top-K gallery rows per query, their cosines, same-identity flags, and the
    SIFT inliers of each pair (None where no method asked for them)."""
    top: np.ndarray
    cos: np.ndarray
    same: np.ndarray
    inliers: np.ndarray | None


def _inliers(s: ProbeSet, top: np.ndarray, feats: ProbeFeatures, cfg: ProbeConfig) -> np.ndarray:
    return inlier_table(feats.sift(s.queries)[0], feats.sift(s.gallery, top)[0], top, SiftConfig(**cfg.sift),
                        feats.cache_dir)[0]


def _calibration_shortlists(backbone, calibration_set: ProbeSet, feats: ProbeFeatures, cfg: ProbeConfig,
                            with_inliers: bool) -> _Shortlists:
    top, cos, same = _shortlist(calibration_set, *feats.vectors(backbone, calibration_set), cfg)
    return _Shortlists(top, cos, same, _inliers(calibration_set, top, feats, cfg) if with_inliers else None)


def _hybrid_features(s: ProbeSet, short: _Shortlists, feats: ProbeFeatures, cfg: ProbeConfig) -> dict:
    """The hybrid's pair features ({name: (n_q, K)}) of a probe set's shortlist."""
    groups = set(cfg.hybrid_features)
    photos = (feats.photos(s.queries)[0], feats.photos(s.gallery)[0]) if groups & set(PHOTO_FEATURES) else (None,) * 2
    keypoints = (None, None)
    if "keypoints" in groups:
        keypoints = feats.keypoints(s.queries), feats.keypoints(s.gallery, short.top)
    return pair_features(short.top, short.cos, cfg.hybrid_features, *photos, *keypoints, short.inliers)


def _fused(s: ProbeSet, short: _Shortlists, calibration: _Shortlists | None, cfg: ProbeConfig) -> np.ndarray:
    c = None if calibration is None else (calibration.cos, calibration.inliers, calibration.same)
    return fusion_scores(s, short.cos, short.inliers, short.same, c, cfg)


def _boosted(s: ProbeSet, short: _Shortlists, calibration_set: ProbeSet | None, calibration: _Shortlists | None,
             feats: ProbeFeatures, cfg: ProbeConfig) -> tuple[np.ndarray, dict]:
    c = None if calibration is None else (_hybrid_features(calibration_set, calibration, feats, cfg), calibration.same)
    return hybrid_scores(s, _hybrid_features(s, short, feats, cfg), short.same, c, cfg)


def _shortlist_methods(backbone, s: ProbeSet, calibration_set: ProbeSet | None, q, g, q_ms: float,
                       feats: ProbeFeatures, cfg: ProbeConfig) -> dict[str, _Method]:
    """Those of local, fusion and hybrid that cfg.methods names: each re-sorts every query's global shortlist by
    its own score (inliers, fused P(same), the hybrid's P(same)) and keeps the cosine order after it."""
    methods = set(cfg.methods)
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
    short = _Shortlists(top, cos, same, inliers)
    # made on first use, inside the timed prepare() of fusion or the hybrid, and shared by both
    calibration = functools.cache(lambda: None if calibration_set is None else _calibration_shortlists(
        backbone, calibration_set, feats, cfg, with_inliers))

    def reranked(rows, scores):
        return rerank_shortlist(order(cosine(q[rows], g, s.exclusion_for(rows))), scores[rows])

    out, shared_s = {}, shortlist_s + inliers_s
    if "local" in methods:
        out["local"] = _Method(q_ms + sift_ms, reranked, lambda: inliers, shared_s)
    if "fusion" in methods:
        out["fusion"] = _Method(q_ms + sift_ms, reranked, lambda: _fused(s, short, calibration(), cfg), shared_s)
    if "hybrid" in methods:
        out["hybrid"] = _Method(q_ms + photo_ms + sift_ms * bool(hybrid_groups & SIFT_GROUPS),
                                lambda rows, p: reranked(rows, p[0]),
                                lambda: _boosted(s, short, calibration_set, calibration(), feats, cfg),
                                shortlist_s + inliers_s * ("inliers" in hybrid_groups), lambda p: p[1])
    return out


def probe_backbone(backbone, s: ProbeSet, calibration_set: ProbeSet | None, feats: ProbeFeatures,
                   cfg: ProbeConfig) -> dict:
    """{method: (metrics with 'ap' and 'top', feature ms per image, method ms per query, importance or None)} for one
    backbone; calibration_set: the split whose pairs fit the learned methods, None to cross-fit on s."""
    q, q_ms = feats.embed(backbone, s.queries)
    g = q if s.loo else feats.embed(backbone, s.gallery)[0]
    out = {name: rank_method(s, cfg, len(g), m) for name, m in _global_methods(s, q, g, q_ms, cfg).items()}
    if {"local", "fusion", "hybrid"} & set(cfg.methods):  # after the global ones: their timings stay their own
        shortlisted = _shortlist_methods(backbone, s, calibration_set, q, g, q_ms, feats, cfg)
        out |= {name: rank_method(s, cfg, len(g), m) for name, m in shortlisted.items()}
    return out


def ensemble_members(cfg: ProbeConfig) -> list[str]:
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
    return [cosine(q[rows], g, s.exclusion_for(rows)) for q, g in vectors]


def _ensemble_weights(vectors: list, s: ProbeSet, query_rows: np.ndarray, cfg: ProbeConfig) -> np.ndarray:
    """The members' logistic-regression weights, fitted on pairs of the queries `query_rows` (indices) of s."""
    g_labels, q_labels = s.gallery[cfg.identity_col].to_numpy(), s.queries[cfg.identity_col].to_numpy()
    pairs = [training_pairs(_member_cosines(vectors, s, rows), q_labels[rows, None] == g_labels[None], rows)
             for rows in (query_rows[chunk] for chunk in query_chunks(len(query_rows), len(g_labels)))]
    return fit_weights(np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs]))


def probe_ensemble(members: list[str], s: ProbeSet, calibration_set: ProbeSet | None, feats: ProbeFeatures,
                   cfg: ProbeConfig):
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
        if calibration_set is not None:
            weights = _ensemble_weights(set_vectors(calibration_set), calibration_set,
                                        np.arange(len(calibration_set.queries)), cfg)
            models = fitted_once(weights, n_q)
        else:
            models = cross_fit(s.queries[cfg.identity_col].to_numpy(),
                               lambda rows: _ensemble_weights(vectors, s, np.flatnonzero(rows), cfg))
        return models, dict(zip(members, np.mean(models.each(), axis=0).round(4).tolist()))

    def order_of(rows, prepared):
        return order(prepared[0].apply(rows, lambda weights, sub: combine(
            _member_cosines(vectors, s, sub), cfg.ensemble_combine, weights)))

    return rank_method(s, cfg, len(vectors[0][1]), _Method(feature_ms, order_of, prepare, importance=lambda p: p[1]))
