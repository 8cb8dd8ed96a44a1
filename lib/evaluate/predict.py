"""New photos + a trained run -> one table row per photo: predicted class, score, top-K neighbours, verdict.

A photo that cannot be read gets a row with its `error` and no prediction; the others go on. A photo smaller than
the run's training photos could be (notebook 01's min_size) is predicted with a `note` saying so, or refused.
The gallery is the run's train split plus the photos enrolled since (lib.evaluate.enroll_cli).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings, auto_settings
from lib.data.images import probe_image
from lib.evaluate.calibrate import check_enrolment, check_provenance
from lib.evaluate.gallery_index import GalleryIndex, gallery_index, index_settings, missing_files
from lib.evaluate.photos import embed_photos
from lib.retrieval.ann_index import approximation_recall, describe
from lib.retrieval.decide import DEFAULT_K, DEFAULT_WEIGHTING, Thresholds, decisions, load_thresholds
from lib.retrieval.embed import EMBED_BATCH_SIZE
from lib.retrieval.faiss_index import NO_NEIGHBOUR, fill_padding, search
from lib.train.trained_run import TrainedRun, embed_rows, load_trained, rows_in_split, split_rows, trained_min_size

THRESHOLDS_FILE = Path("eval") / "val" / "thresholds.json"  # inside the run folder; written by notebook 03
COLUMNS = ("path", "pred", "score", "margin", "top1_distance", "verdict", "error", "note", "neighbour_labels",
           "neighbour_paths", "neighbour_distances")
SMALL = ("note", "refuse")  # what a photo below the run's min_size gets


@dataclass
class PredictSettings:
    """How predict_photos predicts (photo-predict's options of the same names).

    k, weighting: None takes the values the thresholds were chosen with, else DEFAULT_K / DEFAULT_WEIGHTING.
    small: what a photo below the run's min_size gets ('note': predicted with a note; 'refuse': an error).
    index, nprobe, ef_search, recall: the gallery's Faiss index (lib.evaluate.gallery_index; None: as notebook 03
    saved it; a recall re-tunes the saved index's search parameters for k neighbours without rebuilding it).
    allow_mismatch: apply thresholds chosen under other settings (lib.evaluate.calibrate.check_provenance), warning.
    strict_thresholds: refuse thresholds calibrated on a gallery with other enrolled photos than it holds now
    (lib.evaluate.calibrate.check_enrolment), instead of warning.
    """
    k: int | None = None
    weighting: str | None = None
    tta: bool = False
    checkpoint: str = "best"
    device: str = "auto"
    batch_size: int = EMBED_BATCH_SIZE
    progress: bool = False
    small: str = "note"
    index: str | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    recall: float | None = None
    allow_mismatch: bool = False
    strict_thresholds: bool = False

    def __post_init__(self):
        if self.small not in SMALL:
            raise ValueError(f"small={self.small!r}; valid: {', '.join(SMALL)}")


def run_thresholds(run_dir, cfg: PredictSettings) -> tuple[Thresholds | None, dict, PredictSettings]:
    """(thresholds notebook 03 saved or None, what they were chosen with, cfg with k and weighting resolved)."""
    chosen, thresholds = {}, None
    if (Path(run_dir) / THRESHOLDS_FILE).exists():
        thresholds, chosen = load_thresholds(Path(run_dir) / THRESHOLDS_FILE)
    k = cfg.k or chosen.get("k") or DEFAULT_K
    weighting = cfg.weighting or chosen.get("weighting") or DEFAULT_WEIGHTING
    return thresholds, chosen, replace(cfg, k=k, weighting=weighting)


def checked_photos(floor: int | None, photos: list[str], small: str) -> pd.DataFrame:
    """The COLUMNS table with `error` for each unreadable (or, small='refuse', too small: below `floor`, the run's
    min_size) photo, `note` for a small one, and the prediction columns empty."""
    checks = [probe_image(p) for p in photos]
    out = pd.DataFrame({"path": photos, "error": [c.reason if not c.ok else "" for c in checks], "note": ""})
    for i, c in enumerate(checks):
        if not c.ok or floor is None or min(c.width, c.height) >= floor:
            continue
        size = f"{c.width}x{c.height}"
        if small == "refuse":
            out.loc[i, "error"] = f"too small: {size} < the run's min_size {floor} (small='note' predicts it)"
        else:
            out.loc[i, "note"] = f"{size}: below the run's min_size {floor}, smaller than any training photo"
    for col in COLUMNS:
        if col not in out:
            out[col] = np.nan if col in ("score", "margin", "top1_distance") else ""
    return out


def index_report(run: TrainedRun, gallery: GalleryIndex, emb: np.ndarray, settings: DeviceSettings,
                 cfg: PredictSettings) -> dict:
    """The gallery index's info; for an approximate one, its recall@k against exact search on (a sample of) the
    photos, printed."""
    report = dict(gallery.info)
    if report["exact"]:
        return report
    train = rows_in_split(split_rows(run), "train")
    if missing_files(run, train):  # predicting from the saved index alone: exact search has nothing to run on
        print("note: the approximate index's recall against exact search is not measured: training photos are missing")
        return report
    g_emb, _ = embed_rows(run, train, settings, cfg.tta, cfg.batch_size, cfg.progress, desc="gallery")
    if gallery.enrolled_emb is not None:  # the index holds the enrolled photos after the train split
        g_emb = np.concatenate([g_emb, gallery.enrolled_emb])
    spec = report["spec"]
    report["recall_vs_exact"] = approximation_recall(gallery.index, g_emb, emb, cfg.k, spec["recall_sample"],
                                                     spec["seed"])
    print(describe(report))
    return report


def neighbour_lists(gallery: GalleryIndex, distances, neighbours) -> dict[str, list[str]]:
    """Each photo's neighbours' labels, paths and distances as JSON lists, nearest first; an approximate index may
    find fewer than k, and its padding is left out."""
    found = neighbours != NO_NEIGHBOUR
    rows = fill_padding(neighbours)
    as_lists = lambda values: [json.dumps(row[f].tolist()) for row, f in zip(values, found)]  # noqa: E731
    return {"neighbour_labels": as_lists(gallery.metadata["label"].to_numpy()[rows]),
            "neighbour_paths": as_lists(gallery.metadata["path"].to_numpy()[rows]),
            "neighbour_distances": as_lists(np.round(distances.astype(float), 6))}


@dataclass
class Predictor:
    """What predicting needs of a trained model, whichever form it comes in: a run folder and its checkpoint
    (predict_photos), or an export (lib.evaluate.exported)."""
    folder: Path                # holds THRESHOLDS_FILE (and notebook 03's other choices)
    model: object               # embed_photos' `run`: .model and .eval_tf
    checkpoint_sha256: str
    class_to_idx: dict
    min_size: int | None        # checked_photos' floor
    gallery: Callable[[DeviceSettings, PredictSettings], GalleryIndex]
    index_report: Callable[[GalleryIndex, np.ndarray, DeviceSettings, PredictSettings], dict]


def predict_photos(run_dir: str | os.PathLike, photos: list[str], settings: PredictSettings | None = None,
                   **overrides) -> pd.DataFrame:
    """One row per photo (COLUMNS; neighbour lists as JSON arrays, nearest first). PredictSettings says how; keyword
    `overrides` replace its fields (predict_photos(run_dir, photos, k=5, device="cpu")).

    The verdict uses run_dir/eval/val/thresholds.json when notebook 03 wrote it, and only when it was chosen under
    this prediction's settings (lib.evaluate.calibrate.check_provenance: protocol, context rule, TTA, k, weighting,
    checkpoint hash, train gallery fingerprint; a mismatch is refused unless allow_mismatch; a gallery whose enrolled
    photos changed since is warned about, or refused with strict_thresholds); without it the verdict is empty. An
    approximate index's recall@k against exact search on (a sample of) these photos is printed and kept in the
    table's attrs['index'].
    """
    cfg = replace(settings or PredictSettings(), **overrides)
    run = load_trained(run_dir, cfg.checkpoint)
    predictor = Predictor(
        Path(run_dir), run, run.checkpoint_sha256, run.config["class_to_idx"], trained_min_size(run),
        lambda device, c: gallery_index(run, device, c.tta, c.progress,
                                        index_settings(c.index, c.nprobe, c.ef_search, c.recall, c.k)),
        lambda gallery, emb, device, c: index_report(run, gallery, emb, device, c))
    return predict_with(predictor, photos, cfg, auto_settings(device=cfg.device))


def predict_with(predictor: Predictor, photos: list[str], settings: PredictSettings,
                 device: DeviceSettings) -> pd.DataFrame:
    """predict_photos' table from a Predictor."""
    thresholds, chosen, cfg = run_thresholds(predictor.folder, settings)
    out = checked_photos(predictor.min_size, photos, cfg.small)
    ok = out["error"] == ""
    if not ok.any():
        return out[list(COLUMNS)]
    source = predictor.folder / THRESHOLDS_FILE
    if thresholds is not None:  # what can be checked before the gallery is loaded (or rebuilt)
        check_provenance(chosen, {"protocol": "gallery", "restrict_to_context": False, "tta": cfg.tta, "k": cfg.k,
                                  "weighting": cfg.weighting, "checkpoint_sha256": predictor.checkpoint_sha256},
                         source, cfg.allow_mismatch)
    gallery = predictor.gallery(device, cfg)
    if thresholds is not None:
        check_provenance(chosen, {"gallery_fingerprint": gallery.info.get("data_fingerprint")}, source,
                         cfg.allow_mismatch)
        check_enrolment(chosen, gallery.info["enrolment"], source, cfg.strict_thresholds)
    emb = embed_photos(predictor.model, out.loc[ok, "path"].tolist(), device, cfg.tta, cfg.batch_size, cfg.progress)
    distances, neighbours = search(gallery.index, emb, cfg.k)
    out.attrs["index"] = predictor.index_report(gallery, emb, device, cfg)
    # the readable photos' embeddings (rows of error == "", in order) and their checkpoint: what --group-new clusters
    out.attrs.update(embeddings=emb, checkpoint_sha256=predictor.checkpoint_sha256)
    classes = sorted(set(predictor.class_to_idx) | set(gallery.metadata["label"]))
    table, _ = decisions(distances, gallery.metadata["label"].to_numpy()[fill_padding(neighbours)], classes,
                         cfg.weighting, thresholds)
    if thresholds is None:
        table["verdict"] = ""
    table = table.assign(**neighbour_lists(gallery, distances, neighbours))
    out.loc[ok, table.columns] = table.set_index(out.index[ok])
    return out[list(COLUMNS)]
