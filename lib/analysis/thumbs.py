"""Thumbnails for the web page: each photo decoded and resized once, then served from a cache of small JPEGs.

A cached file is named by a hash of the photo's absolute path, size, mtime and the thumbnail size, so a changed or
replaced photo gets a new thumbnail and nothing has to be invalidated; the cache is safe to delete at any time.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from PIL import Image

from lib.core.state_io import try_write_cache, write_bytes
from lib.data.images import UnreadableImage, load_resized

THUMB_PX = 192   # longer side: a pattern is visible, and a query with 10 neighbours is ~100 KB to send
QUALITY = 85


def jpeg_bytes(image: Image.Image, size: int = THUMB_PX) -> bytes:
    """`image` shrunk (never enlarged) to `size` on its longer side, as JPEG bytes."""
    im = image.convert("RGB")
    if max(im.size) > size:
        im = im.copy()
        im.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def _key(path: Path, size: int) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}".encode()).hexdigest()


def thumbnail(path: str | os.PathLike, cache_dir: str | os.PathLike, size: int = THUMB_PX) -> bytes:
    """JPEG bytes of the photo at `path` at most `size` px on its longer side, from `cache_dir` when made before.

    A missing or unreadable photo raises lib.data.images.UnreadableImage (a DataError naming the file).
    """
    path = Path(path)
    try:
        key = _key(path, size)
    except OSError as e:
        raise UnreadableImage(path, f"cannot read file: {e.strerror or e}") from None
    cached = Path(cache_dir) / key[:2] / f"{key}.jpg"
    if cached.exists():
        return cached.read_bytes()
    data = jpeg_bytes(load_resized(path, size, "longer"), size)  # draft decoding: big JPEGs decode at reduced scale
    # atomic: a page open in two tabs never reads half a thumbnail; never fatal: an unwritable cache is said once
    try_write_cache(cached, write_bytes, data)
    return data
