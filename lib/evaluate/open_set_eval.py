"""The open-set figures of an evaluation (lib.retrieval.open_set), into its record's metrics['open_set']."""
from __future__ import annotations

import numpy as np

from lib.evaluate.record import Evaluation
from lib.retrieval.open_set import balanced_new_threshold, open_set_report

RESULT_COLUMNS = ("BAKS", "BAUS", "harmonic_mean", "auroc_top1_distance", "auroc_margin")


def add_open_set_metrics(ev: Evaluation, new_threshold: float | None = None, min_margin: float | None = None) -> dict:
    """ev.metrics['open_set']: BAKS, BAUS, AUROC of new-vs-known and the known / new / reshoot rule's coverage and
    accuracy, with Recall@k and mAP of the known queries alone. Only for a gallery protocol with unknown queries;
    otherwise (leave-one-out: the split queries itself; a closed set) the entry says why it was skipped.

    new_threshold: the rule's top-1 distance threshold; None chooses it on this evaluation's queries (val) for the best
    harmonic mean of BAKS and BAUS (lib.retrieval.open_set.balanced_new_threshold); pass val's to a test evaluation.
    min_margin: None takes the vote-margin threshold the evaluation applied.
    """
    if ev.config["protocol"] != "gallery":
        ev.metrics["open_set"] = {"skipped": f"protocol {ev.config['protocol']!r}: the split queries itself, so it "
                                             "has no known/unknown mix (notebook 01's split_mode='open' with "
                                             "unknown_share < 1 makes one)"}
        return ev.metrics["open_set"]
    is_unknown = ~ev.queries["label"].isin(ev.gallery["label"])
    if not is_unknown.any():  # a closed set: the known-query figures would repeat the main ones
        ev.metrics["open_set"] = {"skipped": "closed set: every query's individual has photos in the gallery"}
        return ev.metrics["open_set"]
    chosen_here = new_threshold is None
    if chosen_here:
        new_threshold = balanced_new_threshold(ev.queries["label"], ev.queries["pred"], ev.queries["top1_distance"],
                                               set(ev.queries.loc[is_unknown, "label"]))
    if min_margin is None:
        min_margin = ev.config["thresholds"]["min_margin"]
    ev.metrics["open_set"] = open_set_report(ev.queries, ev.gallery["label"].to_numpy(), ev.gallery_emb, ev.query_emb,
                                             new_threshold, min_margin)
    ev.metrics["open_set"]["new_threshold_chosen_on"] = ev.split if chosen_here else "given (val's)"
    return ev.metrics["open_set"]


def open_set_columns(ev: Evaluation) -> dict:
    """The open-set figures for the evaluation's results row ({} when it has none)."""
    report = ev.metrics.get("open_set") or {}
    if "BAKS" not in report:
        return {}
    return {f"open_set_{key}": report[key] for key in RESULT_COLUMNS} | {
        "open_set_recall@1_known": report.get("known_queries", {}).get("recall@1", np.nan)}
