"""Photos from outside a run's split, as prediction and enrolment take them: listed from a folder, a list file or one
path, and embedded with the run's model and eval transform."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.data.dataset import IndexDataset
from lib.data.images import looks_like_image
from lib.retrieval.embed import EMBED_BATCH_SIZE, extract_embeddings
from lib.retrieval.onnx_engine import OnnxForward


def list_photos(source: str | os.PathLike) -> list[str]:
    """Photos named by `source`: a folder (searched recursively; hidden entries skipped), a text file with one path
    a line (blank lines and '#' comments skipped; relative paths are relative to the list's folder), or one image.

    In a folder, a file with an image extension is always listed (so a corrupt one is reported, not lost); any
    other file is listed when its content is an image. Any other file (binary, or text none of whose lines names a
    file, as a CSV table) is a DataError naming it.
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
    what = ("not an image, and not a list of photos (a text file with one photo path a line); PHOTOS is a folder, "
            "one photo or such a list")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:  # binary
        raise DataError(f"{source}: {what}")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    listed = [str(source.parent / line) for line in lines]
    if listed and not any(os.path.lexists(p) for p in listed):  # a CSV or notes, not a list of photos
        raise DataError(f"{source}: {what}. None of its {len(listed)} lines names a file (first: {lines[0][:80]!r})")
    return listed


def embed_photos(run, paths: list[str], settings: DeviceSettings, tta: bool = False,
                 batch_size: int = EMBED_BATCH_SIZE, progress: bool = False) -> np.ndarray:
    """(n, d) embeddings of readable photos (paths as given, not under the data root) with a lib.train.trained_run
    run's model and eval transform (or an export's: lib.evaluate.exported), as evaluation embeds its split; not
    cached (new photos are seen once)."""
    dataset = IndexDataset(pd.DataFrame({"path": [str(p) for p in paths], "label": ""}), "", run.eval_tf, {})
    model = run.model if isinstance(run.model, OnnxForward) else run.model.to(settings.device)
    return extract_embeddings(model, dataset, settings, batch_size, progress, "photos", tta)
