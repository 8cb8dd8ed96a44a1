"""Predicting from an export folder (lib.train.export): model.onnx run by ONNX Runtime, the photos preprocessed as
its config says, searched in the gallery index it carries (or a run's saved index/), with the thresholds it carries;
no checkpoint, no training data and no PyTorch model are needed. Every file is checked against the export's
manifest before it is trusted, and the gallery against the model that made it.

    photo-predict --export EXPORT_DIR PHOTOS --out predictions.csv [--gallery RUN_DIR/index]
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from lib.core.device import DeviceSettings, auto_settings
from lib.core.errors import DataError
from lib.core.state_io import manifest_fault, read_bytes_hashed, read_manifest
from lib.evaluate.gallery_index import (INDEX_DIR, GalleryIndex, index_settings, other_index, placed_gallery,
                                        saved_spec, with_enrolled)
from lib.evaluate.enrolled_store import CACHE_DIR
from lib.evaluate.predict import PredictSettings, Predictor, predict_with
from lib.retrieval.faiss_index import INDEX_MANIFEST, load_index
from lib.retrieval.onnx_engine import OnnxForward
from lib.train.config import RunConfig
from lib.train.export import CONFIG, MANIFEST, ONNX, PREPROCESSING_KEYS, eval_transform

ENROLLED_CACHE = CACHE_DIR.name  # enrolled embeddings made again at prediction (a cache, written beside the export's)
AGAIN = "export the run again: python -m lib.train.export RUN_DIR {folder} --overwrite"


@dataclass
class ExportedModel:
    """An export loaded for prediction; its fields are those of lib.train.trained_run.TrainedRun that embedding
    photos and adding enrolled photos read."""
    run_dir: Path      # the export folder (named as a run folder's, since it mirrors its index/ and eval/)
    config: dict       # config.json
    model: OnnxForward
    eval_tf: object    # rebuilt from config["preprocessing"]
    checkpoint_sha256: str

    @property
    def settings(self) -> RunConfig:
        return RunConfig.from_dict(self.config)


def _again(folder: Path) -> str:
    return AGAIN.format(folder=folder)


def check_export(folder: str | os.PathLike) -> dict:
    """The export's manifest, once every file it names is there whole and unchanged; else a DataError naming the
    file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such export folder (python -m lib.train.export RUN_DIR {folder} makes one)")
    manifest = read_manifest(folder, MANIFEST)
    if manifest is None:
        raise DataError(f"{folder / MANIFEST} is missing or unreadable: the export is incomplete (stopped half way) or "
                        f"older than manifests; {_again(folder)}")
    if ONNX not in manifest.get("files", {}):
        raise DataError(f"{folder / ONNX}: this export has no ONNX model (made with --no-onnx); {_again(folder)}")
    name, what = manifest_fault(folder, manifest)
    if what:
        name = name or MANIFEST
        raise DataError(f"{folder / name}: {what} ({MANIFEST} records each file's size and sha256); "
                        f"{_again(folder)}")
    # enrolled.npz and the like are read when present: one added to the export later is not part of what was checked
    unlisted = [p for p in sorted((folder / INDEX_DIR).rglob("*")) if p.is_file() and not p.name.startswith(".")
                and ENROLLED_CACHE not in p.relative_to(folder).parts
                and str(p.relative_to(folder)) not in manifest["files"]]
    if unlisted:
        raise DataError(f"{unlisted[0]}: not part of the export (not in {folder / MANIFEST}); remove it, or "
                        f"{_again(folder)}")
    return manifest


def load_export(folder: str | os.PathLike, threads: int | None = None) -> ExportedModel:
    """The checked export (check_export), its model.onnx in an ONNX Runtime session and its eval transform."""
    folder = Path(folder)
    manifest = check_export(folder)
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    prep = config.get("preprocessing")
    lacking = [k for k in PREPROCESSING_KEYS if k not in (prep or {})]
    if lacking:
        raise DataError(f"{folder / CONFIG}: no preprocessing ({', '.join(lacking)} missing): written by an older "
                        f"export; {_again(folder)}")
    try:
        eval_tf = eval_transform(prep)
    except (ValueError, TypeError, IndexError) as e:
        raise DataError(f"{folder / CONFIG}: its preprocessing cannot be followed ({e}); {_again(folder)}") from None
    graph, sha = read_bytes_hashed(folder / ONNX)
    if sha != manifest["files"][ONNX]["sha256"]:  # replaced since check_export hashed it
        raise DataError(f"{folder / ONNX}: changed while it was read; run again")
    try:
        model = OnnxForward.from_onnx(graph, threads)
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types for a bad graph)
        raise DataError(f"{folder / ONNX}: ONNX Runtime cannot load it ({type(e).__name__}); {_again(folder)}") from None
    return ExportedModel(folder, config, model, eval_tf, config["checkpoint_sha256"])


def export_gallery(export: ExportedModel, settings: DeviceSettings, cfg: PredictSettings,
                   folder: str | os.PathLike | None = None) -> GalleryIndex:
    """The gallery index in `folder` (None: the one the export carries), refused unless it was built by the export's
    model, transform and TTA; then the export's enrolled photos added. Another index type than the saved one is
    refused (building one reads the training photos); other search parameters and a recall target are applied."""
    if folder is None and not export.config.get("gallery"):
        raise DataError(f"{export.run_dir / CONFIG}: the export carries no gallery index "
                        f"({export.config.get('no_gallery') or 'none was saved'}); pass --gallery RUN_DIR/index, "
                        f"or {_again(export.run_dir)} once notebook 03 has saved it")
    folder = Path(folder) if folder is not None else export.run_dir / INDEX_DIR
    saved, metadata, info = load_index(folder, "cpu")
    source = folder / INDEX_MANIFEST
    if info.get("checkpoint_sha256") != export.checkpoint_sha256 or info.get("transform") != \
            export.config["preprocessing"].get("transform"):
        raise DataError(f"{source}: built by another model than {export.run_dir / CONFIG} (checkpoint sha256 "
                        f"{str(info.get('checkpoint_sha256'))[:12]} vs {export.checkpoint_sha256[:12]}, or another "
                        "eval transform); use the gallery index of the run and checkpoint this export was made from")
    if bool(info.get("tta")) != cfg.tta:
        raise DataError(f"{source}: the gallery was embedded with flip TTA {'on' if info.get('tta') else 'off'}; "
                        f"predict {'with' if info.get('tta') else 'without'} --tta")
    spec = saved_spec(info, index_settings(cfg.index, cfg.nprobe, cfg.ef_search, cfg.recall, cfg.k))
    if other := other_index(spec, saved, info):
        raise DataError(f"{source}: holds a {other} index; another (--index {cfg.index}) is built from the training "
                        "photos: predict from the run folder for that")
    return with_enrolled(export, placed_gallery(saved, metadata, info, spec, settings), settings, cfg.tta)


def exported_index_report(gallery: GalleryIndex) -> dict:
    if not gallery.info["exact"]:
        print("note: the approximate index's recall against exact search is not measured: an export carries no "
              "training photos")
    return dict(gallery.info)


def predict_export(export_dir: str | os.PathLike, photos: list[str], settings: PredictSettings | None = None,
                   gallery: str | os.PathLike | None = None, **overrides):
    """predict_photos' table from an export folder instead of a run folder: the same rows, thresholds and checks
    (PredictSettings; `checkpoint` and `device` do not apply: the export holds one model, run on the CPU). gallery:
    a saved gallery index folder (a run's index/) instead of the one the export carries."""
    cfg = replace(settings or PredictSettings(), **overrides)
    export = load_export(export_dir)
    device = auto_settings(device="cpu")
    predictor = Predictor(export.run_dir, export, export.checkpoint_sha256, export.config["class_to_idx"],
                          export.config.get("min_size"),
                          lambda dev, c: export_gallery(export, dev, c, gallery),
                          lambda found, emb, dev, c: exported_index_report(found))
    return predict_with(predictor, photos, cfg, device)

