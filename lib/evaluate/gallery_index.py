"""A trained run's gallery index: its train split embedded and put in a Faiss index (exact, or approximate for a large
gallery: lib.retrieval.ann_index), saved in run_dir/index/ with what made it (checkpoint, TTA, transform, data, index
settings), so prediction reuses what evaluation built and never a stale one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import faiss
import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings
from lib.retrieval.ann_index import IndexSpec, build_search_index, resolve_factory, searchable
from lib.retrieval.faiss_index import faiss_device_for, load_index, save_index
from lib.train.trained_run import TrainedRun, embed_rows, rows_in_split, split_rows

INDEX_DIR = "index"  # inside the run folder
# what must match for a saved index to serve a search
MATCH_KEYS = ("checkpoint_sha256", "tta", "transform")
# what an index saved before index settings existed was: exact
SAVED_FLAT = {"spec": asdict(IndexSpec(index="flat")), "factory": "Flat", "chosen": "index='flat'", "exact": True}


@dataclass
class GalleryIndex:
    index: faiss.Index
    metadata: pd.DataFrame  # row i describes index row i
    info: dict              # which index, why, its search parameters and placement (build_search_index's info)


def build_gallery_index(run: TrainedRun, gallery: pd.DataFrame, emb: np.ndarray, info: dict, device: str,
                        spec: IndexSpec | None = None, save: bool = True) -> GalleryIndex:
    """Index over the gallery embeddings as `spec` asks (None: IndexSpec's defaults; info: what embed_rows says made
    them); saved in run_dir/index/."""
    index, index_info = build_search_index(emb, spec or IndexSpec(), faiss_device_for(device))
    if save:
        meta = {**{k: info[k] for k in (*MATCH_KEYS, "data_fingerprint")}, "checkpoint": run.checkpoint.name,
                "index": index_info}
        save_index(index, gallery, run.run_dir / INDEX_DIR, meta)
    return GalleryIndex(index, gallery, index_info)


def gallery_index(run: TrainedRun, settings: DeviceSettings, tta: bool = False, progress: bool = False,
                  index: str | None = None, nprobe: int | None = None, ef_search: int | None = None) -> GalleryIndex:
    """The run's gallery index: run_dir/index/ when it was saved for this checkpoint, TTA, transform and gallery and
    is the index asked for (notebook 03 saves it), else the train split embedded through the cache, indexed and
    saved there.

    index, nprobe, ef_search (lib.retrieval.ann_index.IndexSpec): None takes the saved index's settings (IndexSpec's
    defaults when none is saved). Other search parameters than the saved ones need no rebuild; another index does.
    """
    given = {k: v for k, v in (("index", index), ("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
    gallery = rows_in_split(split_rows(run), "train")
    folder = run.run_dir / INDEX_DIR
    spec = replace(IndexSpec(), **given)
    if (folder / "index.faiss").exists():
        saved_index, metadata, info = load_index(folder, "cpu")
        built = info.get("index", SAVED_FLAT)
        spec = replace(IndexSpec(**built["spec"]), **given)
        same = (tuple(info.get(k) for k in MATCH_KEYS) == (run.checkpoint_sha256, tta, repr(run.eval_tf))
                and metadata["path"].tolist() == gallery["path"].astype(str).tolist()
                and resolve_factory(spec.index, saved_index.ntotal, saved_index.d, spec.exact_below)[0]
                == built["factory"])
        if same:
            placed, how = searchable(saved_index, spec, faiss_device_for(settings.device))
            return GalleryIndex(placed, metadata, {**built, "spec": asdict(spec), **how})
    emb, info = embed_rows(run, gallery, settings, tta, progress=progress, desc="gallery")
    return build_gallery_index(run, gallery, emb, info, settings.device, spec)
