"""Near-duplicate leakage: burst shots and re-saved copies (resized, re-compressed, slightly cropped) of one photo
filed under different ID groups. Such a pair can put a near-copy of a training photo among the queries.

A 64-bit DCT perceptual hash (pHash) per photo finds candidates; pairs within `max_distance` bits (Hamming) that sit in
different groups are returned as a table, optionally confirmed by embedding cosine. `merge_near_duplicates` then gives
each cluster of same-label groups one group ID, so the group-aware split keeps a cluster in one split.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.fft import dctn

from lib.core.cpus import map_files
from lib.core.errors import DataError
from lib.core.state_io import write_csv, write_text
from lib.data.images import load_resized

PAIR_COLUMNS = ["path_a", "path_b", "group_a", "group_b", "label_a", "label_b", "hamming"]
HASH_BITS = 64
# Above ~15 of 64 bits pHash no longer separates copies from look-alikes (imagehash users work at <= 10), and the
# pigeonhole buckets below would hold most of the collection.
MAX_DISTANCE = 15
# JPEGs are decoded at a reduced DCT scale no smaller than this shorter side: pHash only sees 32x32, and a camera
# photo then decodes several times faster. Every photo goes through the same path, so copies stay comparable.
_DECODE_SIDE = 128
CENTRE_INSET = 0.04  # share of width/height cut from each edge for the second hash: crops of 0-8% stay within 4%


def phash(image: Image.Image) -> int:
    """64-bit pHash as imagehash.phash computes it (imagehash is not a dependency of this project; the recipe is a
    few lines): 32x32 grayscale, 2-D DCT-II, the top-left 8x8 lowest frequencies compared with their median,
    row-major with the first bit as the most significant."""
    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dctn(gray, type=2)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a, b) -> np.ndarray:
    """Bits that differ between uint64 hashes (elementwise, broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def centre(image: Image.Image, inset: float = CENTRE_INSET) -> Image.Image:
    """The image without `inset` of its width/height at each edge."""
    w, h = image.size
    dx, dy = round(w * inset), round(h * inset)
    return image.crop((dx, dy, w - dx, h - dy))


def photo_hashes(image: Image.Image) -> tuple[int, int]:
    """(pHash of the whole photo, pHash of its centre). A copy cropped by a few % at the edges shifts and rescales the
    content enough to flip ~10 of 64 bits of the whole-photo hash, but its whole-photo hash matches the original's
    centre hash closely; comparing all combinations catches both crops and plain copies."""
    return phash(image), phash(centre(image))


def _hash_file(path: str) -> tuple[int, int] | None:
    try:
        return photo_hashes(load_resized(path, _DECODE_SIDE, mode="shorter"))
    except DataError:  # unreadable: check_images has already excluded it upstream; here it is only left unhashed
        return None


def perceptual_hashes(index: pd.DataFrame, data_root: str | os.PathLike, workers: int | None = None) -> np.ma.MaskedArray:
    """(n rows, 2) uint64 pHashes per index row (whole photo, centre; see photo_hashes), each photo read once; rows
    whose photo cannot be read are masked.

    Runs in parallel processes for larger collections: decoding dominates.
    """
    paths = [str(Path(data_root) / p) for p in index["path"]]
    found = map_files(_hash_file, paths, workers)
    values = np.array([(0, 0) if h is None else h for h in found], dtype=np.uint64).reshape(len(found), 2)
    mask = np.repeat([[h is None] for h in found], 2, axis=1).reshape(len(found), 2)
    return np.ma.MaskedArray(values, mask=mask)


def _segments(max_distance: int) -> list[tuple[int, np.uint64]]:
    """(shift, mask) of max_distance + 1 contiguous bit ranges covering the 64 bits. Pigeonhole: hashes that differ
    in at most max_distance bits agree on at least one whole range, so bucketing by each range finds every pair."""
    bounds = np.linspace(0, HASH_BITS, max_distance + 2).round().astype(int)
    return [(int(lo), np.uint64((1 << int(hi - lo)) - 1)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _close_pairs(hashes: np.ndarray, groups: np.ndarray, max_distance: int, chunk: int = 2048) -> np.ndarray:
    """(i, j) item pairs, i < j, in different groups with Hamming distance <= max_distance; each pair once."""
    found = []
    for shift, mask in _segments(max_distance):
        keys = (hashes >> np.uint64(shift)) & mask
        order = np.argsort(keys, kind="stable")
        starts = np.flatnonzero(np.r_[True, keys[order][1:] != keys[order][:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = np.sort(order[start:start + size])
            for lo in range(0, size, chunk):  # a bucket is compared in row blocks so memory stays bounded
                rows = members[lo:lo + chunk]
                close = hamming(hashes[rows][:, None], hashes[members][None, :]) <= max_distance
                close &= rows[:, None] < members[None, :]
                close &= groups[rows][:, None] != groups[members][None, :]
                r, c = np.nonzero(close)
                found.append(np.column_stack([rows[r], members[c]]))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def near_duplicate_pairs(index: pd.DataFrame, hashes: np.ndarray, max_distance: int = 6,
                         embeddings: np.ndarray | None = None, min_cosine: float = 0.9) -> pd.DataFrame:
    """Photo pairs in DIFFERENT groups whose pHashes differ in at most `max_distance` of 64 bits.

    `hashes` holds one uint64 per index row, or several (n, k) (perceptual_hashes: whole photo and centre); a pair's
    `hamming` is then the smallest distance over all combinations of the two photos' hashes.

    Pairs within one group are left out: they cannot leak. With `embeddings` (one row per index row, e.g. from a
    trained model), a pair is kept only if its cosine similarity is >= min_cosine, and the column `cosine` is added:
    pHash sees only coarse grayscale structure, so two plain look-alike photos can share a hash. Rows masked in
    `hashes` (unreadable photos) are never paired. Sorted by distance, then paths.
    """
    if not 0 <= max_distance <= MAX_DISTANCE:
        raise ValueError(f"max_distance must be 0..{MAX_DISTANCE} bits of {HASH_BITS}, got {max_distance}")
    if len(hashes) != len(index):
        raise ValueError(f"{len(hashes)} hash rows for {len(index)} index rows")
    n = len(index)
    values = np.ma.getdata(hashes).astype(np.uint64).reshape(n, -1)
    readable = np.flatnonzero(~np.ma.getmaskarray(hashes).reshape(n, -1).any(axis=1))
    k = values.shape[1]
    # every hash of a photo is an item; two items of different groups are necessarily of two different photos
    owner = np.repeat(readable, k)
    items = _close_pairs(values[readable].ravel(), index["group"].astype(str).to_numpy()[owner], max_distance)
    ij = np.unique(np.sort(owner[items], axis=1), axis=0) if len(items) else np.empty((0, 2), dtype=np.int64)
    distance = hamming(values[ij[:, 0]][:, :, None], values[ij[:, 1]][:, None, :]).min(axis=(1, 2), initial=HASH_BITS)
    a, b = index.iloc[ij[:, 0]], index.iloc[ij[:, 1]]
    pairs = pd.DataFrame({"path_a": a["path"].to_numpy(), "path_b": b["path"].to_numpy(),
                          "group_a": a["group"].to_numpy(), "group_b": b["group"].to_numpy(),
                          "label_a": a["label"].to_numpy(), "label_b": b["label"].to_numpy(),
                          "hamming": distance.astype(int)}, columns=PAIR_COLUMNS)
    if embeddings is not None:
        if len(embeddings) != len(index):
            raise ValueError(f"{len(embeddings)} embeddings for {len(index)} index rows")
        e = np.asarray(embeddings, dtype=np.float64)
        e = e / np.clip(np.linalg.norm(e, axis=1, keepdims=True), 1e-12, None)
        pairs["cosine"] = np.einsum("ij,ij->i", e[ij[:, 0]], e[ij[:, 1]]) if len(ij) else np.empty(0)
        pairs = pairs[pairs["cosine"] >= min_cosine]
    return pairs.sort_values(["hamming", "path_a", "path_b"]).reset_index(drop=True)


def merge_near_duplicates(index: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The index with each cluster of groups joined by same-label pairs under one group ID (the smallest name), so a
    group-aware split keeps the cluster in one split. The previous group is kept in `group_before_merge`.

    Pairs whose photos carry different labels are NOT merged: a group must have one label, and a copy filed under two
    classes is a labelling question for the user (see `pair_actions`).
    """
    parent: dict[str, str] = {}

    def root(g: str) -> str:
        parent.setdefault(g, g)
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    same = pairs[pairs["label_a"].astype(str) == pairs["label_b"].astype(str)]
    for a, b in zip(same["group_a"].astype(str), same["group_b"].astype(str)):
        ra, rb = root(a), root(b)
        if ra != rb:  # the smaller name becomes the root, so a cluster's ID does not depend on pair order
            parent[max(ra, rb)] = min(ra, rb)
    groups = index["group"].astype(str)
    return index.assign(group=[root(g) if g in parent else g for g in groups], group_before_merge=groups.to_numpy())


def pair_actions(pairs: pd.DataFrame, merged: bool) -> pd.DataFrame:
    """The pairs with an `action` column saying what the split does about each, for the split folder's CSV."""
    same = pairs["label_a"].astype(str) == pairs["label_b"].astype(str)
    action = np.where(~same, "different labels: not merged, check the labels by hand",
                      "groups merged" if merged else "not merged (merge_near_duplicates=False): may leak")
    return pairs.assign(action=action)


def report_markdown(pairs: pd.DataFrame, max_distance: int, merged: bool, n_show: int = 20) -> str:
    """A section for the split report: counts and the closest pairs."""
    lines = [f"## Near-duplicates across groups ({len(pairs)} pairs; pHash distance <= {max_distance} of 64 bits)", ""]
    if pairs.empty:
        return "\n".join(lines + ["none", ""])
    acted = pair_actions(pairs, merged)
    lines += [f"- {action}: {n}" for action, n in acted["action"].value_counts().sort_index().items()]
    lines += ["", "| path a | path b | groups | labels | distance |", "|---|---|---|---|---|"]
    lines += [f"| {r.path_a} | {r.path_b} | {r.group_a} / {r.group_b} | {r.label_a} / {r.label_b} | {r.hamming} |"
              for r in acted.head(n_show).itertuples()]
    if len(pairs) > n_show:
        lines.append(f"\n... {len(pairs) - n_show} more in near_duplicates.csv")
    return "\n".join(lines + [""])


_SECTION = "## Near-duplicates across groups"


def write_near_duplicates(splits_dir: str | os.PathLike, pairs: pd.DataFrame, max_distance: int, merged: bool) -> str:
    """Write `near_duplicates.csv` into the split folder and put the section into its split_report.md (replacing the
    one a previous run added, so re-running does not stack copies). Returns the section.

    Call it after prepare_splits: with fresh=True that moves every file of the folder aside, this one included.
    """
    d = Path(splits_dir)
    write_csv(d / "near_duplicates.csv", pair_actions(pairs, merged))
    section = report_markdown(pairs, max_distance, merged)
    report = d / "split_report.md"
    if report.exists():
        text = report.read_text()
        head, found, rest = text.partition(_SECTION)
        if found:  # drop the old section up to the next one, if any
            after = rest.find("\n## ")
            text = head + (rest[after + 1:] if after >= 0 else "")
        write_text(report, text.rstrip("\n") + "\n\n" + section)
    return section
