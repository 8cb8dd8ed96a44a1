"""Open-set re-identification: is a query a known individual (and which), a new one, or a photo to take again?

Definitions follow wildlife-datasets (`wildlife_datasets.metrics`: `BAKS`, `BAUS`, `auc_roc_new_class`):
- BAKS, balanced accuracy on known samples: over the queries whose individual is in the gallery, the share predicted
  as that very individual, computed per individual and averaged over individuals (each individual weighs the same).
- BAUS, balanced accuracy on unknown samples: over the queries whose individual is not in the gallery, the share
  called new, per individual, averaged over individuals.
- their harmonic mean (AnimalCLEF 2025 ranks by the geometric mean; the harmonic one punishes a lopsided pair more);
- AUROC of new-vs-known: "new" is the positive class, scored by the top-1 distance (farther: more likely new) or by
  the negative vote margin (a close vote: more likely new), with scikit-learn's roc_auc_score.
A "reshoot" answer counts as wrong in BAKS and BAUS, and as not answered in the decision rule's coverage.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from lib.retrieval.ranking import evaluate_retrieval

NEW = "<new individual>"  # the answer that says: not in the gallery (angle brackets: no label looks like it)
BALANCED_RULE = "best harmonic mean of BAKS and BAUS"  # what balanced_new_threshold optimises, as the record says
RESHOOT = "<reshoot>"     # the answer that says: two individuals about equally likely, take another photo


def _balanced(labels: np.ndarray, hits: np.ndarray) -> float:
    """Mean over individuals of each individual's share of hits; NaN without queries."""
    if not len(labels):
        return float("nan")
    return float(pd.Series(hits, dtype=float).groupby(labels).mean().mean())


def baks(labels, predictions, unknown) -> float:
    """Balanced accuracy on known samples (wildlife-datasets' BAKS): queries of labels not in `unknown`."""
    labels, predictions = np.asarray(labels, dtype=object), np.asarray(predictions, dtype=object)
    known = ~np.isin(labels, np.asarray(list(unknown), dtype=object))
    return _balanced(labels[known], predictions[known] == labels[known])


def baus(labels, predictions, unknown, new=NEW) -> float:
    """Balanced accuracy on unknown samples (wildlife-datasets' BAUS): queries of labels in `unknown`, right when
    called `new`."""
    labels, predictions = np.asarray(labels, dtype=object), np.asarray(predictions, dtype=object)
    is_unknown = np.isin(labels, np.asarray(list(unknown), dtype=object))
    return _balanced(labels[is_unknown], predictions[is_unknown] == new)


def harmonic_mean(a: float, b: float) -> float:
    return float("nan") if np.isnan(a) or np.isnan(b) else (0.0 if a + b == 0 else 2 * a * b / (a + b))


def new_vs_known_auroc(is_unknown, new_score) -> float:
    """AUROC of telling unknown queries (positive) from known ones by `new_score` (higher: more likely new); NaN when
    the queries hold only one kind. An infinite score (no neighbour at all) ranks above every finite one."""
    is_unknown = np.asarray(is_unknown, dtype=bool)
    if is_unknown.all() or not is_unknown.any():
        return float("nan")
    score = np.asarray(new_score, dtype=np.float64)
    finite = score[np.isfinite(score)]
    top = finite.max() + 1 if len(finite) else 1.0
    return float(roc_auc_score(is_unknown, np.nan_to_num(score, posinf=top, neginf=-top)))


def open_set_answers(pred, top1_distance, margin, new_threshold: float, min_margin: float = 0.0) -> np.ndarray:
    """The decision rule: NEW when the nearest gallery photo is farther than new_threshold (checked first; a NaN
    threshold calls nobody new), RESHOOT when the vote margin is below min_margin, else the voted individual."""
    d, margin = np.asarray(top1_distance, dtype=np.float64), np.asarray(margin, dtype=np.float64)
    answers = np.where(margin < min_margin, RESHOOT, np.asarray(pred, dtype=object)).astype(object)
    return np.where(d > new_threshold, NEW, answers).astype(object)


def decision_scores(labels, answers, unknown) -> dict:
    """BAKS, BAUS, their harmonic mean, and the rule's coverage (share not RESHOOT) and accuracy of the answered
    (a known query answered with its individual, an unknown one with NEW)."""
    labels, answers = np.asarray(labels, dtype=object), np.asarray(answers, dtype=object)
    is_unknown = np.isin(labels, np.asarray(list(unknown), dtype=object))
    answered = answers != RESHOOT
    right = np.where(is_unknown, answers == NEW, answers == labels)
    b_known, b_unknown = baks(labels, answers, unknown), baus(labels, answers, unknown)
    return {"BAKS": b_known, "BAUS": b_unknown, "harmonic_mean": harmonic_mean(b_known, b_unknown),
            "coverage": float(answered.mean()) if len(answers) else float("nan"),
            "accuracy_answered": float(right[answered].mean()) if answered.any() else float("nan")}


def baks_baus_by_threshold(labels, pred, top1_distance, unknown, n: int = 101) -> pd.DataFrame:
    """BAKS, BAUS and their harmonic mean as the new-individual threshold sweeps the observed top-1 distances
    (quantiles; no reshoot), for the trade-off figure."""
    d = np.asarray(top1_distance, dtype=np.float64)
    finite = d[np.isfinite(d)]
    cuts = np.unique(np.quantile(finite, np.linspace(0, 1, n))) if len(finite) else np.array([])
    rows = [{"threshold": t, **decision_scores(labels, open_set_answers(pred, d, np.ones_like(d), t), unknown)}
            for t in cuts]
    return pd.DataFrame(rows, columns=["threshold", "BAKS", "BAUS", "harmonic_mean", "coverage", "accuracy_answered"])


def balanced_new_threshold(labels, pred, top1_distance, unknown) -> float:
    """The new-individual threshold of baks_baus_by_threshold with the best harmonic mean of BAKS and BAUS (ties: the
    lowest); NaN when the queries lack known or unknown individuals. Not F1 of the "new" call, which a majority of
    unknown queries pulls towards calling everybody new."""
    labels = np.asarray(labels, dtype=object)
    is_unknown = np.isin(labels, np.asarray(list(unknown), dtype=object))
    if is_unknown.all() or not is_unknown.any():
        return float("nan")
    sweep = baks_baus_by_threshold(labels, pred, top1_distance, unknown)
    return float(sweep["threshold"].iloc[int(sweep["harmonic_mean"].fillna(-1).to_numpy().argmax())])


def open_set_report(queries: pd.DataFrame, gallery_labels, gallery_emb=None, query_emb=None,
                    new_threshold: float = float("nan"), min_margin: float = 0.0, ks=(1, 5)) -> dict:
    """The open-set figures of one evaluated split (gallery protocol): queries (label, pred, top1_distance, margin)
    against a gallery whose labels are `gallery_labels`; unknown = a query label with no gallery photo.

    With the embeddings, also Recall@k and mAP of the known queries alone (the main metrics count each unknown query
    as a miss). new_threshold / min_margin: the rule's thresholds (new-individual distance chosen on val; the
    vote-margin threshold of lib.retrieval.decide); NaN new_threshold calls nobody new.
    """
    labels = queries["label"].to_numpy(dtype=object)
    is_unknown = ~np.isin(labels, np.asarray(gallery_labels, dtype=object))
    unknown = sorted(set(labels[is_unknown]))
    answers = open_set_answers(queries["pred"], queries["top1_distance"], queries["margin"], new_threshold, min_margin)
    report = {"n_known_queries": int((~is_unknown).sum()), "n_unknown_queries": int(is_unknown.sum()),
              "n_known_individuals": len(set(labels[~is_unknown])), "n_unknown_individuals": len(unknown),
              "unknown_individuals": unknown, "new_threshold": float(new_threshold), "new_threshold_rule": BALANCED_RULE,
              "min_margin": float(min_margin),
              "auroc_top1_distance": new_vs_known_auroc(is_unknown, queries["top1_distance"]),
              "auroc_margin": new_vs_known_auroc(is_unknown, -queries["margin"].to_numpy(dtype=np.float64)),
              **decision_scores(labels, answers, unknown)}
    if gallery_emb is not None and (~is_unknown).any():
        known = evaluate_retrieval(gallery_emb, gallery_labels, np.asarray(query_emb)[~is_unknown], labels[~is_unknown],
                                   ks=ks)
        report["known_queries"] = {key: known[key] for key in (*(f"recall@{k}" for k in ks), "mAP",
                                                                "identity_balanced_mAP")}
    return report
