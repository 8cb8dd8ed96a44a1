"""Photos grouped into candidate individuals: embeddings clustered at a cosine-distance threshold, the threshold chosen
on photos whose individuals are known.

- Agglomerative clustering (scikit-learn, average or complete linkage on cosine distance, cut at `threshold`), or
  HDBSCAN (scikit-learn) with the threshold as its cluster_selection_epsilon; HDBSCAN's noise photos each become a
  cluster of their own (a photo like no other is a candidate individual of one photo).
- Groups (encounters, bursts) are never split: each group is clustered as one item, its photos' mean embedding
  (renormalised), and every photo takes its group's cluster.
- Contexts (a tree's address, with restrict_to_context) are never mixed: each context is clustered on its own, as
  the vote looks only within a query's context.
Cluster ids are 0..n-1, numbered by size (largest first; ties by first photo), so a user reads the big ones first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.cluster import HDBSCAN, AgglomerativeClustering

from lib.retrieval.cluster_metrics import cluster_scores

METHODS = ("agglomerative", "hdbscan")
LINKAGES = ("average", "complete")
# Cosine distance (1 - cos) at which photo-predict cuts when the run has no threshold chosen by notebook 03: a guess
# for a trained embedding (two photos of one individual at cos >= 0.5 on average), printed as such when used
DEFAULT_THRESHOLD = 0.5
SELECTION_SCORES = ("ari", "pair_f1")


@dataclass
class ClusterSettings:
    """How photos are clustered (notebook 03's cluster_* parameters; photo-predict uses what notebook 03 saved)."""
    method: str = "agglomerative"
    linkage: str = "average"
    min_cluster_size: int = 2      # HDBSCAN only

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown cluster method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"unknown linkage {self.linkage!r}; valid: {', '.join(LINKAGES)}")


def _unit(emb) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster ids 0..n-1, the largest cluster 0 (ties: the one whose first photo comes first)."""
    _, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))  # rank of each old id
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inverse]


def _cluster_items(emb: np.ndarray, threshold: float, settings: ClusterSettings) -> np.ndarray:
    """One cluster id per row of unit vectors `emb` (any ids; noise of HDBSCAN as singletons)."""
    n = len(emb)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    if settings.method == "hdbscan":
        if n <= settings.min_cluster_size:
            return np.arange(n)
        # on unit vectors euclidean distance = sqrt(2 * cosine distance): the same threshold in the units HDBSCAN uses
        eps = float(np.sqrt(2 * max(threshold, 0.0)))
        # allow_single_cluster: all the photos may show one individual (and scikit-learn 1.9's epsilon search fails
        # on a tree whose root is a selected leaf without it)
        labels = HDBSCAN(min_cluster_size=settings.min_cluster_size, cluster_selection_epsilon=eps,
                         allow_single_cluster=True, copy=True).fit_predict(emb)
        noise = labels < 0
        labels[noise] = labels.max() + 1 + np.arange(noise.sum())
        return labels
    model = AgglomerativeClustering(n_clusters=None, distance_threshold=float(threshold), metric="cosine",
                                    linkage=settings.linkage, compute_full_tree=True)
    return model.fit_predict(emb)


def _group_means(emb: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray]:
    """(one unit mean vector per group, each row's group number)."""
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    sums = np.zeros((inverse.max() + 1, emb.shape[1]))
    np.add.at(sums, inverse, emb)
    return _unit(sums), inverse


def cluster_photos(emb, threshold: float, groups=None, contexts=None,
                   settings: ClusterSettings | None = None) -> np.ndarray:
    """A cluster id (0..n-1, largest cluster first) per photo of `emb` (rows are L2-normalised here).

    threshold: cosine distance at which clusters stop merging (agglomerative: the linkage distance; HDBSCAN: its
    cluster_selection_epsilon). groups: photos of one group always share a cluster. contexts: photos of two contexts
    never do.
    """
    settings = settings or ClusterSettings()
    emb = _unit(emb)
    n = len(emb)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    contexts = np.zeros(n, dtype=int) if contexts is None else np.asarray(contexts).astype(str)
    groups = np.arange(n) if groups is None else np.asarray(groups).astype(str)
    labels, offset = np.zeros(n, dtype=np.int64), 0
    for context in pd.unique(contexts):
        rows = np.flatnonzero(contexts == context)
        items, item_of_row = _group_means(emb[rows], groups[rows])
        found = _cluster_items(items, threshold, settings)[item_of_row]
        labels[rows] = np.unique(found, return_inverse=True)[1] + offset
        offset = labels[rows].max() + 1
    return _relabel_by_size(labels)


def tightness(emb, labels) -> np.ndarray:
    """Per photo, the mean cosine similarity between the distinct photos of its cluster (NaN for a photo alone)."""
    emb, labels = _unit(emb), np.asarray(labels)
    out = np.full(len(labels), np.nan)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) > 1:
            sims = emb[rows] @ emb[rows].T
            out[rows] = (sims.sum() - np.trace(sims)) / (len(rows) * (len(rows) - 1))
    return out


def candidate_thresholds(emb, n: int = 40) -> np.ndarray:
    """Cosine distances worth trying: quantiles of each photo's distance to its nearest other photo (where a pair of
    one individual is cut or kept) and of all pairwise distances on a log scale of levels (with many individuals,
    only the smallest few percent of pairs show one individual)."""
    emb = _unit(emb)
    if len(emb) < 2:
        return np.array([DEFAULT_THRESHOLD])
    d = np.clip(1.0 - emb @ emb.T, 0.0, 2.0)
    np.fill_diagonal(d, np.inf)
    nearest = d.min(axis=1)
    pairs = d[np.triu_indices(len(d), 1)]
    grid = np.concatenate([np.quantile(nearest, np.linspace(0, 1, n // 2)),
                           np.quantile(pairs, np.geomspace(1e-3, 0.5, n // 2))])
    return np.unique(np.round(grid, 6))


def threshold_curve(emb, labels, groups=None, contexts=None, settings: ClusterSettings | None = None,
                    candidates=None) -> pd.DataFrame:
    """One row per candidate threshold: the clustering's scores against the true `labels` (cluster_scores)."""
    candidates = candidate_thresholds(emb) if candidates is None else np.asarray(candidates, dtype=float)
    rows = []
    for t in candidates:
        found = cluster_photos(emb, t, groups, contexts, settings)
        rows.append({"threshold": float(t), **cluster_scores(labels, found)})
    return pd.DataFrame(rows)


def choose_threshold(emb, labels, groups=None, contexts=None, settings: ClusterSettings | None = None,
                     score: str = "ari", candidates=None) -> tuple[float, pd.DataFrame]:
    """(the candidate threshold with the best `score` against the true labels, the whole curve); ties: the median of
    the tied thresholds' positions (the middle of a plateau, away from both edges). NaN with fewer than 2 photos."""
    if score not in SELECTION_SCORES:
        raise ValueError(f"unknown selection score {score!r}; valid: {', '.join(SELECTION_SCORES)}")
    if len(emb) < 2:
        return float("nan"), pd.DataFrame()
    curve = threshold_curve(emb, labels, groups, contexts, settings, candidates)
    values = curve[score].fillna(-np.inf).to_numpy()
    best = np.flatnonzero(values == values.max())
    return float(curve["threshold"].iloc[best[len(best) // 2]]), curve
