"""The probe's methods, one ProbeMethod record each in PROBE_METHODS (its name, whether it is learned, what shared
work it needs, which is its cost, and how it ranks), and the runs of one probe set by one backbone, and the
ensemble's across backbones.

A method's build(context) gives a MethodRun: what it costs per image and how it orders the gallery; rank_method ranks
every query with it, a chunk of queries at a time, into the one ranking-metrics engine (lib.retrieval.ranking). Its
time is what its own work takes (shortlists and fitting on calibration pairs included), not the scoring; every
photo's features are made before, and charged per image.
"""
from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from lib.probe.crossfit import fitted_once
from lib.probe.ensemble import combine, fit_weights, training_pairs
from lib.probe.features import ProbeFeatures, inlier_table
from lib.probe.local_match import SiftConfig
from lib.probe.pair_features import SIFT_GROUPS, pair_features
from lib.probe.photo_features import PHOTO_FEATURES
from lib.probe.rerank import query_expansion, rerank_shortlist
from lib.probe.scores import (approximate_top, cosine, exact_top, fitted_models, fusion_scores, hybrid_scores,
                              kreciprocal_scores, order)
from lib.retrieval.exclusion import most_left_out
from lib.retrieval.ranking import RankingTally, query_chunks
from lib.retrieval.retrieval_split import RetrievalSplit

if TYPE_CHECKING:  # the config checks method names against PROBE_METHODS, so it imports this module
    from lib.probe.config import ProbeConfig

TOP_KEPT = 5  # first gallery photos of each query kept for the per-query table and figures
MAX_PAIRS = 40_000_000  # k-reciprocal's dense (items x items) matrices beyond this take GBs: it is left out


@dataclass
class MethodRun:
    """One method as rank_method runs it on one probe set: order_of(query rows, prepared) ranks the whole gallery for
    those queries; prepare() runs once before, timed with it; shared_s: seconds of work it shares with another
    method (the shortlist); feature_ms: its features' extraction per image; importance(prepared): its feature weights
    or None."""
    feature_ms: float
    order_of: Callable
    prepare: Callable = lambda: None
    shared_s: float = 0.0
    importance: Callable = lambda prepared: None


@dataclass(frozen=True)
class ProbeMethod:
    """One probe method.

    ranks: 'embeddings' (the embeddings alone rank the gallery), 'shortlist' (re-sorts each query's global
    shortlist by its own score, the cosine order after it) or 'backbones' (combines several backbones' cosines).
    learned: fitted on pairs with known answers, of the calibrate_on split (cross-fitted by identity when that is the
    probed split; fit through scores.fitted_models).
    needs(cfg): the shared work it uses ('sift', 'inliers', 'photos'), computed once per backbone before the
    shortlist methods and charged to each that uses it (its cost).
    build(context): its MethodRun for one probe set (_Backbone, or _Backbones for 'backbones'), or None when it
    cannot run there (after a warning). Its knobs are ProbeConfig fields and notebook 06 parameters.
    """
    name: str
    ranks: str
    learned: bool
    build: Callable
    needs: Callable = field(default=lambda cfg: frozenset())
    # (backbone, calibration set, features, cfg): work while each backbone is loaded, before its own methods run
    while_loaded: Callable | None = None


def rank_method(s: RetrievalSplit, cfg: ProbeConfig, n_gallery: int, method: MethodRun):
    """(metrics with 'ap' and 'top', feature ms per image, method ms per query, importance or None) of one method."""
    t0 = time.perf_counter()
    prepared = method.prepare()
    seconds = method.shared_s + time.perf_counter() - t0
    tally = RankingTally(s.gallery_labels, s.query_labels, s.exclude, cfg.ranks, keep=TOP_KEPT)
    for rows in query_chunks(len(s.queries), n_gallery):
        t0 = time.perf_counter()
        ranked = method.order_of(rows, prepared)
        seconds += time.perf_counter() - t0
        tally.add(rows, ranked)
    return tally.metrics(), method.feature_ms, 1000 * seconds / len(s.queries), method.importance(prepared)


def _kreciprocal_fits(s: RetrievalSplit) -> bool:
    n_items = len(s.gallery) if s.loo else len(s.queries) + len(s.gallery)
    if n_items**2 <= MAX_PAIRS:
        return True
    warnings.warn(f"kreciprocal left out: it needs a dense {n_items:,} x {n_items:,} distance matrix, more than the "
                  f"probe holds in memory ({MAX_PAIRS:,} entries); probe a smaller split to include it")
    return False


@dataclass
class _Backbone:
    """What every method of one backbone on one probe set starts from: unit query and gallery vectors, the queries'
    embedding ms per image, and (shortlist methods) the shared shortlist work, made on first use."""
    backbone: object
    s: RetrievalSplit
    calibration_set: RetrievalSplit | None
    feats: ProbeFeatures
    cfg: ProbeConfig
    q: np.ndarray
    g: np.ndarray
    q_ms: float
    work: _ShortlistWork | None = None

    def shortlisted(self) -> _ShortlistWork:
        if self.work is None:
            self.work = _shortlist_work(self)
        return self.work

    def global_order(self, rows) -> np.ndarray:
        """The gallery rows by cosine, nearest first, for the query rows (their left-out rows excluded)."""
        return order(cosine(self.q[rows], self.g, self.s.exclusion_for(rows)))

    def reranked(self, rows, scores):
        """The cosine order of the query rows with each one's shortlist re-sorted by its scores first."""
        return rerank_shortlist(self.global_order(rows), scores[rows])

    def shortlist_run(self, name: str, order_of: Callable, prepare: Callable, importance=None) -> MethodRun:
        """The shortlist method `name`'s run, charged the shared work its record needs: SIFT per image where it uses
        SIFT, the engineered features per image where it uses them, the shortlist's and the inliers' seconds."""
        needs = PROBE_METHODS[name].needs(self.cfg)
        w = self.shortlisted()
        feature_ms = (self.q_ms + w.sift_ms * bool(needs & {"sift", "inliers"})
                      + w.photo_ms * ("photos" in needs))
        shared_s = w.shortlist_s + w.inliers_s * ("inliers" in needs)
        return MethodRun(feature_ms, order_of, prepare, shared_s, importance or (lambda prepared: None))


def _shortlist(s: RetrievalSplit, q_unit, g_unit, cfg: ProbeConfig):
    """(shortlist gallery rows, their cosines, same-identity flags), each (n_q, K), of a probe set."""
    # every shortlist entry a photo the query may find: the most any query leaves out comes off k
    k = min(cfg.shortlist_k, len(g_unit) - most_left_out(s.exclude))
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
    same = s.gallery_labels[top] == s.query_labels[:, None]
    return top, cos, same


class _Shortlists(NamedTuple):
    """A probe set's shortlists: global top-K gallery rows per query, their cosines, same-identity flags, and the
    SIFT inliers of each pair (None where no method asked for them)."""
    top: np.ndarray
    cos: np.ndarray
    same: np.ndarray
    inliers: np.ndarray | None


class _ShortlistWork(NamedTuple):
    """The shortlist methods' shared work on one probe set: the shortlists, the calibration split's (made on first
    use, inside the timed prepare() of the first learned method, and shared), and the seconds and ms per image of
    each part."""
    short: _Shortlists
    calibration: Callable
    shortlist_s: float
    inliers_s: float
    sift_ms: float
    photo_ms: float


def _needed(cfg: ProbeConfig) -> frozenset:
    """The shared work the shortlist methods cfg.methods names need, together."""
    return frozenset().union(*(m.needs(cfg) for m in _chosen(cfg, "shortlist")))


def _shortlist_work(b: _Backbone) -> _ShortlistWork:
    s, feats, cfg = b.s, b.feats, b.cfg
    needs = _needed(cfg)
    sift_ms = photo_ms = inliers_s = 0.0
    t0 = time.perf_counter()
    top, cos, same = _shortlist(s, b.q, b.g, cfg)
    shortlist_s = time.perf_counter() - t0
    if needs & {"sift", "inliers"}:  # before the timed matching, charged per image like the rest
        sift_ms = feats.sift(s.queries)[1]
        feats.sift(s.gallery, top)
    if "photos" in needs:
        photo_ms = feats.photos(s.queries)[1]
        feats.photos(s.gallery)
    inliers = None
    if "inliers" in needs:
        t0 = time.perf_counter()
        inliers = _inliers(s, top, feats, cfg)
        inliers_s = time.perf_counter() - t0
    calibration = functools.cache(lambda: None if b.calibration_set is None else _calibration_shortlists(
        b.backbone, b.calibration_set, feats, cfg, "inliers" in needs))
    return _ShortlistWork(_Shortlists(top, cos, same, inliers), calibration, shortlist_s, inliers_s, sift_ms, photo_ms)


def _inliers(s: RetrievalSplit, top: np.ndarray, feats: ProbeFeatures, cfg: ProbeConfig) -> np.ndarray:
    return inlier_table(feats.sift(s.queries)[0], feats.sift(s.gallery, top)[0], top, SiftConfig(**cfg.sift),
                        feats.cache_dir)[0]


def _calibration_shortlists(backbone, calibration_set: RetrievalSplit, feats: ProbeFeatures, cfg: ProbeConfig,
                            with_inliers: bool) -> _Shortlists:
    top, cos, same = _shortlist(calibration_set, *feats.vectors(backbone, calibration_set), cfg)
    return _Shortlists(top, cos, same, _inliers(calibration_set, top, feats, cfg) if with_inliers else None)


def _hybrid_features(s: RetrievalSplit, short: _Shortlists, feats: ProbeFeatures, cfg: ProbeConfig) -> dict:
    """The hybrid's pair features ({name: (n_q, K)}) of a probe set's shortlist."""
    groups = set(cfg.hybrid_features)
    photos = (feats.photos(s.queries)[0], feats.photos(s.gallery)[0]) if groups & set(PHOTO_FEATURES) else (None,) * 2
    keypoints = (None, None)
    if "keypoints" in groups:
        keypoints = feats.keypoints(s.queries), feats.keypoints(s.gallery, short.top)
    return pair_features(short.top, short.cos, cfg.hybrid_features, *photos, *keypoints, short.inliers)


def _fused(s: RetrievalSplit, short: _Shortlists, calibration: _Shortlists | None, cfg: ProbeConfig) -> np.ndarray:
    c = None if calibration is None else (calibration.cos, calibration.inliers, calibration.same)
    return fusion_scores(s, short.cos, short.inliers, short.same, c, cfg)


def _boosted(s: RetrievalSplit, short: _Shortlists, calibration_set: RetrievalSplit | None, calibration: _Shortlists | None,
             feats: ProbeFeatures, cfg: ProbeConfig) -> tuple[np.ndarray, dict]:
    c = None if calibration is None else (_hybrid_features(calibration_set, calibration, feats, cfg), calibration.same)
    return hybrid_scores(s, _hybrid_features(s, short, feats, cfg), short.same, c, cfg)


def _global(b: _Backbone) -> MethodRun:
    return MethodRun(b.q_ms, lambda rows, _: b.global_order(rows))


def _qe(b: _Backbone) -> MethodRun:
    s, q, g, cfg = b.s, b.q, b.g, b.cfg
    return MethodRun(b.q_ms, lambda rows, _: order(cosine(
        query_expansion(q[rows], g, cfg.qe_n, cfg.qe_alpha, exclude=s.exclusion_for(rows)), g, s.exclusion_for(rows))))


def _kreciprocal(b: _Backbone) -> MethodRun | None:
    if not _kreciprocal_fits(b.s):
        return None
    return MethodRun(b.q_ms, lambda rows, scores: order(scores[rows]), lambda: kreciprocal_scores(b.q, b.g, b.s, b.cfg))


def _local(b: _Backbone) -> MethodRun:
    return b.shortlist_run("local", b.reranked, lambda: b.shortlisted().short.inliers)


def _fusion(b: _Backbone) -> MethodRun:
    w = b.shortlisted()
    return b.shortlist_run("fusion", b.reranked, lambda: _fused(b.s, w.short, w.calibration(), b.cfg))


def _hybrid_needs(cfg: ProbeConfig) -> frozenset:
    groups = set(cfg.hybrid_features)
    wanted = {"sift": bool(groups & SIFT_GROUPS), "inliers": "inliers" in groups,
              "photos": bool(groups & set(PHOTO_FEATURES))}
    return frozenset(work for work, yes in wanted.items() if yes)


def _hybrid(b: _Backbone) -> MethodRun:
    w = b.shortlisted()
    return b.shortlist_run("hybrid", lambda rows, p: b.reranked(rows, p[0]),
                           lambda: _boosted(b.s, w.short, b.calibration_set, w.calibration(), b.feats, b.cfg),
                           lambda p: p[1])


def _combined(cfg: ProbeConfig) -> list[str]:
    """The backbones the ensemble combines (ensemble_members, else every probed one); none when fewer than two."""
    members = list(cfg.ensemble_members or [b["name"] for b in cfg.backbones])
    return members if len(members) >= 2 else []


def ensemble_members(cfg: ProbeConfig) -> list[str]:
    """The backbones the ensemble combines; none (with a warning) when the probe has fewer than two."""
    if "ensemble" not in cfg.methods:
        return []
    members = _combined(cfg)
    if not members:
        warnings.warn("ensemble left out: it combines two or more backbones and the probe has one; add backbones or "
                      "runs to include it")
    return members


def _member_cosines(vectors: list, s: RetrievalSplit, rows: np.ndarray) -> list[np.ndarray]:
    return [cosine(q[rows], g, s.exclusion_for(rows)) for q, g in vectors]


def _ensemble_weights(vectors: list, s: RetrievalSplit, query_rows: np.ndarray, cfg: ProbeConfig) -> np.ndarray:
    """The members' logistic-regression weights, fitted on pairs of the queries `query_rows` (indices) of s."""
    g_labels, q_labels = s.gallery_labels, s.query_labels
    pairs = [training_pairs(_member_cosines(vectors, s, rows), q_labels[rows, None] == g_labels[None], rows)
             for rows in (query_rows[chunk] for chunk in query_chunks(len(query_rows), len(g_labels)))]
    return fit_weights(np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs]))


@dataclass
class _Backbones:
    """What a method across backbones starts from: the backbones it combines, whose own probes embedded the photos."""
    members: list[str]
    s: RetrievalSplit
    calibration_set: RetrievalSplit | None
    feats: ProbeFeatures
    cfg: ProbeConfig


def _ensemble(b: _Backbones) -> MethodRun:
    """The members' global cosines combined (rank, score, or logistic weights: {member: weight} its importance)."""
    members, s, calibration_set, feats, cfg = b.members, b.s, b.calibration_set, b.feats, b.cfg

    def set_vectors(p: RetrievalSplit):
        return [(feats.embedded(m, p.queries)[0], feats.embedded(m, p.gallery)[0]) for m in members]

    vectors = set_vectors(s)
    feature_ms = sum(feats.embedded(m, s.queries)[1] for m in members)  # every member embeds each query photo

    def prepare():
        n_q = len(s.queries)
        if cfg.ensemble_combine != "logistic":
            return fitted_once(None, n_q), None
        models = fitted_models(s, lambda rows: _ensemble_weights(vectors, s, np.flatnonzero(rows), cfg),
                               None if calibration_set is None else lambda: _ensemble_weights(
                                   set_vectors(calibration_set), calibration_set,
                                   np.arange(len(calibration_set.queries)), cfg))
        return models, dict(zip(members, np.mean(models.in_use(), axis=0).round(4).tolist()))

    def order_of(rows, prepared):
        return order(prepared[0].apply(rows, lambda weights, sub: combine(
            _member_cosines(vectors, s, sub), cfg.ensemble_combine, weights)))

    return MethodRun(feature_ms, order_of, prepare, importance=lambda p: p[1])


def _ensemble_while_loaded(backbone, calibration_set: RetrievalSplit | None, feats: ProbeFeatures, cfg: ProbeConfig):
    """A member's vectors of the calibration split, while it is loaded: the ensemble's logistic weights need them."""
    if backbone.name in _combined(cfg) and calibration_set is not None and cfg.ensemble_combine == "logistic":
        feats.vectors(backbone, calibration_set)


PROBE_METHODS: dict[str, ProbeMethod] = {m.name: m for m in (
    ProbeMethod("global", "embeddings", False, _global),
    ProbeMethod("qe", "embeddings", False, _qe),
    ProbeMethod("kreciprocal", "embeddings", False, _kreciprocal),
    ProbeMethod("local", "shortlist", False, _local, needs=lambda cfg: frozenset({"inliers"})),
    ProbeMethod("fusion", "shortlist", True, _fusion, needs=lambda cfg: frozenset({"inliers"})),
    ProbeMethod("ensemble", "backbones", True, _ensemble, while_loaded=_ensemble_while_loaded),
    ProbeMethod("hybrid", "shortlist", True, _hybrid, needs=_hybrid_needs),
)}


def _chosen(cfg: ProbeConfig, ranks: str | None = None) -> list[ProbeMethod]:
    """The methods cfg.methods names, in the registry's order; with `ranks`, those of that kind only."""
    return [m for m in PROBE_METHODS.values() if m.name in cfg.methods and ranks in (None, m.ranks)]


def probe_backbone(backbone, s: RetrievalSplit, calibration_set: RetrievalSplit | None, feats: ProbeFeatures,
                   cfg: ProbeConfig) -> dict:
    """{method: (metrics with 'ap' and 'top', feature ms per image, method ms per query, importance or None)} for one
    backbone; calibration_set: the split whose pairs fit the learned methods, None to cross-fit on s."""
    for method in _chosen(cfg):
        if method.while_loaded is not None:
            method.while_loaded(backbone, calibration_set, feats, cfg)
    q, q_ms = feats.embed(backbone, s.queries)
    g = q if s.loo else feats.embed(backbone, s.gallery)[0]
    b = _Backbone(backbone, s, calibration_set, feats, cfg, q, g, q_ms)
    out = {}
    for ranks in ("embeddings", "shortlist"):  # the shortlist ones after: the global ones' timings stay their own
        for method in _chosen(cfg, ranks):
            if (run := method.build(b)) is not None:
                out[method.name] = rank_method(s, cfg, len(g), run)
    return out


def probe_backbones(s: RetrievalSplit, calibration_set: RetrievalSplit | None, feats: ProbeFeatures, cfg: ProbeConfig) -> dict:
    """{method: (its members, (metrics, feature ms per image, method ms per query, importance or None))} of the
    methods that combine backbones (the ensemble), after every backbone's own probe embedded its photos."""
    members = ensemble_members(cfg)
    if not members:
        return {}
    b = _Backbones(members, s, calibration_set, feats, cfg)
    return {m.name: (members, rank_method(s, cfg, len(s.gallery), m.build(b))) for m in _chosen(cfg, "backbones")}
