"""From neighbours to a decision: weighted class votes, a reliability verdict, thresholds chosen on calibration
queries with a minimum support and a confidence bound on their accuracy.

Distances are squared L2 between unit vectors as lib.retrieval.faiss_index returns them (d² = 2 − 2·cos, in [0, 4]).
A query's class scores are normalised to shares (they sum to 1), so `score` (the winner's share) and `margin`
(winner's share − runner-up's share) mean the same for any k and weighting.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.core.state_io import write_json

WEIGHTINGS = ("inverse", "uniform", "softmax")
# The vote's defaults wherever one is taken (evaluation, prediction, the gallery's uploaded photos): 20 neighbours
# weighted by inverse distance, so a close match counts more than a crowd of far ones
DEFAULT_K = 20
DEFAULT_WEIGHTING = "inverse"


def neighbour_weights(distances, weighting: str = DEFAULT_WEIGHTING, eps: float = 1e-6, temperature: float = 0.05):
    """Vote weight of each neighbour (same shape as `distances`).

    inverse: 1/(d + eps) (the project's default; eps keeps an exact duplicate finite); uniform: 1 (plain majority);
    softmax: exp(cos / temperature) with cos = 1 − d/2, i.e. a softmax over the neighbours' similarities.
    A neighbour at distance inf (padding) weighs 0.
    """
    d = np.asarray(distances, dtype=np.float64)
    # an infinite distance is padding (lib.retrieval.faiss_index.search_within: the context held fewer than k photos): no vote
    real = np.isfinite(d)
    if weighting == "inverse":
        return np.where(real, 1.0 / (d + eps), 0.0)
    if weighting == "uniform":
        return real.astype(np.float64)
    if weighting == "softmax":
        logits = np.where(real, (1.0 - d / 2.0) / temperature, -np.inf)
        # subtracting each row's max changes no share but keeps exp from overflowing at small temperatures
        return np.exp(logits - logits.max(axis=-1, keepdims=True))
    raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def class_scores(distances, neighbour_labels, classes, weighting: str = DEFAULT_WEIGHTING, **weight_kw) -> np.ndarray:
    """(n_q, n_classes) vote shares: sum of the weights of the neighbours of each class, divided by the row total.

    `classes` names the columns; a neighbour label outside `classes` is an error, not a silent lost vote.
    """
    distances = np.atleast_2d(distances)
    labels = np.atleast_2d(np.asarray(neighbour_labels))
    if distances.shape != labels.shape:
        raise ValueError(f"distances {distances.shape} and neighbour_labels {labels.shape} must have one shape")
    classes = np.asarray(classes)
    order = np.argsort(classes)
    pos = np.searchsorted(classes, labels, sorter=order).clip(max=len(classes) - 1)
    codes = order[pos]
    unknown = classes[codes] != labels
    if unknown.any():
        raise ValueError(f"neighbour labels not in classes: {sorted(set(labels[unknown].tolist()))[:5]}")
    w = neighbour_weights(distances, weighting, **weight_kw)
    scores = np.zeros((len(labels), len(classes)))
    np.add.at(scores, (np.arange(len(labels))[:, None], codes), w)
    return scores / scores.sum(axis=1, keepdims=True)


def vote(scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(winner column, winner's share, margin to the runner-up) of each row of class shares.

    Ties go to the first column. With one class the margin is the whole share (nothing competes).
    """
    scores = np.asarray(scores, dtype=np.float64)
    winner = scores.argmax(axis=1)
    top2 = -np.sort(-scores, axis=1)[:, :2]
    second = top2[:, 1] if scores.shape[1] > 1 else np.zeros(len(scores))
    return winner, top2[:, 0], top2[:, 0] - second


@dataclass
class Thresholds:
    """Reliability thresholds; the defaults accept every query."""

    max_distance: float = float("inf")  # top-1 d² above this: 'unclassifiable' (nothing like it in the gallery)
    min_margin: float = 0.0             # share margin below this: 'reshoot' (two classes about equally likely)


def verdicts(top1_distance, margin, thresholds: Thresholds) -> np.ndarray:
    """'unclassifiable' when the nearest photo is too far (checked first), 'reshoot' when the vote is too close,
    else 'accepted'."""
    top1_distance, margin = np.asarray(top1_distance), np.asarray(margin)
    return np.where(top1_distance > thresholds.max_distance, "unclassifiable",
                    np.where(margin < thresholds.min_margin, "reshoot", "accepted")).astype(object)


def decisions(distances, neighbour_labels, classes, weighting: str = DEFAULT_WEIGHTING,
              thresholds: Thresholds | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """The decision for each searched query: (table of pred, score, margin, top1_distance, verdict; (n_q, n_classes)
    class shares). thresholds=None accepts every query."""
    shares = class_scores(distances, neighbour_labels, classes, weighting)
    winner, score, margin = vote(shares)
    top1 = np.asarray(distances)[:, 0]
    table = pd.DataFrame({"pred": np.asarray(classes)[winner], "score": score, "margin": margin,
                          "top1_distance": top1, "verdict": verdicts(top1, margin, thresholds or Thresholds())})
    return table, shares


def _candidates(values, n_grid: int, none: float) -> np.ndarray:
    """Quantiles of the observed values plus the value that rejects nothing on this axis."""
    q = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, n_grid)) if len(values) else []
    return np.unique(np.append(q, none))


# One-sided confidence of the accuracy bound thresholds must clear, and the fewest accepted queries a pair of
# thresholds must rest on: an accuracy measured on 5 queries says little, however high
CONFIDENCE = 0.95
MIN_SUPPORT = 30


def accuracy_lower_bound(hits, n, confidence: float = CONFIDENCE) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound on a success rate from `hits` of `n` (exact: the binomial's beta
    quantile, so it holds for any n, where the Wilson interval is an approximation). 0 where hits is 0, NaN where n
    is 0. confidence=None: the point estimate hits/n (the old in-sample rule)."""
    from scipy.stats import beta

    hits, n = np.asarray(hits, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if confidence is None:
            return hits / n
        bound = beta.ppf(1 - confidence, hits, n - hits + 1)
    return np.where(n == 0, np.nan, np.where(hits == 0, 0.0, bound))


def threshold_grid(correct, top1_distance, margin, n_grid: int = 101,
                   confidence: float | None = CONFIDENCE) -> pd.DataFrame:
    """Coverage, accuracy-on-accepted, accepted count and its accuracy_lower_bound for every (max_distance,
    min_margin) pair on a quantile grid. Accuracy is NaN where nothing is accepted.
    """
    correct = np.asarray(correct, dtype=bool)
    d, m = np.asarray(top1_distance, dtype=np.float64), np.asarray(margin, dtype=np.float64)
    dist_c, marg_c = _candidates(d, n_grid, np.inf), _candidates(m, n_grid, 0.0)
    # (n_dist, n_marg, n) is fine for validation-sized splits: 101 x 101 x 10k bools = 100 MB at most
    accepted = (d[None, None, :] <= dist_c[:, None, None]) & (m[None, None, :] >= marg_c[None, :, None])
    n_acc, hits = accepted.sum(axis=2), (accepted & correct).sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = hits / n_acc
    dd, mm = np.meshgrid(dist_c, marg_c, indexing="ij")
    return pd.DataFrame({"max_distance": dd.ravel(), "min_margin": mm.ravel(),
                         "coverage": (n_acc / max(len(d), 1)).ravel(), "accuracy": acc.ravel(),
                         "n_accepted": n_acc.ravel(),
                         "accuracy_lower": accuracy_lower_bound(hits, n_acc, confidence).ravel()})


def choose_thresholds(correct, top1_distance, margin, target_accuracy: float | None = None,
                      target_coverage: float | None = None, n_grid: int = 101, min_support: int = MIN_SUPPORT,
                      confidence: float | None = CONFIDENCE) -> tuple[Thresholds, dict]:
    """Thresholds for a target, chosen on calibration queries; returns (thresholds, what they achieve there).

    Only pairs that accept at least `min_support` queries are candidates (all of them when fewer queries exist:
    nothing is rejected, and `met` is False). target_accuracy: the largest coverage whose accepted queries' accuracy
    has a one-sided `confidence` lower bound (accuracy_lower_bound; None: the point estimate) of at least that
    (ties: higher bound, then the looser thresholds). target_coverage: the best bound that still answers at least
    that share. When no pair reaches the target, the one with the highest bound is taken and `met` is False.
    """
    if (target_accuracy is None) == (target_coverage is None):
        raise ValueError("give exactly one of target_accuracy and target_coverage")
    grid = threshold_grid(correct, top1_distance, margin, n_grid, confidence).dropna(subset=["accuracy"])
    if grid.empty:
        raise ValueError("no calibration queries to choose thresholds on")
    supported = grid[grid["n_accepted"] >= min_support]
    # sort keys -> ascending?, in order of preference; the looser thresholds (larger max_distance, smaller
    # min_margin) break the last ties, so nothing is rejected that the target does not require
    loose = {"max_distance": False, "min_margin": True}
    if supported.empty:  # too few queries to support any rejection: accept all, and say the target is not met
        pool, met, prefer = grid[grid["coverage"] == grid["coverage"].max()], False, {}
    elif target_accuracy is not None:
        ok = supported[supported["accuracy_lower"] >= target_accuracy - 1e-12]
        met = not ok.empty
        prefer = ({"coverage": False, "accuracy_lower": False} if met
                  else {"accuracy_lower": False, "coverage": False})
        pool = ok if met else supported
    else:
        pool = supported[supported["coverage"] >= target_coverage - 1e-12]
        met = not pool.empty  # empty only when min_support exceeds the share asked for
        pool = pool if met else supported
        prefer = {"accuracy_lower": False, "coverage": False}
    order = {**prefer, **loose}
    best = pool.sort_values(list(order), ascending=list(order.values())).iloc[0]
    t = Thresholds(float(best["max_distance"]), float(best["min_margin"]))
    info = {"target_accuracy": target_accuracy, "target_coverage": target_coverage, "met": bool(met),
            "coverage": float(best["coverage"]), "accuracy": float(best["accuracy"]),
            "accuracy_lower": float(best["accuracy_lower"]), "n_accepted": int(best["n_accepted"]),
            "n": len(np.asarray(correct)), "bound": "clopper-pearson" if confidence is not None else "none",
            "confidence": confidence, "min_support": min_support}
    return t, info


BEST_F1_RULE = "best F1 of calling a query new"  # what best_f1_new_threshold optimises, as the record names it


def new_individual_calls(top1_distance, is_new, threshold: float) -> dict:
    """Open-set re-ID: precision, recall and F1 of calling a query a new individual when its nearest gallery photo is
    farther than `threshold` (one best_f1_new_threshold chose on val, measured on test), with the numbers of new and
    known queries and the rule that chose the threshold."""
    d, is_new = np.asarray(top1_distance, dtype=np.float64), np.asarray(is_new, dtype=bool)
    called = d > threshold
    hits = np.nan if np.isnan(threshold) else np.float64((called & is_new).sum())  # no threshold: nothing to measure
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = hits / called.sum(), hits / is_new.sum()
        f1 = 2 * precision * recall / (precision + recall)
    return {"n_new": int(is_new.sum()), "n_known": int((~is_new).sum()), "threshold": float(threshold),
            "rule": BEST_F1_RULE, "precision": float(precision), "recall": float(recall), "f1": float(f1)}


def best_f1_new_threshold(top1_distance, is_new) -> dict:
    """The threshold of new_individual_calls with the best F1 of calling a query new over the observed distances
    (scikit-learn's precision-recall curve), with its calls' precision, recall and F1. The threshold is NaN when the
    queries hold no new or no known individual (nothing to choose between). The other rule, the best balance of known
    and unknown accuracy, is lib.retrieval.open_set.balanced_new_threshold."""
    from sklearn.metrics import precision_recall_curve

    d, is_new = np.asarray(top1_distance, dtype=np.float64), np.asarray(is_new, dtype=bool)
    if is_new.all() or not is_new.any():
        return new_individual_calls(d, is_new, float("nan"))
    precision, recall, cut = precision_recall_curve(is_new, d)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    best = int(f1.argmax())
    # 'new' means d >= cut[best]; the midpoint below it makes a strict '>' give the same calls
    below = d[d < cut[best]]
    threshold = (cut[best] + below.max()) / 2 if len(below) else np.nextafter(cut[best], -np.inf)
    return new_individual_calls(d, is_new, threshold)


def risk_coverage(correct, confidence) -> pd.DataFrame:
    """Accuracy of the answered queries against the share answered, answering the most confident first.

    One row per distinct confidence value (ties are answered together): threshold (answer when confidence >=
    it), coverage, accuracy. For a distance, pass its negative.
    """
    correct = np.asarray(correct, dtype=np.float64)
    confidence = np.asarray(confidence, dtype=np.float64)
    order = np.argsort(-confidence, kind="stable")
    c, hits = confidence[order], np.cumsum(correct[order])
    last_of_tie = np.append(c[1:] != c[:-1], True)
    n = np.arange(1, len(c) + 1)[last_of_tie]
    return pd.DataFrame({"threshold": c[last_of_tie], "coverage": n / max(len(c), 1),
                         "accuracy": hits[last_of_tie] / n})


def save_thresholds(path: str | os.PathLike, thresholds: Thresholds, info: dict) -> Path:
    """JSON with the thresholds and how they were chosen (k, weighting, targets, what they achieved, provenance:
    lib.evaluate.calibrate.thresholds_info), written atomically: photo-predict may read it while notebook 03 writes
    it."""
    path = Path(path)
    data = {**asdict(thresholds), **info}
    if np.isinf(thresholds.max_distance):
        data["max_distance"] = None  # JSON has no infinity; null = no distance limit
    return write_json(path, data)


def load_thresholds(path: str | os.PathLike) -> tuple[Thresholds, dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        max_distance = data.pop("max_distance")
        t = Thresholds(float("inf") if max_distance is None else float(max_distance), float(data.pop("min_margin")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a file edited by hand or cut short by a copy
        raise DataError(f"{path} cannot be read as thresholds ({type(e).__name__}: {e}); run notebook 03 again to "
                        "write it") from None
    return t, data
