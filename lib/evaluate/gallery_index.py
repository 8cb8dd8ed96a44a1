"""A trained run's gallery index: its train split embedded and put in a Faiss index (exact, or approximate for a large
gallery: lib.retrieval.ann_index), saved in run_dir/index/ with what made it (checkpoint, TTA, transform, data, index
settings), so prediction reuses what evaluation built and never a stale one; photos enrolled since
(lib.evaluate.enrolled) are added to it when it is loaded."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import faiss
import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.core.state_io import read_manifest, run_state_lock
from lib.data.dataset import IndexDataset
from lib.evaluate.enrolled import current_embeddings, gallery_rows, load_enrolled
from lib.retrieval.ann_index import IndexSpec, build_search_index, resolve_factory, searchable
from lib.retrieval.embed import files_fingerprint
from lib.retrieval.faiss_index import INDEX_MANIFEST, faiss_device_for, load_index, save_index, unit_rows
from lib.train.trained_run import TrainedRun, embed_rows, rows_in_split, split_rows

INDEX_DIR = "index"  # inside the run folder
# what must match for a saved index to serve a search
MATCH_KEYS = ("checkpoint_sha256", "tta", "transform")
# what an index saved before index settings existed was: exact
SAVED_FLAT = {"spec": asdict(IndexSpec(index="flat")), "factory": "Flat", "chosen": "index='flat'", "exact": True}


@dataclass
class GalleryIndex:
    index: faiss.Index
    metadata: pd.DataFrame  # row i describes index row i: the train gallery's rows, then the enrolled photos'
    info: dict              # which index, why, its search parameters and placement (build_search_index's info),
                            # data_fingerprint of the train gallery, n_enrolled


def build_gallery_index(run: TrainedRun, gallery: pd.DataFrame, emb: np.ndarray, info: dict, device: str,
                        spec: IndexSpec | None = None, save: bool = True) -> GalleryIndex:
    """Index over the gallery embeddings as `spec` asks (None: IndexSpec's defaults; info: what embed_rows says made
    them); saved in run_dir/index/."""
    index, index_info = build_search_index(emb, spec or IndexSpec(), faiss_device_for(device))
    if save:
        meta = {**{k: info[k] for k in (*MATCH_KEYS, "data_fingerprint")}, "checkpoint": run.checkpoint.name,
                "index": index_info}
        with run_state_lock(run.run_dir, "saving the gallery index"):
            save_index(index, gallery, run.run_dir / INDEX_DIR, meta)
    return GalleryIndex(index, gallery, {**index_info, "data_fingerprint": info and info.get("data_fingerprint")})


def gallery_fingerprint(run: TrainedRun, gallery: pd.DataFrame) -> str:
    """The data fingerprint embed_rows gives these rows' embeddings (paths, sizes and times of the files read)."""
    d = run.settings.data
    return files_fingerprint(IndexDataset(gallery, d.data_dir, None, {}, d.cache_dir or None).paths)


def stale_reason(run: TrainedRun, tta: bool, gallery: pd.DataFrame, saved: faiss.Index, metadata: pd.DataFrame,
                 info: dict, spec: IndexSpec) -> str:
    """Why the saved index cannot serve this search ('' when it can)."""
    if tuple(info.get(k) for k in MATCH_KEYS) != (run.checkpoint_sha256, tta, repr(run.eval_tf)):
        return "it was built with another checkpoint, TTA or transform"
    if metadata["path"].tolist() != gallery["path"].astype(str).tolist():
        return "the train split's photos are not the ones it holds"
    if "data_fingerprint" in info and info["data_fingerprint"] != gallery_fingerprint(run, gallery):
        return "a gallery photo changed on disk since it was built (data fingerprint differs)"
    built = info.get("index", SAVED_FLAT)
    if resolve_factory(spec.index, saved.ntotal, saved.d, spec.exact_below)[0] != built["factory"]:
        return f"another index was asked for ({spec.index!r}, it is {built['factory']})"
    return ""


def _train_gallery(run: TrainedRun, settings: DeviceSettings, tta: bool, progress: bool, given: dict) -> GalleryIndex:
    """The train split's index: the saved one when it fits, else built (and saved), saying why."""
    gallery = rows_in_split(split_rows(run), "train")
    folder = run.run_dir / INDEX_DIR
    spec = replace(IndexSpec(), **given)
    if (folder / "index.faiss").exists():
        found, spec, why = _saved_gallery(run, tta, gallery, folder, settings, given)
        if found is not None:
            return found
        print(f"note: rebuilding the gallery index in {folder}: {why}")
    emb, info = embed_rows(run, gallery, settings, tta, progress=progress, desc="gallery")
    return build_gallery_index(run, gallery, emb, info, settings.device, spec)


def _saved_gallery(run: TrainedRun, tta: bool, gallery: pd.DataFrame, folder, settings: DeviceSettings,
                   given: dict) -> tuple[GalleryIndex | None, IndexSpec, str]:
    """(the saved index placed for search, or None; the settings to search or rebuild with: the saved ones unless
    given; why the saved index cannot serve)."""
    try:
        saved, metadata, info = load_index(folder, "cpu")
    except DataError as e:  # a save stopped half way, a torn or mismatched file: rebuilt with the settings it had
        info = read_manifest(folder, INDEX_MANIFEST) or {}
        return None, replace(IndexSpec(**info.get("index", SAVED_FLAT)["spec"]), **given), str(e)
    built = info.get("index", SAVED_FLAT)
    spec = replace(IndexSpec(**built["spec"]), **given)
    why = stale_reason(run, tta, gallery, saved, metadata, info, spec)
    if why:
        return None, spec, why
    placed, how = searchable(saved, spec, faiss_device_for(settings.device))
    return GalleryIndex(placed, metadata, {**built, "spec": asdict(spec), **how,
                                           "data_fingerprint": info.get("data_fingerprint")}), spec, ""


def gallery_index(run: TrainedRun, settings: DeviceSettings, tta: bool = False, progress: bool = False,
                  index: str | None = None, nprobe: int | None = None, ef_search: int | None = None) -> GalleryIndex:
    """The run's gallery index: run_dir/index/ when it was saved for this checkpoint, TTA, transform and gallery
    (same photos, unchanged on disk) and is the index asked for (notebook 03 saves it), else the train split
    embedded through the cache, indexed and saved there; then the enrolled photos added (lib.evaluate.enrolled).

    index, nprobe, ef_search (lib.retrieval.ann_index.IndexSpec): None takes the saved index's settings (IndexSpec's
    defaults when none is saved). Other search parameters than the saved ones need no rebuild; another index does.
    """
    given = {k: v for k, v in (("index", index), ("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
    found = _train_gallery(run, settings, tta, progress, given)
    enrolled = load_enrolled(run.run_dir)
    found.info["n_enrolled"] = len(enrolled)
    if not len(enrolled):
        return found
    found.index.add(unit_rows(current_embeddings(run, enrolled, settings, tta), "enrolled embeddings"))
    metadata = pd.concat([found.metadata.astype(str).assign(enrolled=""), gallery_rows(enrolled)], ignore_index=True)
    return GalleryIndex(found.index, metadata.fillna(""), found.info)
