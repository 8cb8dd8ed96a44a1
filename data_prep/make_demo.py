"""Deterministic synthetic photo collection for demos and tests: pattern families (classes) worn by individuals.

Each class is a pattern family (stripes, spots, ...); each individual of a class has its own colours, spacing,
orientation, layout and a distinctive mark, so the same files serve classification by retrieval (label = class)
and re-identification (group/individual = ID). Views are "photos" of the individual with random pose, lighting,
background, occlusion and blur. A few planted bad files exercise the image checks.

    python data_prep/make_demo.py --out data/demo [--seed 0] [--overwrite]
"""

import argparse
import colorsys
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as coco_mask

from lib.core.errors import DataError

FAMILIES = ("stripes", "spots", "checks", "rings", "zigzag", "crosses", "waves", "diamonds")
JPEG_QUALITY = 90
UNDERSIZED = 160  # below the 224 px minimum the image checks enforce
BODY_FRACTION = 0.62  # body diameter / photo side, before the per-view scale
EXIF_ORIENTATION = 0x0112
METADATA_COLUMNS = ["path", "label", "individual", "group", "context", "seq", "note", "mask"]


@dataclass
class Individual:
    """The fixed details that make one animal/object recognisable across its photos."""

    id: str
    family: str
    fg: tuple  # RGB 0..255 of the pattern
    bg: tuple  # RGB of the body between the pattern
    mark_rgb: tuple  # RGB of the distinctive mark
    period: float  # pattern spacing, in body diameters
    duty: float  # fraction of a period covered by the pattern
    angle: float  # pattern orientation relative to the body's long axis (radians)
    phase: tuple  # pattern offset along u and v (fractions of a period)
    points: np.ndarray  # (n, 3) x, y, radius: spot layout; row 0 is the ring centre
    aspect: float  # body height / width
    mark: tuple  # x, y, radius of the mark, in body diameters from the centre


def _hsv(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def make_individual(ind_id, family, class_hue, rng):
    """Draw an individual's details; its hue stays near the class hue so classes differ more than individuals."""
    hue = class_hue + rng.uniform(-0.06, 0.06)
    dark_body = rng.random() < 0.5
    n_spots = int(rng.integers(10, 18))
    spots = np.column_stack(
        [rng.uniform(-0.45, 0.45, n_spots), rng.uniform(-0.45, 0.45, n_spots), rng.uniform(0.03, 0.065, n_spots)]
    )
    mark_r, mark_t = rng.uniform(0.1, 0.28), rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.55, 0.8)
    return Individual(
        id=ind_id,
        family=family,
        fg=_hsv(hue, rng.uniform(0.55, 0.95), rng.uniform(0.6, 0.95)),
        bg=_hsv(hue + rng.uniform(-0.12, 0.12), rng.uniform(0.2, 0.6), rng.uniform(0.12, 0.35) if dark_body else 0.92),
        mark_rgb=_hsv(hue + 0.5 + rng.uniform(-0.08, 0.08), 0.9, 1.0),
        period=rng.uniform(0.08, 0.16),
        duty=rng.uniform(0.35, 0.6),
        angle=rng.uniform(0, np.pi),
        phase=(rng.random(), rng.random()),
        points=spots,
        aspect=aspect,
        # the mark sits inside the (squashed) body ellipse
        mark=(mark_r * np.cos(mark_t), mark_r * aspect * np.sin(mark_t), rng.uniform(0.05, 0.075)),
    )


def _frac(z):
    return z - np.floor(z)


def pattern_mask(ind, n):
    """Boolean (n, n) map of where the individual's pattern covers its body, in body coordinates [-0.5, 0.5)."""
    y, x = np.mgrid[0:n, 0:n] / n - 0.5
    cos, sin = np.cos(ind.angle), np.sin(ind.angle)
    u = (x * cos + y * sin) / ind.period + ind.phase[0]
    v = (-x * sin + y * cos) / ind.period + ind.phase[1]
    a, b = _frac(u) - 0.5, _frac(v) - 0.5
    f = ind.family
    if f == "stripes":
        return _frac(u) < ind.duty
    if f == "checks":
        return (np.floor(u) + np.floor(v)) % 2 == 0
    if f == "rings":
        cx, cy = ind.points[0, :2] * 0.5
        return _frac(np.hypot(x - cx, y - cy) / ind.period + ind.phase[0]) < ind.duty
    if f == "zigzag":
        return _frac(u + 1.2 * np.abs(_frac(v / 2) - 0.5)) < ind.duty
    if f == "waves":
        return _frac(u + 0.5 * np.sin(2 * np.pi * v / 3)) < ind.duty
    if f == "crosses":
        w, arm = 0.05 + 0.12 * ind.duty, 0.38
        return ((np.abs(a) < w) & (np.abs(b) < arm)) | ((np.abs(b) < w) & (np.abs(a) < arm))
    if f == "diamonds":
        return np.abs(a) + np.abs(b) < 0.6 * ind.duty
    if f == "spots":
        d = np.min([np.hypot(x - px, y - py) - r for px, py, r in ind.points], axis=0)
        return d < 0
    raise ValueError(f"unknown pattern family {f!r}; valid: {', '.join(FAMILIES)}")


def body_image(ind, size):
    """The individual as an RGBA cut-out (pattern on an ellipse plus its mark), drawn once and posed per view."""
    n = max(8, int(round(size * BODY_FRACTION)))
    rgb = np.where(pattern_mask(ind, n)[..., None], np.array(ind.fg), np.array(ind.bg)).astype(np.uint8)
    body = Image.fromarray(rgb, "RGB")
    mx, my, mr = (np.array(ind.mark) * n + [n / 2, n / 2, 0]).tolist()
    ImageDraw.Draw(body).ellipse([mx - mr, my - mr, mx + mr, my + mr], fill=ind.mark_rgb)
    alpha = Image.new("L", (n, n), 0)
    half_h = n * ind.aspect / 2
    ImageDraw.Draw(alpha).ellipse([1, n / 2 - half_h, n - 2, n / 2 + half_h], fill=255)
    body.putalpha(alpha)
    return body


def _background(rng, size):
    """Mottled gradient ground with clutter, so the object never sits on a clean backdrop."""
    # muted colours of one brightness, like ground and foliage; the light from above sets the brightness trend
    c0, c1 = rng.uniform(60, 190) + rng.uniform(-35, 35, (2, 3))
    t = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / size
    ramp = (0.5 + (x - 0.5) * np.cos(t) + (y - 0.5) * np.sin(t)).clip(0, 1)[..., None]
    mottle = np.asarray(Image.fromarray(rng.normal(128, 40, (6, 6, 3)).clip(0, 255).astype(np.uint8)).resize(
        (size, size), Image.BICUBIC), dtype=np.float32) - 128
    img = Image.fromarray((c0 * (1 - ramp) + c1 * ramp + 0.4 * mottle).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 12))):
        x0, y0 = rng.uniform(-0.1, 1.0, 2) * size
        w, h = rng.uniform(0.03, 0.3, 2) * size
        colour = tuple(int(c) for c in rng.uniform(40, 200) + rng.uniform(-40, 40, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.line([x0, y0, x0 + w * rng.choice([-3, 3]), y0 + h * 3], fill=colour, width=int(rng.integers(1, 5)))
    return img


def render_photo(body, rng, size):
    """One view: posed body on a fresh background, occluded, lit from above with a random cast, blurred, noisy.

    Returns (photo, mask): mask is the visible body as a bool (size, size) array, the segmentation a user's
    annotation tool would give (the demo's `mask` column).
    """
    img = _background(rng, size)
    scale = rng.uniform(0.75, 1.1)
    obj = body.resize((max(1, round(body.width * scale)),) * 2, Image.BICUBIC)
    obj = obj.rotate(rng.uniform(-35, 35), resample=Image.BICUBIC, expand=True)
    cx, cy = (0.5 + rng.uniform(-0.14, 0.14, 2)) * size
    corner = (int(cx - obj.width / 2), int(cy - obj.height / 2))
    img.paste(obj, corner, obj)
    mask = Image.new("L", img.size)
    mask.paste(obj.getchannel("A"), corner)
    if rng.random() < 0.8:  # something in front: a leaf, a post, a passing branch
        w, h = rng.uniform(0.1, 0.3, 2) * size
        ox, oy = np.array([cx, cy]) + rng.normal(0, 0.15 * size, 2)
        box = [ox - w / 2, oy - h / 2, ox + w / 2, oy + h / 2]
        rect = rng.random() < 0.5
        for canvas, fill in ((img, tuple(int(c) for c in rng.uniform(20, 160, 3))), (mask, 0)):
            draw = ImageDraw.Draw(canvas)
            (draw.rectangle if rect else draw.ellipse)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1)))
    arr = np.asarray(img, dtype=np.float32)
    contrast, brightness = rng.uniform(0.75, 1.2), rng.uniform(-25, 25)
    cast = rng.uniform(0.9, 1.1, 3)
    # daylight falls from above: the top is brighter, which also lets tests see which way is up
    light = np.linspace(1.15, 0.7, size, dtype=np.float32)[:, None, None]
    arr = ((arr - 128) * contrast + 128 + brightness) * cast * light + rng.normal(0, 3, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)), np.asarray(mask) >= 128


def _rle_json(mask):
    """A bool mask as COCO RLE JSON text, the form annotation tools export."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return json.dumps({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})


def _jpeg_bytes(img, **kwargs):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY, **kwargs)
    return buf.getvalue()


def _sideways_with_exif(img):
    """Pixels stored rotated 90 degrees CCW plus Orientation=6, which viewers undo (rotate 90 CW) to show `img`."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _jpeg_bytes(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def context_of(class_idx, ind_idx, n_contexts):
    """Site of an individual: the first two of each class share a site, the rest walk round the sites.

    So every site meets several classes and some sites hold two or more individuals of one class,
    which is what makes context-aware re-identification non-trivial.
    """
    return f"site{(class_idx + max(ind_idx - 1, 0)) % n_contexts + 1:02d}"


def _planted(n_classes, first_idx):
    """(kind, class index, individual index) of each planted group; each kind sits in its own class where possible."""
    kinds = ["undersized", "truncated", "not_an_image", "jpeg_as_png", "exif_rotated"]
    return [(kind, k % n_classes, first_idx + k // n_classes) for k, kind in enumerate(kinds)]


def _planted_files(kind, ind, size, rng_for):
    """(file name, bytes, note) per file of one planted group; `rng_for(seq)` gives each view's RNG."""
    body = body_image(ind, size)

    def view(seq, side=size):
        return render_photo(body if side == size else body_image(ind, side), rng_for(seq), side)[0]

    if kind == "undersized":
        note = f"undersized {UNDERSIZED}x{UNDERSIZED} (below 224)"
        return [(f"{ind.id}_{s}.jpg", _jpeg_bytes(view(s, UNDERSIZED)), note) for s in (1, 2)]
    if kind == "truncated":
        data = _jpeg_bytes(view(2))
        return [(f"{ind.id}_1.jpg", _jpeg_bytes(view(1)), ""),
                (f"{ind.id}_2.jpg", data[: len(data) // 2], "truncated JPEG (data cut off half-way)")]
    if kind == "not_an_image":
        return [(f"{ind.id}_1.jpg", b"This is a text file, not a photo.\n", "text file named .jpg")]
    if kind == "jpeg_as_png":
        return [(f"{ind.id}_1.png", _jpeg_bytes(view(1)), "good: JPEG content under a .png name"),
                (f"{ind.id}_2.jpg", _jpeg_bytes(view(2)), "")]
    if kind == "exif_rotated":
        return [(f"{ind.id}_1.jpg", _sideways_with_exif(view(1)), "good: stored sideways, EXIF Orientation=6"),
                (f"{ind.id}_2.jpg", _jpeg_bytes(view(2)), "")]
    raise ValueError(f"unknown planted kind {kind!r}")


def _prepare_out_dir(out, overwrite):
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out}: folder exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        if not (out / "metadata.csv").is_file():
            # overwrite replaces an earlier demo set, never a folder of someone's own files
            raise DataError(f"{out}: not a demo folder (no metadata.csv); refusing to delete it, remove it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def make_demo(out_dir, n_classes=6, individuals_per_class=8, views_per_individual=5, size=256, seed=0,
              n_contexts=6, overwrite=False):
    """Write the demo set under `out_dir` (`{class}/{ID}_{seq}.jpg` + metadata.csv) and return the metadata table.

    Same arguments give byte-identical files: every individual and view draws from its own RNG seeded by
    (seed, class, individual, view).
    """
    if not 1 <= n_classes <= len(FAMILIES):
        raise ValueError(f"n_classes must be 1..{len(FAMILIES)} (one per pattern family), got {n_classes}")
    if individuals_per_class < 2 or views_per_individual < 2 or n_contexts < 1:
        raise ValueError("need individuals_per_class >= 2, views_per_individual >= 2 and n_contexts >= 1")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    hues = np.arange(n_classes) / n_classes

    def individual(c, j):
        return make_individual(f"{FAMILIES[c]}{j + 1:02d}", FAMILIES[c], hues[c], np.random.default_rng([seed, c, j]))

    def rng_for(c, j):
        return lambda seq: np.random.default_rng([seed, c, j, seq])

    rows, files = [], []
    for c in range(n_classes):
        for j in range(individuals_per_class):
            ind = individual(c, j)
            body = body_image(ind, size)
            for seq in range(1, views_per_individual + 1):
                img, mask = render_photo(body, rng_for(c, j)(seq), size)
                files.append((c, j, f"{ind.id}_{seq}.jpg", _jpeg_bytes(img), "", _rle_json(mask)))
    for kind, c, j in _planted(n_classes, individuals_per_class):
        # planted files carry no mask: the probe then uses those photos whole
        files += [(c, j, name, data, note, "") for name, data, note in _planted_files(kind, individual(c, j), size,
                                                                                      rng_for(c, j))]
    for c, j, name, data, note, mask in files:
        rel = f"{FAMILIES[c]}/{name}"
        (out / FAMILIES[c]).mkdir(exist_ok=True)
        (out / rel).write_bytes(data)
        ind_id, seq = Path(name).stem.split("_")
        rows.append((rel, FAMILIES[c], ind_id, ind_id, context_of(c, j, n_contexts), int(seq), note, mask))
    # a stray non-image the folder reader must skip; deliberately absent from metadata.csv
    (out / FAMILIES[n_classes - 1] / "notes.txt").write_text("field notes: cloudy.\n")
    meta = pd.DataFrame(rows, columns=METADATA_COLUMNS).sort_values(["label", "group", "seq"], ignore_index=True)
    meta.to_csv(out / "metadata.csv", index=False)
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo set in --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        meta = make_demo(args.out, seed=args.seed, overwrite=args.overwrite)
    except DataError as e:
        parser.exit(2, f"make_demo: {e}\n")
    print(f"{len(meta)} files, {meta['group'].nunique()} IDs, {meta['label'].nunique()} classes, "
          f"{meta['context'].nunique()} sites ({(meta['note'] != '').sum()} planted specials) -> {args.out} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
