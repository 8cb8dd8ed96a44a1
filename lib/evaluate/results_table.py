"""The results table: one row per evaluation (results/benchmarks.csv) or probe run (results/probe.csv), appended
without ever cutting a column an older row has; re-running an evaluation replaces its own row."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import pandas as pd

from lib.core.state_io import state_lock, write_text
from lib.evaluate.record import Evaluation, loo_rule
from lib.train.config import RunConfig
from lib.train.losses import loss_label

BENCHMARK_COLUMNS = ("version", "split", "backbone", "loss", "embedding_dim", "img_size", "augmentation", "recall@1",
                     "recall@5", "mAP", "identity_balanced_mAP", "vote_accuracy", "macro_f1", "coverage", "accuracy_at_coverage",
                     "train_time_min", "checkpoint_epoch", "inference_ms_per_image", "notes", "evaluation_id")
# the results row of a checkpoint that is epoch 0 says so: training did not beat the model it started from
UNTRAINED_BEST = "best checkpoint is epoch 0 (untrained): training did not beat it"
# what makes two evaluations the same one: re-running it replaces its row in the results table instead of adding one
EVALUATION_KEYS = ("checkpoint_sha256", "protocol", "restrict_to_context", "k", "weighting", "tta", "thresholds")


def benchmark_row(ev: Evaluation, notes: str = "") -> dict:
    """The results-table row of an evaluation (columns BENCHMARK_COLUMNS)."""
    cfg = RunConfig.from_dict(ev.config["run"])
    m = ev.metrics
    aug = cfg.aug
    return {"version": Path(ev.config["run_dir"]).name, "split": ev.split, "backbone": cfg.model.backbone,
            "loss": loss_label(cfg.loss), "embedding_dim": cfg.model.embed_dim, "img_size": aug.img_size,
            "augmentation": aug.augment + ("+hflip" if aug.hflip else ""),
            # .get: evaluations saved before a metric existed still make a row
            **{key: m.get(key, float("nan")) for key in ("recall@1", "recall@5", "mAP", "identity_balanced_mAP",
                                                          "vote_accuracy", "macro_f1", "coverage",
                                                          "accuracy_at_coverage")},
            "train_time_min": ev.config.get("train_time_min", float("nan")),
            "checkpoint_epoch": ev.config.get("checkpoint_epoch"),
            "inference_ms_per_image": m["inference_ms_per_image"],
            "notes": "; ".join(filter(None, [notes, UNTRAINED_BEST if ev.config.get("checkpoint_epoch") == 0 else ""])),
            "evaluation_id": evaluation_id(ev)}


def evaluation_id(ev: Evaluation) -> str:
    """12 hex digits naming the checkpoint, split and settings of an evaluation (EVALUATION_KEYS)."""
    key = {"split": ev.split, **{k: ev.config.get(k) for k in EVALUATION_KEYS}}
    index = ev.metrics.get("index") or {"exact": True}
    if not index["exact"]:  # an approximate search is another result; exact search keeps the ids rows always had
        key["index"] = [index["factory"], index.get("search_params")]
    if loo_rule(ev) == "group":  # so does leaving a query's group out; the photo rule is what old rows measured
        key["loo_rule"] = "group"
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def append_benchmark_row(results_csv: str | os.PathLike, row: dict, columns=BENCHMARK_COLUMNS,
                         replace_key: str | None = None) -> Path:
    """Append one row; a new file gets `columns` (+ the row's extra keys) as its header.

    An existing file with other columns is rewritten with the union of both (its columns first), never cut.
    replace_key: a row of the file with the same value in this column is replaced by `row` (the same evaluation
    run again), in its place; other rows are kept as they are.
    The whole new table is written atomically under a lock beside the file, so two runs adding rows at once both
    land and a reader never sees half a row.
    """
    path = Path(results_csv)
    with state_lock(path.with_name(f".{path.name}.lock"), f"adding a row to {path.name}"):
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        write_text(path, _with_row(old, row, columns, replace_key))
    return path


def _with_row(old: str, row: dict, columns, replace_key: str | None) -> str:
    """The CSV text `old` with `row` added as append_benchmark_row says; old rows keep their text where they can."""
    if not old.strip():
        header = list(columns) + [c for c in row if c not in columns]
        return pd.DataFrame([row], columns=header).to_csv(index=False)
    reader = csv.reader(io.StringIO(old))
    header = next(reader, [])
    at = header.index(replace_key) if replace_key in header else None
    same = at is not None and any(len(r) > at and r[at] == str(row[replace_key]) for r in reader)
    if set(row) <= set(header) and not same:
        return old + ("" if old.endswith("\n") else "\n") + pd.DataFrame([row], columns=header).to_csv(
            header=False, index=False)
    table = pd.read_csv(io.StringIO(old), dtype=str, keep_default_na=False)
    if same:
        hit = table[replace_key] == str(row[replace_key])
        after_first = hit.cumsum().astype(bool)
        table = pd.concat([table[~after_first], pd.DataFrame([row]), table[after_first & ~hit]], ignore_index=True)
    else:
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
    return table.to_csv(index=False)
