"""What the probe's methods score queries by, as arrays: cosines and their orders, the shortlist's top rows (exact,
or through an approximate Faiss index), k-reciprocal scores, and the fused and boosted shortlist scores of the learned
methods (fitted on another split's pairs, or cross-fitted by identity on the probed one)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lib.probe.crossfit import QueryModels, cross_fit, fitted_once
from lib.probe.fusion import ScoreFusion
from lib.probe.hybrid import HybridScorer
from lib.probe.rerank import k_reciprocal_distances
from lib.retrieval.ann_index import (
    IndexSpec,
    approximation_recall,
    build_search_index,
    describe,
    is_exact,
    new_index,
    resolve_factory,
)
from lib.retrieval.exclusion import Exclusion
from lib.retrieval.faiss_index import knn
from lib.retrieval.ranking import query_chunks
from lib.retrieval.retrieval_split import RetrievalSplit

if TYPE_CHECKING:  # the config imports the method registry, which imports this module
    from lib.probe.config import ProbeConfig


def order(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def cosine(q_unit, g_unit, exclude: Exclusion | None = None) -> np.ndarray:
    """Cosine of unit query rows to every gallery row; with `exclude` (one key per query) the rows it leaves out at
    -inf."""
    s = q_unit @ g_unit.T
    return s if exclude is None else exclude.fill(s)


def kreciprocal_scores(q, g, s: RetrievalSplit, cfg: ProbeConfig) -> np.ndarray:
    """(n_q, n_g) scores (minus the final distance) of k-reciprocal re-ranking over all queries and gallery. Under
    leave-one-out the neighbourhoods are those of the whole split and the left-out rows leave only the final
    ranking, as Market-1501's evaluation leaves its junk images in the re-ranked gallery."""
    items = g if s.loo else np.concatenate([q, g])
    dist = np.clip(2 - 2 * items @ items.T, 0, 4)
    rows = np.arange(len(g)) if s.loo else np.arange(len(q))
    cols = np.arange(len(g)) if s.loo else len(q) + np.arange(len(g))
    scores = -k_reciprocal_distances(dist, rows, cols, cfg.k1, cfg.k2, cfg.lambda_value)
    return scores if s.exclude is None else s.exclude.fill(scores)


def exact_top(s: RetrievalSplit, q_unit, g_unit, k: int, queries: np.ndarray) -> np.ndarray:
    """(len(queries), k) gallery rows of the `queries` rows' k highest cosines, a chunk of queries at a time."""
    top = np.empty((len(queries), k), dtype=np.int64)
    for rows in query_chunks(len(queries), len(g_unit)):
        q = queries[rows]
        top[rows] = order(cosine(q_unit[q], g_unit, s.exclusion_for(q)))[:, :k]
    return top


def approximate_top(s: RetrievalSplit, q_unit, g_unit, k: int, cfg: ProbeConfig) -> np.ndarray | None:
    """The k nearest gallery rows of every query through cfg.index's approximate Faiss index (padded with -1 where it
    finds fewer), printing what it costs against exact search; None where cfg.index resolves to exact search."""
    spec = IndexSpec(index=cfg.index, nprobe=cfg.nprobe, ef_search=cfg.ef_search, k=k)  # tuned for the shortlist
    factory, _ = resolve_factory(spec.index, *g_unit.shape, spec.exact_below)
    if is_exact(new_index(factory, g_unit.shape[1])):
        return None
    index, info = build_search_index(g_unit, spec, device=cfg.device)
    _, top = knn(index, q_unit, k, s.exclude)
    info["recall_vs_exact"] = approximation_recall(index, g_unit, q_unit, k, spec.recall_sample, exclude=s.exclude)
    print(f"shortlist {describe(info)}")
    return top


def fitted_models(s: RetrievalSplit, fit_here, fit_calibration=None) -> QueryModels:
    """The model scoring each query: fit_calibration() (pairs of another split) when given, else cross-fitted by
    identity on this split, fit_here(rows) with rows a bool mask of the queries to fit on."""
    if fit_calibration is not None:
        return fitted_once(fit_calibration(), len(s.queries))
    return cross_fit(s.query_labels, fit_here)


def _fit_fusion(cos, inliers, same) -> ScoreFusion:
    return ScoreFusion().fit({"global": cos.ravel(), "local": inliers.ravel()}, same.ravel())


def fusion_scores(s: RetrievalSplit, cos, inliers, same, calibration, cfg: ProbeConfig) -> np.ndarray:
    """Fused shortlist scores; calibration = (cos, inliers, same) of another split, or None to cross-fit on s."""
    models = fitted_models(s, lambda rows: _fit_fusion(cos[rows], inliers[rows], same[rows]),
                     None if calibration is None else lambda: _fit_fusion(*calibration))
    return models.apply(np.arange(len(cos)),
                        lambda fusion, rows: fusion.fuse({"global": cos[rows], "local": inliers[rows]}))


def hybrid_scores(s: RetrievalSplit, features: dict, same, calibration, cfg: ProbeConfig) -> tuple[np.ndarray, dict]:
    """(P(same) of the shortlist pairs, each feature's gain share averaged over the fitted models); calibration =
    (features, same) of another split's shortlists, or None to cross-fit on s."""
    def rows_of(rows):
        return {name: f[rows] for name, f in features.items()}

    models = fitted_models(s, lambda rows: HybridScorer(cfg.hybrid_params).fit(rows_of(rows), same[rows]),
                     None if calibration is None else lambda: HybridScorer(cfg.hybrid_params).fit(*calibration))
    importance = pd.concat([m.importances() for m in models.in_use()], axis=1).mean(axis=1)
    scores = models.apply(np.arange(len(same)), lambda model, rows: model.score(rows_of(rows)))
    return scores, importance.sort_values(ascending=False).round(4).to_dict()
