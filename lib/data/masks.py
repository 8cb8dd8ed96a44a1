"""Optional background removal: a per-photo foreground mask from the index's mask column, painted out before the model.

A mask value is a COCO polygon list, a COCO RLE (as JSON text or Python objects) or the path of a mask image.
Painting the background with the model's mean colour makes it zero after normalisation, so it carries no signal.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pycocotools.mask as mask_utils
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from lib.core.errors import DataError
from lib.data.images import open_image

# Masks saved smaller than the photo are common (annotation tools, thumbnails); their sides round to whole pixels,
# so a small aspect difference is rounding, a larger one means the mask belongs to another image or orientation.
ASPECT_TOLERANCE = 0.02


def _error(where: str, problem: str) -> DataError:
    return DataError(f"{where}: {problem}" if where else problem)


def _is_empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict, os.PathLike)):
        return False
    try:
        return bool(pd.isna(value))  # NaN, pd.NA, NaT: an empty cell of a table
    except (TypeError, ValueError):
        return False


def _polygon_parts(value: list, where: str) -> list[list[float]]:
    """COCO polygon parts as flat [x1, y1, x2, y2, ...] lists; [[x, y], [x, y], ...] is one part."""
    if not value:
        raise _error(where, "mask polygon list is empty")
    if all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        value = [[c for point in value for c in point]]
    parts = []
    for n, part in enumerate(value):
        try:
            flat = [float(c) for c in part]
        except (TypeError, ValueError):
            raise _error(where, f"mask polygon part {n} is not a list of numbers: {part!r:.80}") from None
        if len(flat) % 2 or not np.isfinite(flat).all():
            raise _error(where, f"mask polygon part {n} needs finite x, y pairs, got {len(flat)} numbers")
        if len(flat) < 6:
            raise _error(where, f"mask polygon part {n} has {len(flat) // 2} points, a polygon needs at least 3")
        parts.append(flat)
    return parts


def _compressed_counts(counts: bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (the inverse of pycocotools' rleToString)."""
    runs, p = [], 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("string ends inside a run length")
            c = counts[p] - 48
            x |= (c & 0x1F) << 5 * k
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        if len(runs) > 2:  # runs after the first two are stored as the difference to the run two before
            x += runs[-2]
        runs.append(x)
    return runs


def _decode_rle(value: dict, where: str) -> np.ndarray:
    if "size" not in value or "counts" not in value:
        raise _error(where, f"mask RLE needs 'size' and 'counts', got keys {sorted(value)}")
    size, counts = value["size"], value["counts"]
    whole = (int, np.integer)
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, whole) and s > 0 for s in size)):
        raise _error(where, f"mask RLE 'size' must be [height, width] in pixels, got {size!r}")
    h, w = int(size[0]), int(size[1])
    try:
        if isinstance(counts, (str, bytes)):
            counts = counts.encode("ascii") if isinstance(counts, str) else counts
            runs = _compressed_counts(counts)
            rle = {"size": [h, w], "counts": counts}
        elif isinstance(counts, (list, tuple)) and all(isinstance(c, whole) for c in counts):
            runs = [int(c) for c in counts]
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
        else:
            raise ValueError("'counts' must be a string or a list of integers")
    except ValueError as e:  # also a non-ASCII string (UnicodeEncodeError)
        raise _error(where, f"mask RLE has unreadable 'counts': {e}") from None
    # pycocotools trusts the run lengths: short ones leave pixels uninitialised, so check they tile the image.
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise _error(where, f"mask RLE run lengths sum to {sum(runs)} (or are negative), size {h}x{w} needs {h * w}")
    return mask_utils.decode(rle).astype(bool)


def _read_mask_image(path: Path, where: str) -> np.ndarray:
    if not path.is_file():
        raise _error(where, f"mask image {path} not found")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            # A cut-out (transparent background) marks its foreground by alpha, whatever colour lies below.
            if "A" in im.getbands():
                return np.asarray(im.getchannel("A")) > 0
            return np.asarray(im.convert("L")) > 0
    except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error...)
        raise _error(where, f"mask image {path} cannot be read: {e}") from e


def _fit(mask: np.ndarray, size: tuple[int, int], source: str, where: str) -> np.ndarray:
    """`mask` at `size` = (width, height): nearest-neighbour resize when only the scale differs."""
    w, h = size
    mh, mw = mask.shape
    if (mw, mh) == (w, h):
        return mask
    if abs((mw / mh) / (w / h) - 1) > ASPECT_TOLERANCE:
        raise _error(where, f"{source} is {mw}x{mh}, the photo {w}x{h}: aspect ratios differ "
                            "(a mask for another photo, or drawn before the EXIF rotation?)")
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def decode_mask(value, size: tuple[int, int], data_root=None, where: str = "") -> np.ndarray | None:
    """The foreground of one photo as a bool (H, W) array for an image of `size` = (width, height) as displayed.

    None when `value` is empty ("", None, NaN): that photo is used whole. Otherwise `value` is
    - a COCO polygon list, as JSON text or a list: [[x1, y1, x2, y2, ...], ...] (several parts) or
      [[x, y], [x, y], ...], in pixels of the displayed image;
    - a COCO RLE, as JSON text or a dict {"size": [h, w], "counts": str or list of ints}, compressed or not;
    - the path of a mask image (relative to data_root unless absolute): nonzero pixels, or nonzero alpha where it
      has alpha, are foreground; EXIF orientation applied.
    A mask of another size is resized (nearest) to `size` when the aspect ratios agree within 2 %.
    DataError, its message starting with `where`, for anything unreadable and for a mask without foreground.
    """
    if _is_empty(value):
        return None
    w, h = size
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _error(where, f"mask is not valid JSON ({e}): {value!r:.80}") from None
    if isinstance(value, (list, tuple)):
        parts = _polygon_parts(list(value), where)
        mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, h, w))).astype(bool)
        source = "mask polygon"
    elif isinstance(value, dict):
        mask, source = _decode_rle(value, where), "mask RLE"
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and data_root is not None:
            path = Path(data_root) / path
        mask, source = _read_mask_image(path, where), f"mask image {path}"
    else:
        raise _error(where, f"mask must be a polygon list, an RLE dict or an image path, got {type(value).__name__}")
    mask = _fit(mask, size, source, where)
    if not mask.any():
        raise _error(where, f"{source} has no foreground pixel (the whole photo would be painted out)")
    return mask


def apply_mask(image: Image.Image, mask: np.ndarray | None, fill: tuple[int, int, int]) -> Image.Image:
    """A copy of the RGB image with its background (mask False) painted `fill`; mask None returns `image` as is."""
    if mask is None:
        return image
    pixels = np.array(image.convert("RGB"))
    if mask.shape != pixels.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {image.width}x{image.height}")
    pixels[~mask] = fill
    return Image.fromarray(pixels)


def mean_fill(mean) -> tuple[int, int, int]:
    """A normalisation mean in [0, 1] (e.g. timm's data_config['mean']) as an RGB colour 0..255 (rounded)."""
    mean = tuple(float(m) for m in mean)
    if len(mean) != 3 or not all(0.0 <= m <= 1.0 for m in mean):
        raise ValueError(f"mean must be 3 values in [0, 1] (one per RGB channel), got {mean}")
    return tuple(int(round(m * 255)) for m in mean)


def _image_stamp(value, data_root) -> str:
    """Size and mtime of the mask image a value names ('' for polygons, RLEs and missing files)."""
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        return ""
    path = Path(value)
    path = path if path.is_absolute() or data_root is None else Path(data_root) / path
    try:
        st = path.stat()
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def masks_fingerprint(values, data_root=None) -> str:
    """sha256 hex of the mask values in order, so a cache key changes when any mask changes; a mask image path
    also contributes its file's size and mtime (relative to data_root), so a redrawn mask image counts as changed.

    Empty cells hash alike whatever their type, since None and NaN swap when a table goes through a CSV file.
    """
    texts = []
    for v in values:
        if _is_empty(v):
            texts.append("")
        elif isinstance(v, (str, os.PathLike)):
            texts.append(f"{os.fspath(v)}\x1f{_image_stamp(os.fspath(v), data_root)}")
        else:
            texts.append(json.dumps(v, sort_keys=True, default=str))
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


class MaskedDataset(Dataset):
    """Like lib.data.dataset.IndexDataset, but each photo's background is painted `fill` before the transform.

    Always reads the originals, never the resize cache: masks are drawn in the originals' pixels.
    Labels missing from `class_to_idx` (e.g. open-set queries) get -1.
    """

    def __init__(self, index: pd.DataFrame, data_root: str | os.PathLike, transform, class_to_idx: dict[str, int],
                 mask_col: str, fill: tuple[int, int, int]):
        if mask_col not in index.columns:
            raise DataError(f"index has no mask column {mask_col!r}; its columns are {list(index.columns)}")
        self.index = index.reset_index(drop=True)
        self.data_root = Path(data_root)
        self.paths = [self.data_root / p for p in self.index["path"]]
        self.targets = torch.tensor([class_to_idx.get(label, -1) for label in self.index["label"]], dtype=torch.long)
        self.masks = list(self.index[mask_col])
        self.transform = transform
        self.fill = fill

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = open_image(self.paths[i])
        where = f"index row {i} ({self.index['path'][i]})"
        mask = decode_mask(self.masks[i], image.size, self.data_root, where)
        return self.transform(apply_mask(image, mask, self.fill)), self.targets[i]
