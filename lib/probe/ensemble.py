"""Ensembles of retrieval scorers (the global cosine of several backbones or trained runs) into one ranking.

Combiners, each over (n_queries, n_gallery) score matrices, higher = more similar:
- rank: minus each gallery photo's mean rank over the members (rank averaging: no member's scale matters);
- score: the mean of the members' scores, each standardised per query (z-score over that query's gallery): the
  cosines of different backbones live on different scales (pooled post-ReLU ImageNet features are all positive,
  a trained ArcFace embedding's spread over [-1, 1]), so raw means would follow the widest-spread member;
- logistic: a weighted sum of those standardised scores, the weights from a logistic regression of "same
  identity" on the members' scores of pairs whose answer is known; a useless member gets a weight near zero.
A non-finite score (a query's own photo, left out in leave-one-out) stays -inf in the combined matrix.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

COMBINERS = ("rank", "score", "logistic")
NEGATIVES_PER_QUERY = 200  # different-identity pairs drawn per query to fit the weights on (same-identity: all)


def _members(members) -> list[np.ndarray]:
    members = [np.asarray(m, dtype=np.float64) for m in members]
    if not members:
        raise ValueError("an ensemble needs at least one member's scores")
    shapes = {m.shape for m in members}
    if len(shapes) > 1 or members[0].ndim != 2:
        raise ValueError(f"member scores must be (n_queries, n_gallery) matrices of one shape, got {sorted(shapes)}")
    return members


def standardized(scores: np.ndarray) -> np.ndarray:
    """Each row z-scored over its finite entries; non-finite entries become -inf. A constant row becomes 0."""
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    n = finite.sum(axis=1, keepdims=True).clip(min=1)
    filled = np.where(finite, scores, 0.0)
    mean = filled.sum(axis=1, keepdims=True) / n
    std = np.sqrt((np.where(finite, scores - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / n)
    z = np.divide(filled - mean, std, out=np.zeros_like(filled), where=std > 0)
    return np.where(finite, z, -np.inf)


def combine(members, combiner: str, weights=None) -> np.ndarray:
    """(n_q, n_g) combined scores of the members' (n_q, n_g) scores; weights (one per member) for 'logistic'."""
    if combiner not in COMBINERS:
        raise ValueError(f"unknown combiner {combiner!r}; valid: {', '.join(COMBINERS)}")
    members = _members(members)
    left_out = np.logical_or.reduce([~np.isfinite(m) for m in members])
    if combiner == "rank":
        # rank 0 = best; a stable sort keeps ties in gallery order, as every ranking in the probe does
        ranks = [np.argsort(np.argsort(-m, axis=1, kind="stable"), axis=1, kind="stable") for m in members]
        combined = -np.mean(ranks, axis=0)
    else:
        if combiner == "score":
            weights = np.ones(len(members))
        weights = np.asarray(weights, dtype=np.float64) if weights is not None else None
        if weights is None or weights.shape != (len(members),):
            raise ValueError(f"combiner {combiner!r} needs one weight per member ({len(members)}), got {weights}")
        z = [np.where(left_out, 0.0, standardized(m)) for m in members]
        combined = np.tensordot(weights, np.stack(z), axes=1) / len(members)
    return np.where(left_out, -np.inf, combined)


def training_pairs(members, same: np.ndarray, seeds) -> tuple[np.ndarray, np.ndarray]:
    """(standardised member scores (n_pairs, n_members), same (n_pairs,)) of the queries' pairs to fit weights on:
    every same-identity pair and NEGATIVES_PER_QUERY random others per query, left-out entries skipped.

    same: (n_q, n_g) bool; seeds: one int per query (its row in the probed split), so a query draws the same pairs
    however the queries are chunked."""
    members = _members(members)
    same = np.asarray(same, dtype=bool)
    if same.shape != members[0].shape or len(seeds) != len(same):
        raise ValueError(f"same {same.shape} and seeds ({len(seeds)}) must match the scores {members[0].shape}")
    z = np.stack([standardized(m) for m in members], axis=-1)
    usable = np.isfinite(z).all(axis=-1)
    picked = same & usable
    for i, seed in enumerate(seeds):
        negatives = np.flatnonzero(~same[i] & usable[i])
        if len(negatives) > NEGATIVES_PER_QUERY:
            negatives = np.random.default_rng([0, int(seed)]).choice(negatives, NEGATIVES_PER_QUERY, replace=False)
        picked[i, negatives] = True
    return z[picked], same[picked]


def fit_weights(pair_scores: np.ndarray, same: np.ndarray) -> np.ndarray:
    """One weight per member: the logistic-regression coefficients of same-identity on the standardised scores."""
    pair_scores, same = np.asarray(pair_scores, dtype=np.float64), np.asarray(same, dtype=bool)
    if pair_scores.ndim != 2 or len(pair_scores) != len(same):
        raise ValueError(f"pair_scores must be (n_pairs, n_members) with n_pairs = {len(same)}, "
                         f"got shape {pair_scores.shape}")
    positives, negatives = int(same.sum()), int((~same).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"learning ensemble weights needs both same and different pairs, got {positives} positive "
                         f"and {negatives} negative pairs")
    # balanced: a query has a few same-identity photos among hundreds, and unweighted the fit would mostly learn
    # to say "different"; only the weights' direction ranks, so the intercept is dropped
    model = LogisticRegression(class_weight="balanced").fit(pair_scores, same)
    return model.coef_[0]
