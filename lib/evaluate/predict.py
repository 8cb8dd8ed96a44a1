"""New photos + a trained run -> one table row per photo: predicted class, score, top-K neighbours, verdict.

A photo that cannot be read gets a row with its `error` and no prediction; the others go on. A photo smaller than
the run's training photos could be (notebook 01's min_size) is predicted with a `note` saying so, or refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.device import auto_settings
from lib.core.errors import DataError
from lib.data.dataset import IndexDataset
from lib.data.images import looks_like_image, probe_image
from lib.data.splits import load_split_index
from lib.evaluate.gallery_index import gallery_index
from lib.retrieval.ann_index import approximation_recall, describe
from lib.retrieval.decide import DEFAULT_K, DEFAULT_WEIGHTING, decisions, load_thresholds
from lib.retrieval.embed import EMBED_BATCH_SIZE, extract_embeddings
from lib.retrieval.faiss_index import NO_NEIGHBOUR, fill_padding, search
from lib.train.trained_run import embed_rows, load_trained, rows_in_split, split_rows

THRESHOLDS_FILE = Path("eval") / "val" / "thresholds.json"  # inside the run folder; written by notebook 03
COLUMNS = ("path", "pred", "score", "margin", "top1_distance", "verdict", "error", "note", "neighbour_labels",
           "neighbour_paths", "neighbour_distances")
SMALL = ("note", "refuse")  # what a photo below the run's min_size gets


def list_photos(source: str | os.PathLike) -> list[str]:
    """Photos named by `source`: a folder (searched recursively; hidden entries skipped), a text file with one path
    a line (blank lines and '#' comments skipped; relative paths are relative to the list's folder), or one image.

    In a folder, a file with an image extension is always listed (so a corrupt one is reported, not lost); any
    other file is listed when its content is an image.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if (p.is_file() or p.is_symlink())  # a broken link is reported
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        return [str(p) for p in files if looks_like_image(p)]
    if not source.is_file():
        raise DataError(f"{source}: no such folder or file of photos")
    if looks_like_image(source):
        return [str(source)]
    lines = [line.strip() for line in source.read_text().splitlines()]
    return [str(source.parent / line) for line in lines if line and not line.startswith("#")]


def trained_min_size(run) -> int | None:
    """The smallest photo side the run trained on: notebook 01's min_size from the split report, or, for splits made
    before it was recorded, the shorter side of the smallest training photo; None when the split files are gone."""
    try:
        index, splits = load_split_index(run.settings.data.splits_dir)
    except DataError:
        return None
    if splits.report.get("min_size"):
        return int(splits.report["min_size"])
    train = index[index["split"] == "train"]
    if train.empty or not {"width", "height"} <= set(train.columns):
        return None
    return int(np.minimum(train["width"], train["height"]).min())


def predict_photos(run_dir: str | os.PathLike, photos: list[str], k: int | None = None, tta: bool = False,
                   checkpoint: str = "best", weighting: str | None = None, device: str = "auto",
                   batch_size: int = EMBED_BATCH_SIZE, progress: bool = False, small: str = "note",
                   index: str | None = None, nprobe: int | None = None, ef_search: int | None = None) -> pd.DataFrame:
    """One row per photo (COLUMNS; neighbour lists as JSON arrays, nearest first).

    A photo whose shorter side is below the run's min_size (trained_min_size) is predicted with a `note` saying so
    (small="note"), or gets an `error` and no prediction (small="refuse"): the model never saw photos that small.

    The verdict uses run_dir/eval/val/thresholds.json when notebook 03 wrote it (and k, weighting default to the
    values the thresholds were chosen with, since a margin means something else under another vote); without it
    the verdict is empty. k falls back to DEFAULT_K, weighting to DEFAULT_WEIGHTING (lib.retrieval.decide).

    index, nprobe, ef_search: the gallery's Faiss index (lib.evaluate.gallery_index; None: as notebook 03 saved it).
    An approximate index's recall@k against exact search on (a sample of) these photos is printed and kept in
    the table's attrs['index'].
    """
    thresholds, chosen = None, {}
    if (Path(run_dir) / THRESHOLDS_FILE).exists():
        thresholds, chosen = load_thresholds(Path(run_dir) / THRESHOLDS_FILE)
        for name, value, saved in (("k", k, chosen.get("k")), ("weighting", weighting, chosen.get("weighting"))):
            if value is not None and saved is not None and value != saved:
                print(f"note: thresholds were chosen with {name}={saved}; {name}={value} makes their margin less apt")
    k = k or chosen.get("k") or DEFAULT_K
    weighting = weighting or chosen.get("weighting") or DEFAULT_WEIGHTING

    if small not in SMALL:
        raise ValueError(f"small={small!r}; valid: {', '.join(SMALL)}")
    run = load_trained(run_dir, checkpoint)
    settings = auto_settings(device=device)
    checks = [probe_image(p) for p in photos]
    out = pd.DataFrame({"path": photos, "error": [c.reason if not c.ok else "" for c in checks], "note": ""})
    floor = trained_min_size(run)
    too_small = np.array([c.ok and floor is not None and min(c.width, c.height) < floor for c in checks], dtype=bool)
    sizes = [f"{c.width}x{c.height}" for c in checks]
    for i in np.flatnonzero(too_small):
        if small == "refuse":
            out.loc[i, "error"] = f"too small: {sizes[i]} < the run's min_size {floor} (small='note' predicts it)"
        else:
            out.loc[i, "note"] = f"{sizes[i]}: below the run's min_size {floor}, smaller than any training photo"
    ok = out["error"] == ""
    for col in COLUMNS:
        if col not in out:
            out[col] = np.nan if col in ("score", "margin", "top1_distance") else ""
    if ok.any():
        gallery = gallery_index(run, settings, tta, progress, index, nprobe, ef_search)
        readable = pd.DataFrame({"path": out.loc[ok, "path"], "label": ""})
        dataset = IndexDataset(readable, "", run.eval_tf, {})
        emb = extract_embeddings(run.model.to(settings.device), dataset, settings, batch_size, progress, "photos", tta)
        distances, neighbours = search(gallery.index, emb, k)
        report = dict(gallery.info)
        if not report["exact"]:
            g_emb, _ = embed_rows(run, rows_in_split(split_rows(run), "train"), settings, tta, batch_size, progress,
                                  desc="gallery")
            spec = report["spec"]
            report["recall_vs_exact"] = approximation_recall(gallery.index, g_emb, emb, k, spec["recall_sample"],
                                                             spec["seed"])
            print(describe(report))
        out.attrs["index"] = report
        labels = gallery.metadata["label"].to_numpy()[fill_padding(neighbours)]
        table, _ = decisions(distances, labels, sorted(run.config["class_to_idx"]), weighting, thresholds)
        if thresholds is None:
            table["verdict"] = ""
        # an approximate index may find fewer than k: its padding is left out of the lists
        found = neighbours != NO_NEIGHBOUR
        table["neighbour_labels"] = [json.dumps(row[f].tolist()) for row, f in zip(labels, found)]
        table["neighbour_paths"] = [json.dumps(row[f].tolist()) for row, f in
                                    zip(gallery.metadata["path"].to_numpy()[neighbours], found)]
        table["neighbour_distances"] = [json.dumps(np.round(row[f], 6).tolist())
                                        for row, f in zip(distances.astype(float), found)]
        out.loc[ok, table.columns] = table.set_index(out.index[ok])
    return out[list(COLUMNS)]
