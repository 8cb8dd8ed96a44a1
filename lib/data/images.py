"""Reading photos as users have them: any mode or extension, rotated by EXIF, sometimes truncated or no image at all.

The format is always decided by the file's content (PIL's sniffing), never its extension.
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from lib.core.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".heic", ".heif"}
)
RESIZE_MODES = ("shorter", "longer")

# ftyp brands of HEIF-family files (iPhone photos); PIL needs the pillow-heif plugin to read them.
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
# EXIF orientations 5-8 include a 90-degree turn, so the displayed image has width and height swapped.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


class UnreadableImage(DataError):
    """A file that cannot be decoded as an image; `reason` is the message without the path."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # so it survives the trip back from a worker process
        return type(self), (self.path, self.reason)


@dataclass
class ImageInfo:
    ok: bool
    width: int = 0  # displayed size, i.e. after EXIF orientation
    height: int = 0
    format: str = ""
    reason: str = ""


def looks_like_image(path) -> bool:
    """An image by its name (cheap), else by its content: PIL recognises the header, so `photo` or `photo.dat` holding
    a JPEG counts. Whether it decodes is probe_image's question; a file with an image name always counts here, so a
    corrupt one is reported rather than silently skipped."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with Image.open(path):
            return True
    except Exception:  # PIL raises many types for files that are not images
        return False


def find_images(root) -> list[str]:
    """Sorted posix paths, relative to root, of image-named files below it; hidden files and folders are skipped."""
    root = Path(root)
    found = (
        p.relative_to(root)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    return sorted(p.as_posix() for p in found if not any(part.startswith(".") for part in p.parts))


@contextmanager
def _strict_truncation():
    """Make PIL raise on truncated files even if some other library set LOAD_TRUNCATED_IMAGES globally."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _is_heif(head: bytes) -> bool:
    """ISO-BMFF 'ftyp' box whose major or compatible brands name HEIF."""
    if head[4:8] != b"ftyp":
        return False
    box_end = min(int.from_bytes(head[:4], "big"), len(head))
    brands = [head[8:12]] + [head[i : i + 4] for i in range(16, box_end - 3, 4)]
    return any(b in _HEIF_BRANDS for b in brands)


def _register_heif(path) -> None:
    try:
        import pillow_heif
    except ImportError:
        raise UnreadableImage(
            path, "HEIC/HEIF image, but pillow-heif is not installed; run `pip install pillow-heif`"
        ) from None
    pillow_heif.register_heif_opener()


def _decode(path, draft_size: Callable[[int, int], tuple[int, int] | None] | None = None):
    """Fully decode `path`; return (image in its own mode, stored size, EXIF orientation).

    `draft_size(w, h)` may ask a JPEG to be decoded at a reduced DCT scale no smaller than what it returns.
    libjpeg still reads every byte at reduced scale, so truncation is caught as at full scale.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UnreadableImage(path, f"cannot read file: {e.strerror or e}") from e
    with f, _strict_truncation():
        head = f.read(64)
        if not head:
            raise UnreadableImage(path, "empty file")
        if _is_heif(head):
            _register_heif(path)
        f.seek(0)
        try:
            im = Image.open(f)
            stored_size = im.size
            wanted = draft_size(*im.size) if draft_size and im.format == "JPEG" else None
            if wanted:
                im.draft(None, wanted)
            im.load()
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        except UnidentifiedImageError:
            raise UnreadableImage(path, "not an image (no known image format in its content)") from None
        except Image.DecompressionBombError as e:
            raise UnreadableImage(path, f"too many pixels: {e}") from e
        except Exception as e:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error...)
            raise UnreadableImage(path, f"truncated or corrupt: {e}") from e
    return im, stored_size, orientation


def _displayed_size(stored_size: tuple[int, int], orientation: int) -> tuple[int, int]:
    w, h = stored_size
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I"):
        # 16-bit greyscale (PNG/TIFF from scientific and thermal cameras): PIL's convert clips at 255, so scale.
        a = np.asarray(im, dtype=np.float64)
        top = max(65535.0, float(a.max()))
        return Image.fromarray(np.rint(a.clip(0) * (255.0 / top)).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Transparent areas (logos, cut-outs) become white; plain convert("RGB") exposes whatever colour lies below.
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    # CMYK (incl. Adobe's inverted CMYK JPEGs, which PIL un-inverts on read), P, 1, L, YCbCr.
    return im.convert("RGB")


def _finish(path, im: Image.Image) -> Image.Image:
    try:
        return _to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:
        raise UnreadableImage(path, f"cannot convert {im.mode} image to RGB: {e}") from e


def open_image(path) -> Image.Image:
    """The fully loaded RGB image, upright by its EXIF orientation; UnreadableImage (a DataError) if it cannot be."""
    im, _, _ = _decode(path)
    return _finish(path, im)


def probe_image(path, min_size: int = 0, draft: bool = True) -> ImageInfo:
    """Check that `path` decodes completely and its shorter side is >= min_size; never raises for a bad file.

    With draft, JPEGs are decoded at 1/8 scale: every byte is still read, so truncation is still caught.
    """
    try:
        im, stored_size, orientation = _decode(path, (lambda w, h: (1, 1)) if draft else None)
    except UnreadableImage as e:
        return ImageInfo(ok=False, reason=e.reason)
    w, h = _displayed_size(stored_size, orientation)
    info = ImageInfo(ok=True, width=w, height=h, format=im.format or "")
    if min(w, h) < min_size:
        info.ok, info.reason = False, f"too small: {w}x{h} < {min_size}x{min_size}"
    return info


def check_resize(size: int, mode: str) -> None:
    """Raise ValueError for resize settings load_resized cannot follow."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")


def _scaled_size(size: tuple[int, int], side: int, mode: str) -> tuple[int, int]:
    """Size whose shorter/longer side equals `side`, aspect kept; never larger than `size`."""
    w, h = size
    ref = min(w, h) if mode == "shorter" else max(w, h)
    if ref <= side:
        return w, h
    s = side / ref
    return (side, max(1, round(h * s))) if ref == w else (max(1, round(w * s)), side)


def load_resized(path, size: int, mode: str = "shorter", draft: bool = True) -> Image.Image:
    """RGB image, upright, resized (bicubic, never up) so its `mode` ('shorter'/'longer') side equals `size`.

    With draft, a JPEG is decoded at the strongest DCT reduction (1/2, 1/4 or 1/8) that still leaves it at least the
    target size: several times faster for camera JPEGs; the final bicubic resize gives the exact size either way.
    """
    check_resize(size, mode)

    def draft_size(w, h):
        # PIL's draft keeps both decoded sides >= these; the shorter/longer side is the same in stored orientation
        target = _scaled_size((w, h), size, mode)
        return target if target != (w, h) else None

    im, stored_size, orientation = _decode(path, draft_size if draft else None)
    target = _scaled_size(_displayed_size(stored_size, orientation), size, mode)
    im = _finish(path, im)
    return im if im.size == target else im.resize(target, Image.Resampling.BICUBIC)
