"""Classification metrics of per-class scores, as the marmoset pipeline reports them: accuracy and macro-F1 of the
top-scored class, one-vs-rest AUROC per class and their mean, and for two classes with a named positive class the
threshold sweep (the threshold of best F1, its precision and recall), with orientation correction. The scores are a
cross-entropy run's softmax probabilities or any run's vote shares (lib.retrieval.decide), each row summing to 1."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from lib.evaluate.record import Evaluation


def one_vs_rest_auroc(labels, scores: pd.DataFrame) -> dict[str, float]:
    """AUROC of each class's score column for telling its queries from the others; NaN for a class whose queries
    are all or none of them (no pair to rank)."""
    labels = np.asarray(labels, dtype=str)
    out = {}
    for c in scores.columns:
        positive = labels == str(c)
        out[str(c)] = (float(roc_auc_score(positive, scores[c])) if 0 < positive.sum() < len(labels)
                       else float("nan"))
    return out


def best_f1_threshold(positive, score) -> dict:
    """The threshold on `score` with the best F1 for calling `positive`, its precision and recall, and AUROC. When the
    score ranks the negatives higher (AUROC < 0.5) it is turned round (1 - score, the other class's share) first, and
    `flipped` says so: the marmoset pipeline's orientation correction, so a classifier that learnt the classes the
    wrong way round is reported as what it can tell apart."""
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=float)
    if positive.all() or not positive.any():
        raise ValueError("the threshold sweep needs queries of both classes")
    auroc = float(roc_auc_score(positive, score))
    flipped = auroc < 0.5
    if flipped:
        score, auroc = 1.0 - score, 1.0 - auroc
    precision, recall, thresholds = precision_recall_curve(positive, score)
    # the last (precision 1, recall 0) point has no threshold
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    return {"threshold": float(thresholds[best]), "f1": float(f1[best]), "precision": float(precision[best]),
            "recall": float(recall[best]), "auroc": auroc, "flipped": bool(flipped)}


def classification_metrics(labels, scores: pd.DataFrame, pos_class: str = "") -> dict:
    """accuracy and macro-F1 of the top-scored class, per-class and macro (mean of the defined ones) one-vs-rest
    AUROC; with `pos_class` (two score columns only) also its best-F1 threshold (best_f1_threshold)."""
    labels = np.asarray(labels, dtype=str)
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} score rows")
    columns = scores.columns.astype(str)
    pred = columns[np.asarray(scores).argmax(axis=1)]
    per_class = one_vs_rest_auroc(labels, scores)
    defined = [v for v in per_class.values() if not np.isnan(v)]
    out = {"accuracy": float(np.mean(pred == labels)),
           "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
           "macro_auroc": float(np.mean(defined)) if defined else float("nan"), "auroc": per_class}
    if pos_class:
        if pos_class not in columns:
            raise ValueError(f"pos_class={pos_class!r} is not among the classes {sorted(columns)}")
        if len(columns) != 2:
            raise ValueError(f"pos_class names the positive of two classes; these scores have {len(columns)}: "
                             f"{sorted(columns)[:10]} (set pos_class='')")
        out["sweep"] = {"pos_class": pos_class,
                        **best_f1_threshold(labels == pos_class, scores.iloc[:, list(columns).index(pos_class)])}
    return out


def add_classification_metrics(ev: Evaluation, pos_class: str = "") -> dict:
    """ev.metrics['classification']: the metrics of the vote shares ('votes') and, for a run with a softmax
    classifier, of its probabilities ('softmax', whose top class also goes into ev.queries['softmax_pred'])."""
    found = {"votes": classification_metrics(ev.queries["label"], ev.class_scores, pos_class)}
    if ev.class_probs is not None:
        found["softmax"] = classification_metrics(ev.queries["label"], ev.class_probs, pos_class)
        ev.queries["softmax_pred"] = ev.class_probs.columns.astype(str)[np.asarray(ev.class_probs).argmax(axis=1)]
    ev.metrics["classification"] = found
    return found


def classification_table(found: dict) -> pd.DataFrame:
    """One row per score source (votes, softmax): accuracy, macro-F1, macro AUROC and the sweep's numbers."""
    return pd.DataFrame({source: {key: value for key, value in {**m, **m.get("sweep", {})}.items()
                                  if key not in ("auroc", "sweep")} for source, m in found.items()}).T
