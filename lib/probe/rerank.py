"""Re-ranking of a retrieval result on dense numpy matrices (probe-sized sets: a few thousand photos).

Three independent tools, each taking data and returning data:
- k_reciprocal_distances: k-reciprocal re-ranking (Zhong et al., CVPR 2017) of a full pairwise distance matrix;
- query_expansion: alpha-weighted query expansion (alpha-QE, Radenovic et al., TPAMI 2018) of embeddings;
- rerank_shortlist: re-sorts the first K of a ranking by a second score (e.g. local-feature inliers).
Everything is O(N²) memory, so it is meant for probes and evaluation sets, not for a whole collection.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse

from lib.retrieval.exclusion import Exclusion, check_sizes, fewest_left_out
from lib.retrieval.faiss_index import unit_rows

# squared L2 of float32 unit vectors (2 - 2cos) can come out a hair below zero; anything lower than this
# is not round-off but a similarity matrix passed where distances were wanted
NEGATIVE_TOLERANCE = 1e-4


def _rows(rows, n: int, what: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D array of integer indices, got shape {rows.shape} dtype {rows.dtype}")
    bad = rows[(rows < 0) | (rows >= n)]
    if bad.size:
        raise ValueError(f"{what} must index the {n} items of dist, got out-of-range {bad[:10].tolist()}")
    return rows.astype(np.intp)


def _reciprocal_sets(forward: np.ndarray, k: int) -> list[np.ndarray]:
    """R(p, k) for every item p: the g among p's k nearest (plus p itself) that have p among theirs."""
    n = len(forward)
    knn = forward[:, : k + 1]
    in_knn = np.zeros((n, n), dtype=bool)  # in_knn[g, p]: p is among g's k+1 nearest
    np.put_along_axis(in_knn, knn, True, axis=1)
    return [knn[p][in_knn[knn[p], p]] for p in range(n)]


def k_reciprocal_distances(dist: np.ndarray, query_rows, gallery_rows, k1: int = 20, k2: int = 6,
                           lambda_value: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017).

    dist: (N, N) pairwise distances between all items (queries and gallery; e.g. squared L2 of unit vectors),
    dist[i, j] from item i to item j. query_rows / gallery_rows: indices of the queries and of the gallery among
    the N items; they may be the same rows (leave-one-out, queries = gallery).
    Returns (len(query_rows), len(gallery_rows)) final distances = (1 - lambda) * Jaccard distance +
    lambda * original distance, smaller = more similar.

    Conventions: N(p, k) holds p itself and its k nearest others, and N(p, k2) for the local query expansion
    holds k2 items, p included, so k2=1 turns that expansion off (both as in the paper's reference code); the
    expansion sets are R(q, ceil(k1/2)), rounded up so that k1=1 still has one. k1 is clipped to N - 1, k2 to N.
    """
    dist = _checked_distances(dist, k1, k2, lambda_value)
    n = dist.shape[0]
    query_rows = _rows(query_rows, n, "query_rows")
    gallery_rows = _rows(gallery_rows, n, "gallery_rows")
    k1, k2 = min(k1, n - 1), min(k2, n)

    # Each item's distances divided by its own largest one, so exp(-d) weights and the final blend see [0, 1]
    # whatever the distance's units. The reference code divides each column by its max and transposes, which
    # for a symmetric dist is this same per-row scaling; per row it keeps every query's original ranking.
    d = np.clip(dist, 0, None).astype(np.float32)
    row_max = d.max(axis=1, keepdims=True)
    d = np.divide(d, row_max, out=np.zeros_like(d), where=row_max > 0)

    # Rank with each item first in its own list: duplicates (distance 0) must not push p out of N(p, k).
    ranking = d.copy()
    np.fill_diagonal(ranking, -1)
    forward = np.argsort(ranking, axis=1, kind="stable")

    v = _local_expansion(_neighbourhood_weights(d, forward, k1), forward, k2)
    jaccard = _jaccard_distances(v, query_rows, gallery_rows)
    original = d[np.ix_(query_rows, gallery_rows)]
    return (1 - lambda_value) * jaccard + lambda_value * original


def _checked_distances(dist, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    dist = np.asarray(dist)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1] or dist.shape[0] == 0:
        raise ValueError(f"dist must be a non-empty square (N, N) matrix, got shape {dist.shape}")
    if not np.isfinite(dist).all():
        raise ValueError("dist contains NaN or inf")
    if dist.min() < -NEGATIVE_TOLERANCE:
        raise ValueError(f"dist has negative entries (min {dist.min():.4g}): pass distances, not similarities")
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    if k2 < 1:
        raise ValueError(f"k2 must be >= 1, got {k2}")
    if not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    return dist


def _neighbourhood_weights(d: np.ndarray, forward: np.ndarray, k1: int) -> np.ndarray:
    """V (N, N): row p weighs the members of p's expanded k-reciprocal set by exp(-d), summing to 1."""
    n = len(d)
    reciprocal = _reciprocal_sets(forward, k1)
    half = _reciprocal_sets(forward, (k1 + 1) // 2)
    v = np.zeros((n, n), dtype=np.float32)
    for p in range(n):
        members = reciprocal[p]
        expanded = [members]
        for q in members:
            # add a member's smaller set when it mostly lies inside R(p, k1): it brings back true matches
            # that a pose or lighting change kept just outside p's own k1 neighbours
            if np.isin(half[q], members).sum() > 2 / 3 * len(half[q]):
                expanded.append(half[q])
        members = np.unique(np.concatenate(expanded))
        weights = np.exp(-d[p, members])
        # weights summing to 1 (as the reference code does) make the Jaccard distance compare the shape of
        # two neighbourhoods, not how many members each has
        v[p, members] = weights / weights.sum()
    return v


def _local_expansion(v: np.ndarray, forward: np.ndarray, k2: int) -> np.ndarray:
    """V_p replaced by the mean of the V of its k2 nearest (p included); k2=1 leaves V as it is."""
    if k2 == 1:
        return v
    n = len(v)
    cols = forward[:, :k2].ravel()
    mean_of_neighbours = sparse.csr_matrix((np.full(cols.size, 1 / k2, dtype=np.float32),
                                            (np.repeat(np.arange(n), k2), cols)), shape=(n, n))
    return np.asarray(mean_of_neighbours @ v, dtype=np.float32)


def _jaccard_distances(v: np.ndarray, query_rows: np.ndarray, gallery_rows: np.ndarray) -> np.ndarray:
    """1 - sum(min) / sum(max) of V_q and V_g for every query and gallery item; sum(max) = sum(V_q) + sum(V_g) -
    sum(min), and only the features where V_q is non-zero add to sum(min), so each query visits its own few columns."""
    gallery_v = np.ascontiguousarray(v[gallery_rows].T)  # (N, n_g): a query's columns become contiguous rows
    gallery_sums = gallery_v.sum(axis=0)
    jaccard = np.ones((len(query_rows), len(gallery_rows)), dtype=np.float32)
    for i, q in enumerate(query_rows):
        features = np.flatnonzero(v[q])
        mins = np.minimum(gallery_v[features], v[q, features, None]).sum(axis=0)
        maxs = v[q].sum() + gallery_sums - mins
        np.divide(mins, maxs, out=mins, where=maxs > 0)
        jaccard[i] -= mins
    return jaccard


def query_expansion(query_emb, gallery_emb, n: int = 3, alpha: float = 3.0,
                    exclude: Exclusion | None = None) -> np.ndarray:
    """alpha-weighted query expansion (alpha-QE, Radenovic et al. 2018).

    Each query becomes the L2-normalised sum of itself (weight 1) and its n most similar gallery vectors, each
    weighted by max(cos, 0) ** alpha; n=0 returns the normalised queries. `exclude` (lib.retrieval.exclusion, one
    key per query and per gallery row: e.g. leave-one-out's, where a vector never expands itself, or a chunk of a
    probe's group rule) keeps the rows it leaves out of each query's expansion. Ties between gallery rows go to the
    lower row. Returns (n_q, d) float32 unit rows.
    """
    q = unit_rows(query_emb, "query_emb")
    g = unit_rows(gallery_emb, "gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_emb has dimension {q.shape[1]} but gallery_emb has {g.shape[1]}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    check_sizes(exclude, len(q), len(g))
    sims = q @ g.T
    if exclude is not None:
        exclude.fill(sims)
    n = min(n, g.shape[0] - fewest_left_out(exclude))
    top = np.argsort(-sims, axis=1, kind="stable")[:, :n]
    top_sims = np.take_along_axis(sims, top, axis=1)
    # a left-out row (-inf) that a query in a large group still reaches weighs 0, whatever alpha (0 ** 0 is 1)
    weights = np.where(np.isfinite(top_sims), np.maximum(top_sims, 0) ** alpha, 0)
    expanded = q + np.einsum("qn,qnd->qd", weights, g[top])
    # the query's own weight 1 and non-negative neighbour weights keep the sum away from zero
    return (expanded / np.linalg.norm(expanded, axis=1, keepdims=True)).astype(np.float32)


def rerank_shortlist(order: np.ndarray, shortlist_scores: np.ndarray) -> np.ndarray:
    """Re-sort the first K of each ranking by a second score.

    order (n_q, n_g): each query's gallery rows, best first (e.g. from global cosine); shortlist_scores (n_q, K),
    higher = better, for order[:, :K]. Returns a new order where the first K are re-sorted by score (stable: ties
    keep their old order) and the rest stay as they were.
    """
    order = np.asarray(order)
    scores = np.asarray(shortlist_scores, dtype=np.float64)  # float: negating unsigned inlier counts would wrap
    if order.ndim != 2:
        raise ValueError(f"order must be (n_q, n_g), got shape {order.shape}")
    if scores.ndim != 2 or scores.shape[0] != order.shape[0] or scores.shape[1] > order.shape[1]:
        raise ValueError(f"shortlist_scores must be (n_q, K) with n_q = {order.shape[0]} and K <= {order.shape[1]} "
                         f"to match order {order.shape}, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("shortlist_scores contains NaN, which has no place in a ranking")
    k = scores.shape[1]
    new = order.copy()
    # a stable sort of the negated scores: descending, and equal scores keep the global ranking's order
    best_first = np.argsort(-scores, axis=1, kind="stable")
    new[:, :k] = np.take_along_axis(order[:, :k], best_first, axis=1)
    return new
