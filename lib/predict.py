"""New photos + a trained run -> one table row per photo: predicted class, score, top-K neighbours, verdict.

A photo that cannot be read gets a row with its `error` and no prediction; the others go on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lib.data import IndexDataset
from lib.decide import load_thresholds
from lib.device import auto_settings
from lib.embed import extract_embeddings
from lib.errors import DataError
from lib.evaluate import TrainedRun, decide, embed_rows, load_trained, split_rows
from lib.images import IMAGE_EXTENSIONS, probe_image
from lib.retrieval import build_index, load_index, save_index, search

THRESHOLDS_FILE = Path("eval") / "val" / "thresholds.json"  # inside the run folder; written by notebook 03
COLUMNS = ("path", "pred", "score", "margin", "top1_distance", "verdict", "error", "neighbour_labels",
           "neighbour_paths", "neighbour_distances")


def _looks_like_image(path: Path) -> bool:
    """PIL recognises the content (header only; whether it decodes is checked later)."""
    try:
        with Image.open(path):
            return True
    except Exception:  # PIL raises many types for files that are not images
        return False


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
        return [str(p) for p in files if p.suffix.lower() in IMAGE_EXTENSIONS or _looks_like_image(p)]
    if not source.is_file():
        raise DataError(f"{source}: no such folder or file of photos")
    if source.suffix.lower() in IMAGE_EXTENSIONS or _looks_like_image(source):
        return [str(source)]
    lines = [line.strip() for line in source.read_text().splitlines()]
    return [str(source.parent / line) for line in lines if line and not line.startswith("#")]


def gallery_index(run: TrainedRun, settings, tta: bool = False, progress: bool = False):
    """(faiss index, gallery metadata): run_dir/index/ when it was saved for this checkpoint and TTA (notebook 03
    saves it), else the train split embedded through the cache and saved there."""
    folder = run.run_dir / "index"
    faiss_device = "cpu" if settings.device == "cpu" else "auto"
    if (folder / "index.faiss").exists():
        index, metadata, info = load_index(folder, faiss_device)
        if (info.get("checkpoint_sha256"), info.get("tta"), info.get("transform")) == (
                run.checkpoint_sha256, tta, repr(run.eval_tf)):
            return index, metadata
    rows = split_rows(run)
    gallery = rows.loc[rows["split"] == "train", [c for c in rows.columns if c != "split"]].reset_index(drop=True)
    emb, info = embed_rows(run, gallery, settings, tta, progress=progress, desc="gallery")
    index = build_index(emb, faiss_device)
    save_index(index, gallery, folder, {**{k: info[k] for k in ("checkpoint_sha256", "tta", "transform",
                                                                "data_fingerprint")}, "checkpoint": run.checkpoint.name})
    return index, gallery


def predict_photos(run_dir: str | os.PathLike, photos: list[str], k: int | None = None, tta: bool = False,
                   checkpoint: str = "best", weighting: str | None = None, device: str = "auto",
                   batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
    """One row per photo (COLUMNS; neighbour lists as JSON arrays, nearest first).

    The verdict uses run_dir/eval/val/thresholds.json when notebook 03 wrote it (and k, weighting default to the
    values the thresholds were chosen with, since a margin means something else under another vote); without it
    the verdict is empty. k falls back to 20, weighting to 'inverse'.
    """
    thresholds, chosen = None, {}
    if (Path(run_dir) / THRESHOLDS_FILE).exists():
        thresholds, chosen = load_thresholds(Path(run_dir) / THRESHOLDS_FILE)
        for name, value, saved in (("k", k, chosen.get("k")), ("weighting", weighting, chosen.get("weighting"))):
            if value is not None and saved is not None and value != saved:
                print(f"note: thresholds were chosen with {name}={saved}; {name}={value} makes their margin less apt")
    k = k or chosen.get("k") or 20
    weighting = weighting or chosen.get("weighting") or "inverse"

    run = load_trained(run_dir, checkpoint)
    settings = auto_settings(device=device)
    checks = [probe_image(p) for p in photos]
    out = pd.DataFrame({"path": photos, "error": [c.reason if not c.ok else "" for c in checks]})
    ok = out["error"] == ""
    for col in COLUMNS:
        if col not in out:
            out[col] = np.nan if col in ("score", "margin", "top1_distance") else ""
    if ok.any():
        index, gallery = gallery_index(run, settings, tta, progress)
        readable = pd.DataFrame({"path": out.loc[ok, "path"], "label": ""})
        dataset = IndexDataset(readable, "", run.eval_tf, {})
        emb = extract_embeddings(run.model.to(settings.device), dataset, settings, batch_size, progress, "photos", tta)
        distances, neighbours = search(index, emb, k)
        labels = gallery["label"].to_numpy()[neighbours]
        table, _ = decide(distances, labels, sorted(run.config["class_to_idx"]), weighting, thresholds)
        if thresholds is None:
            table["verdict"] = ""
        table["neighbour_labels"] = [json.dumps(row.tolist()) for row in labels]
        table["neighbour_paths"] = [json.dumps(row.tolist()) for row in gallery["path"].to_numpy()[neighbours]]
        table["neighbour_distances"] = [json.dumps(np.round(row, 6).tolist()) for row in distances.astype(float)]
        out.loc[ok, table.columns] = table.set_index(out.index[ok])
    return out[list(COLUMNS)]
