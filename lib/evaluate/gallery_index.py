"""A trained run's gallery index: its train split embedded and put in a Faiss index, saved in run_dir/index/ with what
made it (checkpoint, TTA, transform, data), so prediction reuses what evaluation built and never a stale one."""
from __future__ import annotations

import faiss
import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings
from lib.retrieval.faiss_index import build_index, faiss_device_for, load_index, save_index
from lib.train.trained_run import TrainedRun, embed_rows, split_part, split_rows

INDEX_DIR = "index"  # inside the run folder
# what must match for a saved index to serve a search
MATCH_KEYS = ("checkpoint_sha256", "tta", "transform")


def build_gallery_index(run: TrainedRun, gallery: pd.DataFrame, emb: np.ndarray, info: dict, device: str,
                        save: bool = True) -> faiss.Index:
    """Index over the gallery embeddings (info: what embed_rows says made them); saved in run_dir/index/."""
    index = build_index(emb, faiss_device_for(device))
    if save:
        meta = {**{k: info[k] for k in (*MATCH_KEYS, "data_fingerprint")}, "checkpoint": run.checkpoint.name}
        save_index(index, gallery, run.run_dir / INDEX_DIR, meta)
    return index


def gallery_index(run: TrainedRun, settings: DeviceSettings, tta: bool = False,
                  progress: bool = False) -> tuple[faiss.Index, pd.DataFrame]:
    """(faiss index, gallery metadata): run_dir/index/ when it was saved for this checkpoint, TTA and transform
    (notebook 03 saves it), else the train split embedded through the cache, indexed and saved there."""
    folder = run.run_dir / INDEX_DIR
    if (folder / "index.faiss").exists():
        index, metadata, info = load_index(folder, faiss_device_for(settings.device))
        if tuple(info.get(k) for k in MATCH_KEYS) == (run.checkpoint_sha256, tta, repr(run.eval_tf)):
            return index, metadata
    gallery = split_part(split_rows(run), "train")
    emb, info = embed_rows(run, gallery, settings, tta, progress=progress, desc="gallery")
    return build_gallery_index(run, gallery, emb, info, settings.device), gallery
