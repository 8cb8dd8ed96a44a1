"""Evaluate a trained run: rebuild its model from a checkpoint, embed gallery (train) and queries (one split) through
the embedding cache, search, vote, decide, measure; and the one-row-per-run results table.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.checkpoint import load_checkpoint
from lib.data import IndexDataset
from lib.decide import Thresholds, class_scores, new_individual_calls, new_individual_threshold, verdicts, vote
from lib.device import DeviceSettings, auto_settings
from lib.embed import cached_embeddings, file_sha256
from lib.errors import DataError
from lib.evaluation import Evaluation
from lib.metrics import macro_f1, per_class_report, vote_accuracy
from lib.model import ModelConfig, create_model
from lib.retrieval import build_index, evaluate_retrieval, fill_padding, save_index, search, search_within
from lib.run import load_run_data
from lib.train import resolve_val_protocol
from lib.transforms import build_transforms

CHECKPOINTS = {"best": "best_model.pt", "latest": "latest_model.pt"}
BENCHMARK_COLUMNS = ("version", "split", "backbone", "loss", "embedding_dim", "img_size", "augmentation", "recall@1",
                     "recall@5", "mAP", "identity_balanced_mAP", "vote_accuracy", "macro_f1", "coverage", "accuracy_at_coverage",
                     "train_time_min", "inference_ms_per_image", "notes", "evaluation_id")
# what makes two evaluations the same one: re-running it replaces its row in the results table instead of adding one
EVALUATION_KEYS = ("checkpoint_sha256", "protocol", "restrict_to_context", "k", "weighting", "tta", "thresholds")


@dataclass
class TrainedRun:
    run_dir: Path
    checkpoint: Path
    checkpoint_sha256: str
    config: dict              # the checkpoint's full config (sections + class_to_idx, data_fingerprint, ...)
    history: list
    model: torch.nn.Module
    eval_tf: object


def checkpoint_file(run_dir: str | os.PathLike, checkpoint: str = "best") -> Path:
    """'best', 'latest', or a file name in run_dir (e.g. 'checkpoint_epoch_10.pt')."""
    path = Path(run_dir) / CHECKPOINTS.get(checkpoint, checkpoint)
    if not path.is_file():
        found = sorted(p.name for p in Path(run_dir).glob("*.pt")) if Path(run_dir).is_dir() else []
        raise DataError(f"no checkpoint {path}; run_dir holds {found or 'no .pt files'} (train it with notebook 02)")
    return path


def load_trained(run_dir: str | os.PathLike, checkpoint: str = "best") -> TrainedRun:
    """The run's model with the checkpoint's weights (built without fetching any pretrained weights) and its eval
    transform, on the CPU in eval mode."""
    path = checkpoint_file(run_dir, checkpoint)
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    model = create_model(ModelConfig(**{**config["model"], "pretrained": ""}))
    model.load_state_dict(ckpt["model"])
    model.eval()
    dc, aug = model.data_config, config["aug"]
    _, eval_tf = build_transforms(aug["img_size"], dc["mean"], dc["std"], preset="none")
    return TrainedRun(Path(run_dir), path, file_sha256(path), config, ckpt.get("history", []), model, eval_tf)


def split_rows(run: TrainedRun) -> pd.DataFrame:
    """The run's split index (with `split`), refused when the data changed since training."""
    index, _, report = load_run_data(run.config)
    trained_on = run.config.get("data_fingerprint")
    if trained_on and report.get("data_fingerprint") != trained_on:
        raise DataError(f"the split in {run.config['data']['splits_dir']} describes other data than {run.checkpoint} "
                        "was trained on (data fingerprints differ); evaluate with the splits it was trained with")
    return index.reset_index(drop=True)


def embed_rows(run: TrainedRun, rows: pd.DataFrame, settings: DeviceSettings, tta: bool = False,
               batch_size: int = 64, progress: bool = False, desc: str = "embed") -> tuple[np.ndarray, dict]:
    """Embeddings of index rows through the run's cache (run_dir/embeddings/)."""
    d = run.config["data"]
    dataset = IndexDataset(rows, d["data_dir"], run.eval_tf, run.config["class_to_idx"], d["cache_dir"] or None)
    run.model.to(settings.device)
    return cached_embeddings(run.model, dataset, settings, run.run_dir / "embeddings", run.checkpoint_sha256, tta=tta,
                             batch_size=batch_size, progress=progress, desc=desc)


def decide(distances, neighbour_labels, classes, weighting: str = "inverse",
           thresholds: Thresholds | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """(table of pred, score, margin, top1_distance, verdict; (n_q, n_classes) class shares) for searched queries."""
    shares = class_scores(distances, neighbour_labels, classes, weighting)
    winner, score, margin = vote(shares)
    top1 = np.asarray(distances)[:, 0]
    table = pd.DataFrame({"pred": np.asarray(classes)[winner], "score": score, "margin": margin,
                          "top1_distance": top1, "verdict": verdicts(top1, margin, thresholds or Thresholds())})
    return table, shares


def _rank_of_true(neighbour_labels: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of the first retrieved neighbour with the query's label; 0 when none of the K has it."""
    hit = neighbour_labels == labels[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)


def _coverage_metrics(queries: pd.DataFrame) -> dict:
    accepted = queries["verdict"] == "accepted"
    return {"coverage": float(accepted.mean()),
            "accuracy_at_coverage": float(queries.loc[accepted, "correct"].mean()) if accepted.any() else float("nan")}


def evaluate_run(run_dir: str | os.PathLike, split: str = "val", checkpoint: str = "best", k: int = 20,
                 weighting: str = "inverse", tta: bool = False, thresholds: Thresholds | None = None,
                 device: str = "auto", batch_size: int = 64, progress: bool = False,
                 protocol: str = "auto", restrict_to_context: bool = False,
                 new_threshold: float | None = None) -> Evaluation:
    """Gallery = the run's train split, queries = `split`; every query searched, voted and judged.

    protocol 'gallery' is that; 'loo' (leave-one-out) makes the split its own gallery, each photo querying all the
    others, for open-set splits whose individuals the train split never saw; 'auto' picks 'loo' when the split
    shares no label with train, as training's validation does.
    thresholds=None accepts every query (coverage 1); choose them on 'val' (lib.decide.choose_thresholds) and
    apply_thresholds. The train gallery's index is also saved to run_dir/index/ for lib.predict.
    restrict_to_context: each query's neighbours (and so its vote, prediction and top-1 distance) come only from
    gallery photos of its own context (lib.retrieval.search_within); recall@k and mAP still rank the whole gallery.
    metrics['new_individual']: a query is new when no other photo of its individual is in its gallery, and is called
    new when its top-1 distance exceeds a threshold: new_threshold, chosen on val (pass val's when evaluating test),
    or None to choose it here for the best F1.
    """
    if split == "train":
        raise ValueError("split='train' is the gallery; evaluate 'val' (or 'test' when asked for explicitly)")
    run = load_trained(run_dir, checkpoint)
    rows = split_rows(run)
    cols = [c for c in rows.columns if c != "split"]
    gallery = rows.loc[rows["split"] == "train", cols].reset_index(drop=True)
    queries = rows.loc[rows["split"] == split, cols].reset_index(drop=True)
    if restrict_to_context and "context" not in rows.columns:
        raise DataError(f"restrict_to_context needs a context column, and the index of "
                        f"{run.config['data']['splits_dir']} has none (notebook 01's context_col)")
    if queries.empty:
        raise DataError(f"split {split!r} has no images in {run.config['data']['splits_dir']} "
                        f"(splits present: {sorted(set(rows['split']) - {''})})")
    protocol = resolve_val_protocol(protocol, gallery["label"], queries["label"])
    loo = protocol == "loo"
    settings = auto_settings(device=device)
    if not loo:
        g_emb, g_info = embed_rows(run, gallery, settings, tta, batch_size, progress, desc="gallery")
    q_emb, q_info = embed_rows(run, queries, settings, tta, batch_size, progress, desc=split)
    if loo:
        gallery, g_emb = queries.copy(), q_emb
    faiss_device = "cpu" if settings.device == "cpu" else "auto"  # auto: faiss-cpu beside CUDA torch is no error
    index = build_index(g_emb, faiss_device)
    if not loo:
        save_index(index, gallery, run.run_dir / "index", {**{k_: g_info[k_] for k_ in ("checkpoint_sha256", "tta",
                   "transform", "data_fingerprint")}, "checkpoint": run.checkpoint.name})
    if restrict_to_context:
        distances, neighbours = search_within(g_emb, gallery["context"], q_emb, queries["context"], k,
                                              exclude_self=loo, device=faiss_device)
    else:
        distances, neighbours = search(index, q_emb, k, exclude_self=loo)
    g_labels, q_labels = gallery["label"].to_numpy(), queries["label"].to_numpy()
    neighbour_labels = g_labels[fill_padding(neighbours)]
    classes = sorted(set(q_labels)) if loo else sorted(run.config["class_to_idx"])
    table, shares = decide(distances, neighbour_labels, classes, weighting, thresholds)
    queries = pd.concat([queries, table], axis=1)
    queries["correct"] = queries["pred"] == queries["label"]
    queries["rank_of_true"] = _rank_of_true(neighbour_labels, q_labels)

    metrics = evaluate_retrieval(g_emb, g_labels, q_emb, q_labels, ks=(1, 5), exclude_self=loo, device=faiss_device,
                                 per_query=True)
    queries["ap"] = metrics.pop("ap")
    is_new = queries["ap"].isna()
    metrics["new_individual"] = (new_individual_threshold(queries["top1_distance"], is_new) if new_threshold is None
                                 else new_individual_calls(queries["top1_distance"], is_new, new_threshold))
    metrics.update(protocol=protocol, vote_accuracy=vote_accuracy(q_labels, queries["pred"]),
                   macro_f1=macro_f1(q_labels, queries["pred"]),
                   **_coverage_metrics(queries), n_gallery=len(gallery),
                   inference_ms_per_image=q_info["ms_per_image"],
                   per_class=per_class_report(q_labels, queries["pred"]).to_dict(orient="index"))
    config = {"run_dir": str(run_dir), "checkpoint": run.checkpoint.name, "checkpoint_sha256": run.checkpoint_sha256,
              "protocol": protocol, "restrict_to_context": restrict_to_context, "k": k, "weighting": weighting,
              "tta": tta, "thresholds": asdict(thresholds or Thresholds()),
              "device": settings.device, "run": run.config,
              "train_time_min": sum(r.get("train_seconds") or 0 for r in run.history) / 60}
    return Evaluation(split=split, data_root=run.config["data"]["data_dir"], gallery=gallery, queries=queries,
                      neighbours=neighbours, distances=distances,
                      class_scores=pd.DataFrame(shares, columns=classes), gallery_emb=g_emb, query_emb=q_emb,
                      metrics=metrics, config=config)


def apply_thresholds(ev: Evaluation, thresholds: Thresholds) -> Evaluation:
    """The same evaluation with its verdicts, coverage and accuracy-at-coverage for other thresholds (in place)."""
    ev.queries["verdict"] = verdicts(ev.queries["top1_distance"], ev.queries["margin"], thresholds)
    ev.metrics.update(_coverage_metrics(ev.queries))
    ev.config["thresholds"] = asdict(thresholds)
    return ev


def _loss_name(loss: dict) -> str:
    name = "arcface" if loss.get("k_subcenters", 1) <= 1 else f"subcenter-arcface(k={loss['k_subcenters']})"
    extras = [f"+{term}{loss[f'{term}_weight']:g}" for term in ("triplet", "ms") if loss.get(f"{term}_weight")]
    return f"{name}(s={loss['s']:g})" + "".join(extras)


def benchmark_row(ev: Evaluation, notes: str = "") -> dict:
    """The results-table row of an evaluation (columns BENCHMARK_COLUMNS)."""
    cfg = ev.config["run"]
    m = ev.metrics
    aug = cfg["aug"]
    return {"version": Path(ev.config["run_dir"]).name, "split": ev.split, "backbone": cfg["model"]["backbone"],
            "loss": _loss_name(cfg["loss"]), "embedding_dim": cfg["model"]["embed_dim"], "img_size": aug["img_size"],
            "augmentation": aug["augment"] + ("+hflip" if aug["hflip"] else ""),
            # .get: evaluations saved before a metric existed still make a row
            **{key: m.get(key, float("nan")) for key in ("recall@1", "recall@5", "mAP", "identity_balanced_mAP",
                                                          "vote_accuracy", "macro_f1", "coverage",
                                                          "accuracy_at_coverage")},
            "train_time_min": ev.config.get("train_time_min", float("nan")),
            "inference_ms_per_image": m["inference_ms_per_image"], "notes": notes,
            "evaluation_id": evaluation_id(ev)}


def evaluation_id(ev: Evaluation) -> str:
    """12 hex digits naming the checkpoint, split and settings of an evaluation (EVALUATION_KEYS)."""
    key = {"split": ev.split, **{k: ev.config.get(k) for k in EVALUATION_KEYS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def append_benchmark_row(results_csv: str | os.PathLike, row: dict, columns=BENCHMARK_COLUMNS,
                         replace_key: str | None = None) -> Path:
    """Append one row; a new file gets `columns` (+ the row's extra keys) as its header.

    An existing file with other columns is rewritten with the union of both (its columns first), never cut.
    replace_key: a row of the file with the same value in this column is replaced by `row` (the same evaluation
    run again), in its place; other rows are kept as they are.
    """
    path = Path(results_csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        header = list(columns) + [c for c in row if c not in columns]
        pd.DataFrame([row], columns=header).to_csv(path, index=False)
        return path
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        at = header.index(replace_key) if replace_key in header else None
        same = at is not None and any(len(r) > at and r[at] == str(row[replace_key]) for r in reader)
    if set(row) <= set(header) and not same:
        pd.DataFrame([row], columns=header).to_csv(path, mode="a", header=False, index=False)
        return path
    old = pd.read_csv(path, dtype=str, keep_default_na=False)
    if same:
        hit = old[replace_key] == str(row[replace_key])
        after_first = hit.cumsum().astype(bool)
        table = pd.concat([old[~after_first], pd.DataFrame([row]), old[after_first & ~hit]], ignore_index=True)
    else:
        table = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path
