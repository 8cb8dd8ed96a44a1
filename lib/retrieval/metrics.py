"""Retrieval metrics (recall@k, CMC, average precision, identity-balanced mAP; numpy) and voting metrics (accuracy, F1; scikit-learn).

The ranking functions take labels of the query and the *ranked* labels of what was retrieved for it
(row i of `ranked_labels` = gallery labels sorted from nearest to farthest for query i). Labels may be
strings or ints; a query's item is relevant when its label equals the query's label.
"""

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def relevance(query_labels, ranked_labels) -> np.ndarray:
    """Bool (n_q, K): ranked item j of query i has query i's label."""
    query_labels = np.asarray(query_labels)
    ranked_labels = np.asarray(ranked_labels)
    if query_labels.ndim != 1 or ranked_labels.ndim != 2 or len(query_labels) != len(ranked_labels):
        raise ValueError(
            f"need query_labels (n_q,) and ranked_labels (n_q, K); got {query_labels.shape} and {ranked_labels.shape}"
        )
    # numpy compares an int array with a str array as all-False without a word: every metric would be 0
    numeric = [np.issubdtype(a.dtype, np.number) for a in (query_labels, ranked_labels)]
    if numeric[0] != numeric[1] and object not in (query_labels.dtype, ranked_labels.dtype):
        raise TypeError(
            f"query labels ({query_labels.dtype}) and ranked labels ({ranked_labels.dtype}) cannot match: "
            "one is numeric, the other is not"
        )
    return ranked_labels == query_labels[:, None]


def first_hit_rank(relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each row's first relevant item; 0 where the row has none."""
    return np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, 0)


def cmc(query_labels, ranked_labels, max_rank: int) -> np.ndarray:
    """Cumulative match curve: element r-1 is the fraction of queries with a correct item in the top r.

    Averaged over *all* queries (as recall@k is defined here), so a query whose label is absent from the
    gallery counts as a miss at every rank, and cmc(...)[k-1] == recall@k. Ranks beyond the K given
    columns repeat the value at K (correct when each row is the whole gallery).
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    first = first_hit_rank(relevance(query_labels, ranked_labels))
    if len(first) == 0:
        return np.full(max_rank, np.nan)
    hits_at_rank = np.bincount(first, minlength=max_rank + 1)[1 : max_rank + 1]
    return np.cumsum(hits_at_rank) / len(first)


def recall_at_k(query_labels, neighbor_labels, ks=(1, 5)) -> dict:
    """{'recall@k': fraction of queries whose label is among the labels of their first k neighbours}.

    A row with fewer than k columns is read as the whole ranking (a gallery smaller than k).
    """
    curve = cmc(query_labels, neighbor_labels, max(ks))
    return {f"recall@{k}": float(curve[k - 1]) for k in ks}


def average_precision(relevant, n_relevant=None):
    """AP of a ranked list: mean over the relevant items of precision at their rank.

    `relevant`: bool (K,) for one ranking, or (n, K) for n rankings (returns one AP per row).
    `n_relevant`: the number of relevant items in the whole gallery (scalar or per row). With a
    ranking truncated at K it is larger than relevant.sum(), and the relevant items that were never
    retrieved count as precision 0 - so truncation is penalised. Defaults to relevant.sum()
    (right when the ranking covers the whole gallery). A row with n_relevant == 0 has no AP: NaN.
    """
    relevant = np.asarray(relevant, dtype=bool)
    rows = np.atleast_2d(relevant)
    retrieved = rows.sum(axis=1)
    n_rel = retrieved if n_relevant is None else np.broadcast_to(np.asarray(n_relevant), retrieved.shape)
    if np.any(n_rel < retrieved):
        raise ValueError("n_relevant is smaller than the number of relevant items in the ranking")
    precision = np.cumsum(rows, axis=1) / np.arange(1, rows.shape[1] + 1)
    hit_precision = np.where(rows, precision, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(n_rel > 0, hit_precision / n_rel, np.nan)
    return float(ap[0]) if relevant.ndim == 1 else ap


def summarize_ap(ap) -> tuple[float, int]:
    """(mAP over the queries that have an AP, number of queries without any relevant gallery item).

    Queries without relevant items (NaN AP) are neither 0 nor 1: they are left out and counted, so an
    open-set query (an individual the gallery has never seen) cannot inflate or sink the mAP unseen.
    mAP is NaN when no query has a relevant item.
    """
    ap = np.asarray(ap, dtype=float)
    missing = np.isnan(ap)
    n_missing = int(missing.sum())
    return (float(ap[~missing].mean()) if n_missing < len(ap) else float("nan")), n_missing


def mean_average_precision(query_labels, ranked_labels, n_relevant=None) -> tuple[float, int]:
    """(mAP, number of queries without relevant items) of a ranking; see average_precision and summarize_ap.

    `n_relevant` (per query, or None = the ranking is the whole gallery): how many gallery items share the
    query's label, so that a ranking truncated before all of them is penalised.
    """
    return summarize_ap(average_precision(relevance(query_labels, ranked_labels), n_relevant))


def per_identity_ap(query_labels, ap) -> pd.DataFrame:
    """One row per identity (query label): its mean AP over its queries that have one, and how many queries it had.
    Sorted worst first, so .head() are the identities that fail and .tail() the easy ones."""
    frame = pd.DataFrame({"label": np.asarray(query_labels), "ap": np.asarray(ap, dtype=float)})
    table = frame.groupby("label")["ap"].agg(ap="mean", queries="size", queries_with_ap="count")
    return table.sort_values(["ap", "queries"], na_position="last").rename_axis("identity")


def identity_balanced_map(query_labels, ap) -> float:
    """mAP as the mean over identities of each identity's mean AP, as re-ID competitions score it:
    an individual with many photos weighs as much as one with few, where plain mAP lets the often-photographed
    ones dominate.
    NaN APs (no relevant gallery item) are left out as in summarize_ap; NaN when no identity has one."""
    per = per_identity_ap(query_labels, ap)["ap"].dropna()
    return float(per.mean()) if len(per) else float("nan")


# Classification by retrieval: the voted class against the true one (scikit-learn does the counting).


def vote_accuracy(y_true, y_pred) -> float:
    """Share of queries whose voted class is their true class (NaN for no queries)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def _evaluated_labels(y_true, labels) -> list:
    # F1 is averaged over the classes that have queries: a gallery class absent from the split has no recall
    # to measure, and counting it as F1 = 0 would sink the mean for a reason that is not the model's
    return sorted(set(np.asarray(y_true).tolist())) if labels is None else list(labels)


def macro_f1(y_true, y_pred, labels=None) -> float:
    """Unweighted mean of the per-class F1 over `labels` (default: the classes present in y_true)."""
    return float(f1_score(y_true, y_pred, labels=_evaluated_labels(y_true, labels), average="macro", zero_division=0))


def per_class_report(y_true, y_pred, labels=None) -> pd.DataFrame:
    """One row per class: precision, recall, f1, support (queries of that class), predicted (times voted)."""
    labels = _evaluated_labels(y_true, labels)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    predicted = pd.Series(np.asarray(y_pred)).value_counts().reindex(labels, fill_value=0).to_numpy()
    return pd.DataFrame({"precision": p, "recall": r, "f1": f, "support": support, "predicted": predicted},
                        index=pd.Index(labels, name="class"))


def confusion_table(y_true, y_pred, labels=None) -> pd.DataFrame:
    """Counts: rows = true class, columns = voted class, over `labels` (default: every class seen in either)."""
    if labels is None:
        labels = sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))
    m = confusion_matrix(y_true, y_pred, labels=list(labels))
    return pd.DataFrame(m, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="predicted"))
