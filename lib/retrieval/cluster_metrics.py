"""How well photos were grouped into individuals, scored as the field scores it (AnimalCLEF: adjusted Rand index).

- ARI and AMI: scikit-learn's adjusted_rand_score / adjusted_mutual_info_score (chance-corrected: 0 for a random
  grouping, 1 for the true one).
- Pairwise precision / recall / F1 over pairs of photos: a pair is predicted together when it shares a cluster and
  truly together when it shares an individual (scikit-learn's pair_confusion_matrix counts them).
- B-cubed precision / recall / F1 (Bagga & Baldwin): per photo, the share of its cluster that is its individual
  (precision) and the share of its individual that is in its cluster (recall), averaged over photos.
- The number of clusters against the number of true individuals.
Convention where a ratio has nothing to count: precision is 1 when no pair is predicted together (nothing wrong
was claimed), recall is 1 when no pair is truly together (nothing was missed); F1 is their harmonic mean.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score
from sklearn.metrics.cluster import contingency_matrix, pair_confusion_matrix

SCORES = ("ari", "ami", "pair_precision", "pair_recall", "pair_f1", "bcubed_precision", "bcubed_recall", "bcubed_f1",
          "n_clusters", "n_individuals", "n_photos")


def _ratio(hits: float, total: float) -> float:
    return float(hits / total) if total else 1.0


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def pairwise_prf(labels_true, labels_pred) -> tuple[float, float, float]:
    """Precision, recall and F1 of 'same cluster' as a call of 'same individual', over all unordered photo pairs."""
    c = pair_confusion_matrix(np.asarray(labels_true), np.asarray(labels_pred))  # ordered pairs: each one twice
    tp, fn, fp = c[1, 1], c[1, 0], c[0, 1]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return precision, recall, _f1(precision, recall)


def bcubed_prf(labels_true, labels_pred) -> tuple[float, float, float]:
    """B-cubed precision, recall and F1 (each photo counted in its own cluster and individual)."""
    n = len(labels_true)
    if n == 0:
        return 1.0, 1.0, 1.0
    c = contingency_matrix(np.asarray(labels_true), np.asarray(labels_pred)).astype(np.float64)  # individual x cluster
    # a cell of m photos gives each of them m / |cluster| precision: m^2 / |cluster| summed over the cell
    precision = float((c ** 2 / c.sum(axis=0, keepdims=True)).sum() / n)
    recall = float((c ** 2 / c.sum(axis=1, keepdims=True)).sum() / n)
    return precision, recall, _f1(precision, recall)


def cluster_scores(labels_true, labels_pred) -> dict:
    """Every score of SCORES for one grouping of photos against their true individuals."""
    labels_true, labels_pred = np.asarray(labels_true).astype(str), np.asarray(labels_pred)
    if len(labels_true) != len(labels_pred):
        raise ValueError(f"{len(labels_true)} true labels but {len(labels_pred)} cluster ids")
    if len(labels_true) == 0:
        return {key: float("nan") for key in SCORES} | {"n_clusters": 0, "n_individuals": 0, "n_photos": 0}
    pair, bcubed = pairwise_prf(labels_true, labels_pred), bcubed_prf(labels_true, labels_pred)
    return {"ari": float(adjusted_rand_score(labels_true, labels_pred)),
            "ami": float(adjusted_mutual_info_score(labels_true, labels_pred)),
            **dict(zip(("pair_precision", "pair_recall", "pair_f1"), pair)),
            **dict(zip(("bcubed_precision", "bcubed_recall", "bcubed_f1"), bcubed)),
            "n_clusters": int(len(np.unique(labels_pred))), "n_individuals": int(len(np.unique(labels_true))),
            "n_photos": int(len(labels_true))}
