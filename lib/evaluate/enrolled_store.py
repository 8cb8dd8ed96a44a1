"""Photos enrolled into a run's gallery after training (lib.evaluate.enroll_cli, `photo-enroll`): one file,
run_dir/index/enrolled.npz, holding their table and each photo's embedding as made when it was enrolled (with what
made it: checkpoint, TTA, transform), replaced whole (lib.core.state_io) at every change, under the run's state lock,
with the version before the change kept beside it as enrolled.npz.bak.

The saved Faiss index stays the train gallery's (what notebook 03 built, and what its data fingerprint describes);
lib.evaluate.gallery_index adds the enrolled embeddings to it when it loads it (faiss `add`: an IVF index keeps its
trained lists, no retraining), so a rebuilt train index never loses an enrolment and removing one rewrites one file.

A prediction with another checkpoint or TTA than a photo was enrolled with embeds that photo again, once: the result
is kept per embedding key in run_dir/index/enrolled_embeddings/ (a cache: unreadable -> made again), so later
predictions read it instead of the photo. A photo gone or changed since its enrolment is then left out, named.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.core.state_io import READ_ERRORS, file_sha256, read_cache, run_state_lock, save_npz, say_once, write_bytes
from lib.evaluate.photos import embed_photos

ENROLLED_FILE = Path("index") / "enrolled.npz"  # inside the run folder
BACKUP_SUFFIX = ".bak"  # enrolled.npz.bak: the enrolment before the last change
CACHE_DIR = Path("index") / "enrolled_embeddings"  # inside the run folder: {key id}.npz per embedding key
# one row per enrolled photo: id (the start of its sha256: duplicates are refused, so it is unique), the photo's
# absolute path, its label, group (one enrolment of one label = one encounter), file hash and when
COLUMNS = ("id", "path", "label", "group", "sha256", "enrolled_at")
ID_CHARS = 12
CACHE_LOCK_WAIT = 10.0  # seconds a prediction waits to store embeddings; enrolment holds the lock for less


@dataclass
class Enrolled:
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(COLUMNS)))
    # key_text(embedding key) -> {sha256 -> embedding}: each photo's embedding as made when it was enrolled; photos
    # enrolled under different checkpoints or TTA sit under different keys
    stored: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    def embeddings(self, key: dict) -> dict[str, np.ndarray]:
        return self.stored.get(key_text(key), {})

    def added(self, new: pd.DataFrame, key: dict, emb: np.ndarray) -> Enrolled:
        """This enrolment plus `new` (COLUMNS rows) whose embeddings `emb` were made under `key`."""
        stored = {k: dict(v) for k, v in self.stored.items()}
        stored.setdefault(key_text(key), {}).update(zip(new["sha256"], np.asarray(emb, np.float32)))
        return Enrolled(pd.concat([self.table, new], ignore_index=True)[list(COLUMNS)], stored)

    def without(self, drop: np.ndarray) -> Enrolled:
        """This enrolment less the rows where `drop` is True."""
        gone = set(self.table["sha256"][drop])
        stored = {k: {s: e for s, e in v.items() if s not in gone} for k, v in self.stored.items()}
        return Enrolled(self.table[~drop].reset_index(drop=True), {k: v for k, v in stored.items() if v})


def embedding_key(run, tta: bool) -> dict:
    """What an enrolled embedding depends on; the gallery index's own MATCH_KEYS."""
    return {"checkpoint_sha256": run.checkpoint_sha256, "tta": bool(tta), "transform": repr(run.eval_tf)}


def key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _unreadable(path: Path, e: Exception) -> DataError:
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    restore = f"restore the enrolment before the last change (mv {backup} {path}) or " if backup.exists() else ""
    return DataError(f"{path}: the enrolment file cannot be read ({type(e).__name__}: {e}; torn or not written by "
                     f"photo-enroll); {restore}remove it to drop every enrolment of this run")


def _read_npz(path: Path) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    with np.load(path) as f:
        table = pd.DataFrame(json.loads(str(f["table"])), columns=list(COLUMNS)).astype(str)
        if "keys" not in f.files:  # written before embeddings were stored per key: one key for every row
            emb = f["emb"]
            if len(emb) != len(table):
                raise ValueError(f"{len(table)} enrolled photos but {len(emb)} embeddings")
            return table, {key_text(json.loads(str(f["key"]))): dict(zip(table["sha256"], emb))} if len(emb) else {}
        stored = {}
        for i, key in enumerate(json.loads(str(f["keys"]))):
            ids, emb = json.loads(str(f[f"ids_{i}"])), f[f"emb_{i}"]
            if len(ids) != len(emb):
                raise ValueError(f"{len(ids)} photo ids but {len(emb)} embeddings under key {i}")
            stored[key_text(key)] = dict(zip(ids, emb))
    return table, stored


def load_enrolled(run_dir: str | os.PathLike) -> Enrolled:
    """The run's enrolment (empty when nothing was enrolled); a file that cannot be read is a DataError saying what
    to do."""
    path = Path(run_dir) / ENROLLED_FILE
    if not path.exists():
        return Enrolled()
    try:
        return Enrolled(*_read_npz(path))
    except READ_ERRORS as e:
        raise _unreadable(path, e) from None


def save_enrolled(run_dir: str | os.PathLike, enrolled: Enrolled) -> Path:
    """Replace the run's enrolment whole, keeping the one it replaces as enrolled.npz.bak. Callers hold
    run_state_lock around their load_enrolled ... save_enrolled."""
    path = Path(run_dir) / ENROLLED_FILE
    arrays, keys = {}, []
    for text, by_id in enrolled.stored.items():
        ids = [s for s in enrolled.table["sha256"] if s in by_id]
        if ids:
            arrays[f"ids_{len(keys)}"] = json.dumps(ids)
            arrays[f"emb_{len(keys)}"] = np.stack([by_id[s] for s in ids]).astype(np.float32)
            keys.append(json.loads(text))
    if path.exists():
        write_bytes(path.with_name(path.name + BACKUP_SUFFIX), path.read_bytes())
    return save_npz(path, table=json.dumps(enrolled.table[list(COLUMNS)].to_dict(orient="records")),
                    keys=json.dumps(keys), **arrays)


# ---- embeddings made again for another checkpoint or TTA, kept per key ------------------------------------------

def cache_path(run_dir: str | os.PathLike, key: dict) -> Path:
    return Path(run_dir) / CACHE_DIR / f"{hashlib.sha256(key_text(key).encode()).hexdigest()[:16]}.npz"


def _read_cache(path: Path, key: dict) -> dict[str, np.ndarray]:
    """sha256 -> embedding stored under `key`; {} when there is none, or when it cannot be read (said: it is made
    again)."""
    def read(p: Path) -> dict[str, np.ndarray]:
        with np.load(p) as f:
            if json.loads(str(f["key"])) != key:
                return {}
            ids, emb = json.loads(str(f["ids"])), f["emb"]
        if len(ids) != len(emb):
            raise ValueError(f"{len(ids)} photo ids but {len(emb)} embeddings")
        return dict(zip(ids, emb))

    return read_cache(path, read) or {}


def _store_cache(run_dir: Path, key: dict, fresh: dict[str, np.ndarray]) -> None:
    """Add `fresh` to the key's cache, under the run's state lock (merged with what another process stored
    meanwhile, limited to the photos enrolled now); never fatal: a run folder that cannot be written, or a lock held
    longer than an enrolment holds it, is said once and the embeddings are made again next time."""
    path = cache_path(run_dir, key)
    try:
        with run_state_lock(run_dir, "storing enrolled embeddings", wait=CACHE_LOCK_WAIT):
            enrolled = set(load_enrolled(run_dir).table["sha256"])
            have = {s: e for s, e in {**_read_cache(path, key), **fresh}.items() if s in enrolled}
            if have:
                save_npz(path, key=json.dumps(key), ids=json.dumps(list(have)),
                         emb=np.stack(list(have.values())).astype(np.float32))
    except (OSError, DataError) as e:
        say_once(f"cache:{path.parent}", f"note: {path.parent} not written ({e}); enrolled photos are embedded "
                                         "again at each prediction with this checkpoint/TTA")


def _embed_again(run, table: pd.DataFrame, settings: DeviceSettings, tta: bool,
                 batch_size: int) -> dict[str, np.ndarray]:
    """sha256 -> embedding of the photos of `table` still on disk as enrolled; the others named (once) and left
    out."""
    here = []
    for row in table.itertuples():
        if Path(row.path).is_file() and file_sha256(row.path) == row.sha256:
            here.append(row)
        else:
            say_once(f"enrolled-gone:{row.path}:{row.sha256}",
                     f"note: enrolled photo {row.path} (id {row.id}) is gone or changed since it was enrolled and "
                     "this checkpoint/TTA needs it embedded again: left out of the gallery; enrol it again or "
                     f"remove it (photo-enroll {run.run_dir} --remove {row.id})")
    if not here:
        return {}
    print(f"note: {len(here)} enrolled photos were embedded with another checkpoint or TTA; embedding them again "
          f"(stored in {run.run_dir / CACHE_DIR})")
    emb = embed_photos(run, [r.path for r in here], settings, tta, batch_size)
    return dict(zip([r.sha256 for r in here], emb))


def enrolled_gallery(run, settings: DeviceSettings, tta: bool = False,
                     batch_size: int = 64) -> tuple[pd.DataFrame, np.ndarray]:
    """(gallery metadata rows, embeddings) of the run's enrolled photos for this checkpoint and TTA: stored at
    enrolment, stored since, or embedded again now (and stored); a photo that needs embedding again but is gone or
    changed on disk is named and left out."""
    enrolled = load_enrolled(run.run_dir)
    key = embedding_key(run, tta)
    have = {**_read_cache(cache_path(run.run_dir, key), key), **enrolled.embeddings(key)}
    missing = enrolled.table[~enrolled.table["sha256"].isin(have)]
    if len(missing):
        fresh = _embed_again(run, missing, settings, tta, batch_size)
        if fresh:
            _store_cache(run.run_dir, key, fresh)
        have.update(fresh)
    table = enrolled.table[enrolled.table["sha256"].isin(have)]
    emb = np.stack([have[s] for s in table["sha256"]]).astype(np.float32) if len(table) else np.zeros((0, 0))
    return gallery_rows(table), emb


def gallery_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Enrolled photos (an Enrolled table) as gallery metadata rows (path, label, group, enrolled = the entry id)."""
    return pd.DataFrame({"path": table["path"], "label": table["label"], "group": table["group"],
                         "enrolled": table["id"]}).reset_index(drop=True)
