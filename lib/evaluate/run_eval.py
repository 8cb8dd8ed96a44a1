"""Evaluate a trained run on one split: its model from a checkpoint, gallery (train) and queries (the split) embedded
through the embedding cache, searched, voted, decided and measured into an evaluation record."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings, auto_settings
from lib.core.errors import DataError
from lib.evaluate.gallery_index import build_gallery_index, enrolment_stamp
from lib.evaluate.record import Evaluation
from lib.retrieval.ann_index import IndexSpec, approximation_recall
from lib.retrieval.decide import (
    DEFAULT_K,
    DEFAULT_WEIGHTING,
    Thresholds,
    best_f1_new_threshold,
    decisions,
    new_individual_calls,
    verdicts,
)
from lib.retrieval.embed import EMBED_BATCH_SIZE
from lib.retrieval.faiss_index import faiss_device_for, fill_padding, search, search_within
from lib.retrieval.metrics import first_hit_rank, macro_f1, per_class_report, relevance, vote_accuracy
from lib.retrieval.ranking import evaluate_retrieval
from lib.retrieval.retrieval_split import RetrievalSplit, retrieval_split
from lib.train.trained_run import TrainedRun, class_probabilities, embed_rows, load_trained, rows_in_split, split_rows


@dataclass
class EvalSettings:
    """What evaluate_run evaluates and how (notebook 03's parameters of the same names).

    protocol 'gallery': gallery = the run's train split, queries = `split`; 'loo' (leave-one-out) makes the split its
    own gallery, each photo querying all the others, for open-set splits whose individuals the train split never
    saw; 'auto' picks 'loo' when the split shares no label with train, as training's validation does.
    restrict_to_context: each query's neighbours (and so its vote, prediction and top-1 distance) come only from
    gallery photos of its own context (lib.retrieval.faiss_index.search_within); recall@k and mAP still rank the
    whole gallery.
    loo_rule (leave-one-out only; lib.retrieval.exclusion): 'group' leaves each query's whole group (the split's
    leakage unit: encounter, sighting, photo) out of its neighbours and ranking as junk, 'photo' only the query
    itself, 'auto' is 'group' where the groups are finer than the individuals. The record's config['loo_rule'] says
    which (None for the gallery protocol; a record without the key used 'photo').
    index: the Faiss index that finds each query's k neighbours (lib.retrieval.ann_index.IndexSpec; None: its
    defaults, exact below AUTO_EXACT_BELOW gallery photos, above the fastest index tuned to its recall, measured);
    its k is set to this k, the neighbours whose recall the tuning keeps.
    """
    split: str = "val"
    checkpoint: str = "best"
    k: int = DEFAULT_K
    weighting: str = DEFAULT_WEIGHTING
    tta: bool = False
    protocol: str = "auto"
    restrict_to_context: bool = False
    loo_rule: str = "auto"
    index: IndexSpec | None = None
    device: str = "auto"
    batch_size: int = EMBED_BATCH_SIZE
    progress: bool = False


@dataclass
class _Embedded:
    """A run's split (lib.retrieval.retrieval_split) with its gallery and queries embedded: what the search and the
    metrics start from."""
    run: TrainedRun
    device: DeviceSettings
    split: RetrievalSplit
    g_emb: np.ndarray
    q_emb: np.ndarray
    g_info: dict               # embed_rows' info on the gallery's embeddings (checkpoint, transform, data...)
    ms_per_image: float

    @property
    def faiss_device(self) -> str:
        return faiss_device_for(self.device.device)


def _coverage_metrics(queries: pd.DataFrame) -> dict:
    accepted = queries["verdict"] == "accepted"
    return {"coverage": float(accepted.mean()),
            "accuracy_at_coverage": float(queries.loc[accepted, "correct"].mean()) if accepted.any() else float("nan")}


def _embedded(run_dir, cfg: EvalSettings) -> _Embedded:
    """The run loaded, its split's gallery and query rows checked and embedded through the cache."""
    if cfg.split == "train":
        raise ValueError("split='train' is the gallery; evaluate 'val' (or 'test' when asked for explicitly)")
    run = load_trained(run_dir, cfg.checkpoint)
    rows = split_rows(run)
    if cfg.restrict_to_context and "context" not in rows.columns:
        raise DataError(f"restrict_to_context needs a context column, and the index of "
                        f"{run.settings.data.splits_dir} has none (notebook 01's context_col)")
    queries = rows_in_split(rows, cfg.split)
    if queries.empty:
        raise DataError(f"split {cfg.split!r} has no images in {run.settings.data.splits_dir} "
                        f"(splits present: {sorted(set(rows['split']) - {''})})")
    split = retrieval_split(rows_in_split(rows, "train"), queries, cfg.protocol, cfg.loo_rule)
    device = auto_settings(device=cfg.device)
    def embed(part, desc):
        return embed_rows(run, part, device, cfg.tta, cfg.batch_size, cfg.progress, desc=desc)

    if not split.loo:  # the gallery first, as it always was: each embedding pass draws from the global RNG
        g_emb, g_info = embed(split.gallery, "gallery")
    q_emb, q_info = embed(split.queries, cfg.split)
    if split.loo:
        g_emb, g_info = q_emb, q_info
    return _Embedded(run, device, split, g_emb, q_emb, g_info, q_info["ms_per_image"])


def _ranking(e: _Embedded, cfg: EvalSettings) -> dict:
    """The one exact ranking of the whole gallery for every query (lib.retrieval.ranking.evaluate_retrieval): the
    recall@k and mAP, each query's AP, and its first k neighbours with their distances."""
    s = e.split
    return evaluate_retrieval(e.g_emb, s.gallery_labels, e.q_emb, s.query_labels, s.exclude, ks=(1, 5),
                              device=e.faiss_device, keep=cfg.k)


def _neighbours(e: _Embedded, cfg: EvalSettings, ranking: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """(distances, neighbours, index report) of each query's k nearest gallery photos: the ranking's own where the
    gallery's index is exact, else the index's (or each context's, with restrict_to_context); the train gallery's
    index is saved to run_dir/index/ for lib.evaluate.predict."""
    s = e.split
    built = None
    if not (s.loo and cfg.restrict_to_context):  # a leave-one-out index is not saved: only a search would use it
        built = build_gallery_index(e.run, s.gallery, e.g_emb, e.g_info, e.device.device, cfg.index, save=not s.loo)
    if cfg.restrict_to_context:
        # a context holds few photos: each is searched exactly, whatever the gallery's index
        distances, neighbours = search_within(e.g_emb, s.gallery["context"], e.q_emb, s.queries["context"], cfg.k,
                                              s.exclude, device=e.faiss_device)
        return distances, neighbours, {"factory": "Flat", "exact": True,
                                       "chosen": "restrict_to_context: each context searched exactly"}
    report = {key: built.info[key] for key in ("factory", "chosen", "exact", "search_params", "placement")}
    if built.info.get("tuning"):
        report["tuning"] = built.info["tuning"]
    if built.info["exact"]:  # exact search's k nearest are the first k of the exact ranking
        return ranking["top_distances"], ranking["top"], report
    distances, neighbours = search(built.index, e.q_emb, cfg.k, exclude=s.exclude)
    report["recall_vs_exact"] = approximation_recall(built.index, e.g_emb, e.q_emb, cfg.k, cfg.index.recall_sample,
                                                     cfg.index.seed, exclude=s.exclude)
    return distances, neighbours, report


def _decided(e: _Embedded, cfg: EvalSettings, distances, neighbours, thresholds) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(queries with DECISION_COLUMNS, class shares with the class names as columns)."""
    s = e.split
    q_labels = s.query_labels
    neighbour_labels = s.gallery_labels[fill_padding(neighbours)]
    classes = sorted(set(q_labels)) if s.loo else sorted(e.run.config["class_to_idx"])
    table, shares = decisions(distances, neighbour_labels, classes, cfg.weighting, thresholds)
    queries = pd.concat([s.queries, table], axis=1)
    queries["correct"] = queries["pred"] == queries["label"]
    queries["rank_of_true"] = first_hit_rank(relevance(q_labels, neighbour_labels))
    return queries, pd.DataFrame(shares, columns=classes)


def _metrics(e: _Embedded, queries: pd.DataFrame, ranking: dict, new_threshold: float | None) -> dict:
    """Recall@k, mAP (the whole gallery ranked), vote and new-individual metrics; fills queries['ap']."""
    q_labels = queries["label"].to_numpy()
    metrics = {key: v for key, v in ranking.items() if key not in ("ap", "top", "top_distances")}
    queries["ap"] = ranking["ap"]
    is_new = queries["ap"].isna()
    metrics["new_individual"] = (best_f1_new_threshold(queries["top1_distance"], is_new) if new_threshold is None
                                 else new_individual_calls(queries["top1_distance"], is_new, new_threshold))
    metrics.update(protocol=e.split.protocol, vote_accuracy=vote_accuracy(q_labels, queries["pred"]),
                   macro_f1=macro_f1(q_labels, queries["pred"]), **_coverage_metrics(queries),
                   n_gallery=len(e.split.gallery), inference_ms_per_image=e.ms_per_image,
                   per_class=per_class_report(q_labels, queries["pred"]).to_dict(orient="index"))
    return metrics


def _record_config(run_dir, e: _Embedded, cfg: EvalSettings, thresholds: Thresholds | None) -> dict:
    run = e.run
    return {"run_dir": str(run_dir), "checkpoint": run.checkpoint.name, "checkpoint_sha256": run.checkpoint_sha256,
            "protocol": e.split.protocol, "loo_rule": e.split.loo_rule, "restrict_to_context": cfg.restrict_to_context,
            "k": cfg.k,
            "weighting": cfg.weighting, "tta": cfg.tta, "thresholds": asdict(thresholds or Thresholds()),
            "index": asdict(cfg.index), "gallery_fingerprint": e.g_info["data_fingerprint"], "device": e.device.device,
            # the gallery searched is the split's alone: enrolled photos (lib.evaluate.enroll_cli) are never in it
            "enrolment": enrolment_stamp([]),
            "run": run.config, "train_time_min": sum(r.get("train_seconds") or 0 for r in run.history) / 60,
            "checkpoint_epoch": run.epoch}


def evaluate_run(run_dir: str | os.PathLike, settings: EvalSettings | None = None, *,
                 thresholds: Thresholds | None = None, new_threshold: float | None = None, **overrides) -> Evaluation:
    """Every query of settings.split searched, voted and judged (EvalSettings; keyword `overrides` replace its
    fields, e.g. evaluate_run(run_dir, k=5, device="cpu")).

    thresholds=None accepts every query (coverage 1); choose them on a calibration part of 'val'
    (lib.evaluate.calibrate) and apply_thresholds. metrics['new_individual']: a query is new when no other photo of
    its individual is in its gallery, and is called new when its top-1 distance exceeds a threshold: new_threshold,
    chosen on val (pass val's when evaluating test), or None to choose it here for the best F1. metrics['index'] says
    which index found the neighbours, why, and for an approximate one its recall@k against exact search on a sample
    of the queries; recall@k and mAP are always exact (the whole gallery ranked a chunk of queries at a time).
    """
    cfg = replace(settings or EvalSettings(), **overrides)
    cfg = replace(cfg, index=replace(cfg.index or IndexSpec(), k=cfg.k))  # tuned for the neighbours that vote
    e = _embedded(run_dir, cfg)
    ranking = _ranking(e, cfg)
    distances, neighbours, index_report = _neighbours(e, cfg, ranking)
    queries, class_shares = _decided(e, cfg, distances, neighbours, thresholds)
    metrics = {**_metrics(e, queries, ranking, new_threshold), "index": index_report}
    return Evaluation(split=cfg.split, data_root=e.run.settings.data.data_dir, gallery=e.split.gallery, queries=queries,
                      neighbours=neighbours, distances=distances, class_scores=class_shares, gallery_emb=e.g_emb,
                      query_emb=e.q_emb, metrics=metrics, config=_record_config(run_dir, e, cfg, thresholds),
                      # leave-one-out queries are individuals the classifier never learnt: its classes mean nothing
                      class_probs=None if e.split.loo else class_probabilities(e.run, e.q_emb))


def apply_thresholds(ev: Evaluation, thresholds: Thresholds) -> Evaluation:
    """The same evaluation with its verdicts, coverage and accuracy-at-coverage for other thresholds (in place)."""
    ev.queries["verdict"] = verdicts(ev.queries["top1_distance"], ev.queries["margin"], thresholds)
    ev.metrics.update(_coverage_metrics(ev.queries))
    ev.config["thresholds"] = asdict(thresholds)
    return ev
