"""A trained run's gallery index: its train split embedded and put in a Faiss index (exact, or approximate for a large
gallery: lib.retrieval.ann_index), saved in run_dir/index/ with what made it (checkpoint, TTA, transform, data, index
settings), so prediction reuses what evaluation built and never a stale one; photos enrolled since
(lib.evaluate.enrolled_store) are added to it when it is loaded."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.core.state_io import file_sha256, read_manifest, run_state_lock, say_once
from lib.data.dataset import IndexDataset
from lib.evaluate.enrolled_store import enrolled_gallery
from lib.retrieval.ann_index import IndexSpec, build_search_index, resolve_factory, searchable
from lib.retrieval.embed import files_fingerprint
from lib.retrieval.faiss_index import (INDEX_MANIFEST, NO_NEIGHBOUR, faiss_device_for, load_index, save_index, search,
                                        unit_rows)
from lib.train.trained_run import TrainedRun, embed_rows, rows_in_split, split_rows

INDEX_DIR = "index"  # inside the run folder
# what must match for a saved index to serve a search
MATCH_KEYS = ("checkpoint_sha256", "tta", "transform")
# what an index saved before index settings existed was: exact
SAVED_FLAT = {"spec": asdict(IndexSpec(index="flat")), "factory": "Flat", "chosen": "index='flat'", "exact": True}
# squared L2 (unit vectors) under which an enrolled photo's nearest train photo is hashed, to see whether it is the
# same file: the two may have been decoded differently (a resize-cache copy), so not only an exact 0
SAME_PHOTO_SEARCH = 0.1


@dataclass
class GalleryIndex:
    index: faiss.Index
    metadata: pd.DataFrame  # row i describes index row i: the train gallery's rows, then the enrolled photos'
    info: dict              # which index, why, its search parameters and placement (build_search_index's info),
                            # data_fingerprint of the train gallery, n_enrolled and enrolment (enrolment_stamp)
    enrolled_emb: np.ndarray | None = None  # the enrolled rows' embeddings, as added after the train gallery's


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


def gallery_files(run: TrainedRun, gallery: pd.DataFrame) -> list[Path]:
    """The files embed_rows reads for these rows (resize-cache copies where up to date): their paths, sizes and
    times are the data fingerprint of the embeddings."""
    d = run.settings.data
    return IndexDataset(gallery, d.data_dir, None, {}, d.cache_dir or None).paths


def missing_files(run: TrainedRun, gallery: pd.DataFrame, files: list[Path] | None = None) -> list[Path]:
    """The gallery's files (`files`, when the caller has them: gallery_files) that are not on disk."""
    return [p for p in (gallery_files(run, gallery) if files is None else files) if not p.is_file()]


def stale_reason(run: TrainedRun, tta: bool, gallery: pd.DataFrame, saved: faiss.Index, metadata: pd.DataFrame,
                 info: dict, spec: IndexSpec) -> str:
    """Why the saved index cannot serve this search ('' when it can). The train photos are needed only to see that
    none changed on disk: with some of them gone (a run folder copied without its data) the saved index, matching
    in everything else, serves, saying so once."""
    if tuple(info.get(k) for k in MATCH_KEYS) != (run.checkpoint_sha256, tta, repr(run.eval_tf)):
        return "it was built with another checkpoint, TTA or transform"
    if metadata["path"].tolist() != gallery["path"].astype(str).tolist():
        return "the train split's photos are not the ones it holds"
    if other := other_index(spec, saved, info):
        return f"another index was asked for ({spec.index!r}, it is {other})"
    if "data_fingerprint" in info:
        files = gallery_files(run, gallery)
        missing = missing_files(run, gallery, files)
        if missing:
            say_once(f"gallery-missing:{run.run_dir}", f"note: {len(missing)} training photos are not on disk "
                     f"(first: {missing[0]}); predicting from the saved index")
        elif info["data_fingerprint"] != files_fingerprint(files):
            return "a gallery photo changed on disk since it was built (data fingerprint differs)"
    return ""


def saved_spec(info: dict, given: dict) -> IndexSpec:
    """The settings a saved index was built with (its manifest's; flat for one saved before they were recorded), with
    the fields a search gives in `given` in their place."""
    return replace(IndexSpec(**info.get("index", SAVED_FLAT)["spec"]), **given)


def other_index(spec: IndexSpec, saved: faiss.Index, info: dict) -> str:
    """The saved index's factory where `spec` asks for another kind of index ('' where it does not): the setting it
    was built with (an 'auto' that measured its choice) or one that resolves to the same factory."""
    built = info.get("index", SAVED_FLAT)
    if spec.index.strip().lower() == str(built["spec"]["index"]).strip().lower():
        return ""
    return "" if resolve_factory(spec.index, saved.ntotal, saved.d, spec.exact_below)[0] == built["factory"] \
        else built["factory"]


def _needs_photos(run: TrainedRun, gallery: pd.DataFrame, why: str) -> None:
    """Refuse, naming the first missing photo, to build the train gallery's index without all of its photos."""
    missing = missing_files(run, gallery)
    if missing:
        raise DataError(f"the gallery index must be built ({why}), which reads the train split's photos, but "
                        f"{len(missing)} are not on disk (first: {missing[0]}); put them back under "
                        f"{run.settings.data.data_dir}, or predict with the checkpoint and TTA the saved index was "
                        "built with")


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
    _needs_photos(run, gallery, why if (folder / "index.faiss").exists() else "none is saved")
    emb, info = embed_rows(run, gallery, settings, tta, progress=progress, desc="gallery")
    return build_gallery_index(run, gallery, emb, info, settings.device, spec)


def _saved_gallery(run: TrainedRun, tta: bool, gallery: pd.DataFrame, folder, settings: DeviceSettings,
                   given: dict) -> tuple[GalleryIndex | None, IndexSpec, str]:
    """(the saved index placed for search, or None; the settings to search or rebuild with: the saved ones unless
    given; why the saved index cannot serve)."""
    try:
        saved, metadata, info = load_index(folder, "cpu")
    except DataError as e:  # a save stopped half way, a torn or mismatched file: rebuilt with the settings it had
        return None, saved_spec(read_manifest(folder, INDEX_MANIFEST) or {}, given), str(e)
    spec = saved_spec(info, given)
    why = stale_reason(run, tta, gallery, saved, metadata, info, spec)
    if why:
        return None, spec, why
    return placed_gallery(saved, metadata, info, spec, settings), spec, ""


def placed_gallery(saved: faiss.Index, metadata: pd.DataFrame, info: dict, spec: IndexSpec,
                   settings: DeviceSettings) -> GalleryIndex:
    """A loaded index (load_index's index, metadata and info) with spec's search parameters, placed for search."""
    built = info.get("index", SAVED_FLAT)
    placed, how = searchable(saved, spec, faiss_device_for(settings.device), built)
    return GalleryIndex(placed, metadata, {**built, "spec": asdict(spec), **how,
                                           "data_fingerprint": info.get("data_fingerprint")})


def index_settings(index: str | None = None, nprobe: int | None = None, ef_search: int | None = None,
                   recall: float | None = None, k: int | None = None) -> dict:
    """The IndexSpec fields a search asks for (None: the saved index's); a recall target re-tunes the search
    parameters not given, for k neighbours."""
    given = {key: v for key, v in (("index", index), ("nprobe", nprobe), ("ef_search", ef_search), ("recall", recall))
             if v is not None}
    if recall is not None:  # tuned, where not given: the saved ones were for another target
        given = {"nprobe": None, "ef_search": None, **({"k": k} if k else {}), **given}
    return given


def gallery_index(run: TrainedRun, settings: DeviceSettings, tta: bool = False, progress: bool = False,
                  search: dict | None = None) -> GalleryIndex:
    """The run's gallery index: run_dir/index/ when it was saved for this checkpoint, TTA, transform and gallery
    (same photos, unchanged on disk) and is the index asked for (notebook 03 saves it), else the train split
    embedded through the cache, indexed and saved there; then the enrolled photos added (lib.evaluate.enrolled_store).

    search: the IndexSpec fields asked for (index_settings: index, nprobe, ef_search, recall, k); those not given
    are the saved index's (IndexSpec's defaults when none is saved). A recall target re-tunes the saved index's
    search parameters for k neighbours (those given stay). Other search parameters than the saved ones need no
    rebuild; another index does.
    """
    found = _train_gallery(run, settings, tta, progress, search or {})
    return with_enrolled(run, found, settings, tta)


def with_enrolled(run, found: GalleryIndex, settings: DeviceSettings, tta: bool) -> GalleryIndex:
    """The train gallery `found` with the run's enrolled photos added (lib.evaluate.enrolled_store); `run`: a TrainedRun,
    or an export (lib.evaluate.exported), which carries its enrolment."""
    rows, emb = enrolled_gallery(run, settings, tta)
    found.info.update(n_enrolled=0, enrolment=enrolment_stamp([]))
    if not len(rows):
        return found
    emb = unit_rows(emb, "enrolled embeddings")
    keep = ~enrolled_in_train(run, found, rows, emb)
    found.index.add(emb[keep])
    found.info.update(n_enrolled=int(keep.sum()), enrolment=enrolment_stamp(rows["enrolled"][keep]))
    metadata = pd.concat([found.metadata.astype(str).assign(enrolled=""), rows[keep]], ignore_index=True)
    return GalleryIndex(found.index, metadata.fillna(""), found.info, emb[keep])


def enrolment_stamp(ids) -> dict:
    """What records which enrolled photos a gallery held (thresholds.json, the gallery index's info): their count and
    a hash of their ids, so that a gallery grown or changed since is noticed."""
    ids = sorted(str(i) for i in ids)
    return {"n_enrolled": len(ids), "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


def enrolled_in_train(run: TrainedRun, train: GalleryIndex, rows: pd.DataFrame, emb: np.ndarray) -> np.ndarray:
    """True for each enrolled photo that is also a photo of the train gallery (the same absolute path, or the same
    file content: its nearest train photo, when near, hashed; an enrolled photo's id is the start of its sha256), which
    the gallery must count once, not twice; said once. `rows`: enrolled_gallery's rows. Enrolment refuses a photo
    already in train, so this is one added to the training data since."""
    root = Path(run.settings.data.data_dir).resolve()
    files = [root / p for p in train.metadata["path"]]
    at = {str(f) for f in files}
    distances, nearest = search(train.index, emb, 1)
    same = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows.itertuples()):
        j = int(nearest[i, 0])
        same[i] = row.path in at or (j != NO_NEIGHBOUR and distances[i, 0] <= SAME_PHOTO_SEARCH and files[j].is_file()
                                     and file_sha256(files[j]).startswith(row.enrolled))
    if same.any():
        first = rows[same].iloc[0]
        say_once(f"enrolled-in-train:{run.run_dir}:{same.sum()}",
                 f"note: {same.sum()} enrolled photo(s) are also in the train split (e.g. {first['path']}, id "
                 f"{first['enrolled']}), counted once; photo-enroll {run.run_dir} --remove {first['enrolled']} takes "
                 "one out")
    return same
