"""Photos enrolled into a run's gallery after training (lib.evaluate.enroll, `photo-enroll`): one file,
run_dir/index/enrolled.npz, holding their table and embeddings, replaced whole (temp file + rename) at every change
so a kill leaves the old enrolment or the new one, never half of each.

The saved Faiss index stays the train gallery's (what notebook 03 built, and what its data fingerprint describes);
lib.evaluate.gallery_index adds the enrolled embeddings to it when it loads it (faiss `add`: an IVF index keeps its
trained lists, no retraining), so a rebuilt train index never loses an enrolment and removing one rewrites one file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.core.state_io import READ_ERRORS, save_npz
from lib.evaluate.photos import embed_photos
from lib.retrieval.embed import file_sha256

ENROLLED_FILE = Path("index") / "enrolled.npz"  # inside the run folder
# one row per enrolled photo: id (the start of its sha256: duplicates are refused, so it is unique), the photo's
# absolute path, its label, group (one enrolment of one label = one encounter), file hash and when
COLUMNS = ("id", "path", "label", "group", "sha256", "enrolled_at")
ID_CHARS = 12


@dataclass
class Enrolled:
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(COLUMNS)))
    emb: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # table's row order
    key: dict = field(default_factory=dict)  # checkpoint_sha256, tta, transform the embeddings were made with

    def __len__(self) -> int:
        return len(self.table)


def embedding_key(run, tta: bool) -> dict:
    """What an enrolled embedding depends on; the gallery index's own MATCH_KEYS."""
    return {"checkpoint_sha256": run.checkpoint_sha256, "tta": bool(tta), "transform": repr(run.eval_tf)}


def load_enrolled(run_dir: str | os.PathLike) -> Enrolled:
    """The run's enrolment (empty when nothing was enrolled)."""
    path = Path(run_dir) / ENROLLED_FILE
    if not path.exists():
        return Enrolled()
    try:
        with np.load(path) as f:
            table = pd.DataFrame(json.loads(str(f["table"])), columns=list(COLUMNS)).astype(str)
            emb, key = f["emb"], json.loads(str(f["key"]))
    except READ_ERRORS as e:  # a cut-short copy: np.load raises BadZipFile or EOFError
        raise DataError(f"{path}: the enrolment file cannot be read ({type(e).__name__}: {e}); restore it from a "
                        "backup, or move it aside and enrol the photos again") from None
    if len(emb) != len(table):
        raise DataError(f"{path}: {len(table)} enrolled photos but {len(emb)} embeddings")
    return Enrolled(table, emb, key)


def save_enrolled(run_dir: str | os.PathLike, enrolled: Enrolled) -> Path:
    return save_npz(Path(run_dir) / ENROLLED_FILE,
                    table=json.dumps(enrolled.table[list(COLUMNS)].to_dict(orient="records")),
                    emb=np.asarray(enrolled.emb, dtype=np.float32), key=json.dumps(enrolled.key))


def current_embeddings(run, enrolled: Enrolled, settings: DeviceSettings, tta: bool = False,
                       batch_size: int = 64) -> np.ndarray:
    """The enrolled embeddings for this checkpoint and TTA: the stored ones when they were made so, else the photos
    embedded again (each checked against its recorded hash first: a photo moved or edited since is named)."""
    if enrolled.key == embedding_key(run, tta):
        return enrolled.emb
    for row in enrolled.table.itertuples():
        if not Path(row.path).is_file() or file_sha256(row.path) != row.sha256:
            raise DataError(f"enrolled photo {row.path} (id {row.id}) is gone or changed since it was enrolled, and "
                            "this checkpoint/TTA needs it embedded again; enrol it again or remove it "
                            f"(photo-enroll {run.run_dir} --remove {row.id})")
    print(f"note: {len(enrolled)} enrolled photos were embedded with another checkpoint or TTA; embedding them again")
    return embed_photos(run, enrolled.table["path"].tolist(), settings, tta, batch_size)


def gallery_rows(enrolled: Enrolled) -> pd.DataFrame:
    """The enrolled photos as gallery metadata rows (path, label, group, enrolled = the entry id)."""
    return pd.DataFrame({"path": enrolled.table["path"], "label": enrolled.table["label"],
                         "group": enrolled.table["group"], "enrolled": enrolled.table["id"]})
