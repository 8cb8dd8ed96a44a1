"""Evaluate a trained run on one split: its model from a checkpoint, gallery (train) and queries (the split) embedded
through the embedding cache, searched, voted, decided and measured into an evaluation record."""
from __future__ import annotations

import os
from dataclasses import asdict

import pandas as pd

from lib.core.device import auto_settings
from lib.core.errors import DataError
from lib.evaluate.gallery_index import build_gallery_index
from lib.evaluate.record import Evaluation
from lib.retrieval.ann_index import IndexSpec, approximation_recall
from lib.retrieval.decide import (
    DEFAULT_K,
    DEFAULT_WEIGHTING,
    Thresholds,
    decisions,
    new_individual_calls,
    new_individual_threshold,
    verdicts,
)
from lib.retrieval.embed import EMBED_BATCH_SIZE
from lib.retrieval.exclusion import resolve_loo_rule
from lib.retrieval.faiss_index import faiss_device_for, fill_padding, search, search_within
from lib.retrieval.metrics import first_hit_rank, macro_f1, per_class_report, relevance, vote_accuracy
from lib.retrieval.ranking import evaluate_retrieval, resolve_val_protocol
from lib.train.trained_run import class_probabilities, embed_rows, load_trained, rows_in_split, split_rows


def _coverage_metrics(queries: pd.DataFrame) -> dict:
    accepted = queries["verdict"] == "accepted"
    return {"coverage": float(accepted.mean()),
            "accuracy_at_coverage": float(queries.loc[accepted, "correct"].mean()) if accepted.any() else float("nan")}


def evaluate_run(run_dir: str | os.PathLike, split: str = "val", checkpoint: str = "best", k: int = DEFAULT_K,
                 weighting: str = DEFAULT_WEIGHTING, tta: bool = False, thresholds: Thresholds | None = None,
                 device: str = "auto", batch_size: int = EMBED_BATCH_SIZE, progress: bool = False,
                 protocol: str = "auto", restrict_to_context: bool = False,
                 new_threshold: float | None = None, index: IndexSpec | None = None,
                 loo_rule: str = "auto") -> Evaluation:
    """Gallery = the run's train split, queries = `split`; every query searched, voted and judged.

    protocol 'gallery' is that; 'loo' (leave-one-out) makes the split its own gallery, each photo querying all the
    others, for open-set splits whose individuals the train split never saw; 'auto' picks 'loo' when the split
    shares no label with train, as training's validation does.
    loo_rule (leave-one-out only; lib.retrieval.exclusion): 'group' leaves each query's whole group (the split's
    leakage unit: encounter, sighting, photo) out of its neighbours and ranking as junk, 'photo' only the query
    itself, 'auto' is 'group' where the groups are finer than the individuals. The record's config['loo_rule'] says
    which (None for the gallery protocol; a record without the key used 'photo').
    thresholds=None accepts every query (coverage 1); choose them on 'val' (lib.retrieval.decide.choose_thresholds) and
    apply_thresholds. The train gallery's index is also saved to run_dir/index/ for lib.evaluate.predict.
    restrict_to_context: each query's neighbours (and so its vote, prediction and top-1 distance) come only from
    gallery photos of its own context (lib.retrieval.faiss_index.search_within); recall@k and mAP still rank the whole gallery.
    metrics['new_individual']: a query is new when no other photo of its individual is in its gallery, and is called
    new when its top-1 distance exceeds a threshold: new_threshold, chosen on val (pass val's when evaluating test),
    or None to choose it here for the best F1.
    index: the Faiss index that finds each query's k neighbours (lib.retrieval.ann_index.IndexSpec; None: its
    defaults, exact below AUTO_EXACT_BELOW gallery photos, IVF above). metrics['index'] says which, why, and for an
    approximate one its recall@k against exact search on a sample of the queries; recall@k and mAP are always exact
    (the whole gallery ranked a chunk of queries at a time).
    """
    if split == "train":
        raise ValueError("split='train' is the gallery; evaluate 'val' (or 'test' when asked for explicitly)")
    index = index or IndexSpec()
    run = load_trained(run_dir, checkpoint)
    rows = split_rows(run)
    gallery, queries = rows_in_split(rows, "train"), rows_in_split(rows, split)
    if restrict_to_context and "context" not in rows.columns:
        raise DataError(f"restrict_to_context needs a context column, and the index of "
                        f"{run.settings.data.splits_dir} has none (notebook 01's context_col)")
    if queries.empty:
        raise DataError(f"split {split!r} has no images in {run.settings.data.splits_dir} "
                        f"(splits present: {sorted(set(rows['split']) - {''})})")
    protocol = resolve_val_protocol(protocol, gallery["label"], queries["label"])
    loo = protocol == "loo"
    loo_rule = resolve_loo_rule(loo_rule, queries["label"], queries["group"]) if loo else None
    groups = queries["group"].to_numpy() if loo_rule == "group" else None
    settings = auto_settings(device=device)
    if not loo:
        g_emb, g_info = embed_rows(run, gallery, settings, tta, batch_size, progress, desc="gallery")
    q_emb, q_info = embed_rows(run, queries, settings, tta, batch_size, progress, desc=split)
    if loo:
        gallery, g_emb = queries.copy(), q_emb
    faiss_device = faiss_device_for(settings.device)
    built = build_gallery_index(run, gallery, g_emb, None if loo else g_info, settings.device, index, save=not loo)
    if restrict_to_context:
        # a context holds few photos: each is searched exactly, whatever the gallery's index
        distances, neighbours = search_within(g_emb, gallery["context"], q_emb, queries["context"], k,
                                              exclude_self=loo, device=faiss_device, groups=groups)
        index_report = {"factory": "Flat", "chosen": "restrict_to_context: each context searched exactly",
                        "exact": True}
    else:
        distances, neighbours = search(built.index, q_emb, k, exclude_self=loo, groups=groups)
        index_report = {key: built.info[key] for key in ("factory", "chosen", "exact", "search_params", "placement")}
        if not built.info["exact"]:
            index_report["recall_vs_exact"] = approximation_recall(
                built.index, g_emb, q_emb, k, index.recall_sample, index.seed, exclude_self=loo)
    g_labels, q_labels = gallery["label"].to_numpy(), queries["label"].to_numpy()
    neighbour_labels = g_labels[fill_padding(neighbours)]
    classes = sorted(set(q_labels)) if loo else sorted(run.config["class_to_idx"])
    table, shares = decisions(distances, neighbour_labels, classes, weighting, thresholds)
    queries = pd.concat([queries, table], axis=1)
    queries["correct"] = queries["pred"] == queries["label"]
    queries["rank_of_true"] = first_hit_rank(relevance(q_labels, neighbour_labels))

    metrics = evaluate_retrieval(g_emb, g_labels, q_emb, q_labels, ks=(1, 5), exclude_self=loo, device=faiss_device,
                                 per_query=True, groups=groups)
    queries["ap"] = metrics.pop("ap")
    is_new = queries["ap"].isna()
    metrics["new_individual"] = (new_individual_threshold(queries["top1_distance"], is_new) if new_threshold is None
                                 else new_individual_calls(queries["top1_distance"], is_new, new_threshold))
    metrics.update(protocol=protocol, index=index_report, vote_accuracy=vote_accuracy(q_labels, queries["pred"]),
                   macro_f1=macro_f1(q_labels, queries["pred"]),
                   **_coverage_metrics(queries), n_gallery=len(gallery),
                   inference_ms_per_image=q_info["ms_per_image"],
                   per_class=per_class_report(q_labels, queries["pred"]).to_dict(orient="index"))
    config = {"run_dir": str(run_dir), "checkpoint": run.checkpoint.name, "checkpoint_sha256": run.checkpoint_sha256,
              "protocol": protocol, "loo_rule": loo_rule, "restrict_to_context": restrict_to_context, "k": k,
              "weighting": weighting, "tta": tta, "thresholds": asdict(thresholds or Thresholds()),
              "index": asdict(index),
              "device": settings.device, "run": run.config,
              "train_time_min": sum(r.get("train_seconds") or 0 for r in run.history) / 60,
              "checkpoint_epoch": run.epoch}
    return Evaluation(split=split, data_root=run.settings.data.data_dir, gallery=gallery, queries=queries,
                      neighbours=neighbours, distances=distances,
                      class_scores=pd.DataFrame(shares, columns=classes), gallery_emb=g_emb, query_emb=q_emb,
                      metrics=metrics, config=config,
                      # leave-one-out queries are individuals the classifier never learnt: its classes mean nothing
                      class_probs=None if loo else class_probabilities(run, q_emb))


def apply_thresholds(ev: Evaluation, thresholds: Thresholds) -> Evaluation:
    """The same evaluation with its verdicts, coverage and accuracy-at-coverage for other thresholds (in place)."""
    ev.queries["verdict"] = verdicts(ev.queries["top1_distance"], ev.queries["margin"], thresholds)
    ev.metrics.update(_coverage_metrics(ev.queries))
    ev.config["thresholds"] = asdict(thresholds)
    return ev
