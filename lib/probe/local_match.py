"""Local-feature matching to re-rank a global retrieval shortlist: RootSIFT, mutual nearest neighbours with Lowe's
ratio test, USAC inliers.

A global embedding ranks the gallery; the few top candidates per query are then re-scored by how many keypoint
matches agree with one geometric transform. Plain OpenCV SIFT, so nothing is downloaded. A query is matched against
its whole shortlist in one step: one matrix product of its descriptors with every candidate's, the nearest and
second-nearest neighbour within each candidate read off it; only the geometric check runs pair by pair.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from lib.core.cpus import usable_cpus

GEOMETRIES = ("homography", "affine")
MIN_MATCHES = {"homography": 4, "affine": 2}  # fewest point pairs each OpenCV estimator accepts
# The cap on USAC's samples. USAC (MAGSAC++ scoring, SPRT verification) ends a true pair's search as soon as its
# consensus is found and rejects an unrelated pair's models after a few points each, so the cap bounds the rare
# pair that would otherwise run long rather than setting every unrelated pair's cost as plain RANSAC's cap did.
RANSAC_ITERS = 500
RANSAC_CONFIDENCE = 0.999
# Similarities one matching step holds (128 MiB of float32): a shortlist of photos with many keypoints each (say
# n_features=0) is matched a few photos at a time, with the same result.
MAX_SIMS = 2**25
MATCHER = "rootsift mutual-nn usac-magsac"  # names these counts in the inlier cache, apart from older matchers'


@dataclass(frozen=True)
class SiftConfig:
    # Images scaled (never up) so their longer side is at most this before detection. SIFT's cost grows with the
    # pixels and matching's with the keypoints (every query keypoint against every shortlisted one); what larger
    # settings cost and how they rank is in the README's local re-ranking benchmark (bench/bench_probe.py --sizes).
    max_side: int = 320
    n_features: int = 500  # cv2.SIFT_create(nfeatures=...), the strongest kept; 0 keeps every keypoint
    ratio: float = 0.8  # Lowe's ratio test on the two nearest descriptors
    ransac_px: float = 5.0  # RANSAC reprojection threshold, pixels of the scaled image
    geometry: str = "homography"  # "homography" (cv2.findHomography) | "affine" (cv2.estimateAffinePartial2D)

    def __post_init__(self):
        # Checked at construction so a bad knob fails before hours of feature extraction, not after.
        if self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side!r}")
        if self.n_features < 0:
            raise ValueError(f"n_features must be >= 0, got {self.n_features!r}")
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        if not self.ransac_px > 0:
            raise ValueError(f"ransac_px must be > 0, got {self.ransac_px!r}")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"unknown geometry {self.geometry!r}; valid: {', '.join(GEOMETRIES)}")


def sift_features(image: Image.Image, cfg: SiftConfig = SiftConfig(),
                  mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints (n, 2) float32 xy in the scaled image, descriptors (n, 128) float32).

    mask: bool (H, W) at the image's size, True = foreground; keypoints are detected only there (scaled with
    the image, nearest). An image with no keypoints gives (0, 2) and (0, 128) arrays.
    """
    gray = image.convert("L")
    if mask is not None and mask.shape != (gray.height, gray.width):
        raise ValueError(f"mask shape {mask.shape} does not match image size (H, W) {(gray.height, gray.width)}")
    longest = max(gray.size)
    if longest > cfg.max_side:
        scale = cfg.max_side / longest
        size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        gray = gray.resize(size, Image.LANCZOS)
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    cv_mask = None if mask is None else mask.astype(np.uint8) * 255
    keypoints, descriptors = cv2.SIFT_create(nfeatures=cfg.n_features).detectAndCompute(np.asarray(gray), cv_mask)
    if descriptors is None or not keypoints:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    return np.array([k.pt for k in keypoints], np.float32), descriptors.astype(np.float32)


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """(n, 128) float32 RootSIFT (Arandjelovic & Zisserman 2012): each SIFT descriptor L1-normalised and square-rooted.
    The rows come out unit-length, so one matrix product gives every pair's squared distance (2 - 2 x dot), and
    Euclidean distance between them is the Hellinger distance of the SIFT histograms, which matches better."""
    d = np.asarray(descriptors, np.float32)
    total = d.sum(axis=1, keepdims=True)
    return np.sqrt(np.divide(d, total, out=np.zeros_like(d), where=total > 0))


def shortlist_matches(query: np.ndarray, gallery: list[np.ndarray], ratio: float) -> list[np.ndarray]:
    """Per gallery photo, the (m, 2) rows (query keypoint, gallery keypoint) that are mutual nearest neighbours and
    pass Lowe's ratio test (nearest distance < ratio x second nearest, both within that photo); descriptors as
    sift_features gives them. One matrix product of the query's descriptors with all the gallery photos' at once; a
    photo with fewer than 2 descriptors (no second neighbour) and an empty query match nothing."""
    counts = np.array([len(g) for g in gallery])
    if len(query) == 0 or not len(gallery) or counts.max() < 2:
        return [np.zeros((0, 2), np.intp) for _ in gallery]
    step = max(1, MAX_SIMS // (len(query) * int(counts.max())))
    if step < len(gallery):
        return [m for s in range(0, len(gallery), step) for m in shortlist_matches(query, gallery[s: s + step], ratio)]
    # each photo's descriptors padded to the longest, so per-photo neighbours are reductions over one axis; the
    # padding is a negative vector, whose product with any RootSIFT descriptor (non-negative, unit length) is
    # below every real one's, so it is never a neighbour in either direction
    width, q = int(counts.max()), root_sift(query)
    padded = np.full((len(gallery), width, q.shape[1]), -1.0, np.float32)
    for k, g in enumerate(gallery):
        padded[k, : len(g)] = root_sift(g)
    sims = (q @ padded.reshape(-1, q.shape[1]).T).reshape(len(q), len(gallery), width)
    closest = sims.max(axis=0)  # (photos, width): each gallery keypoint's similarity to its nearest query keypoint
    best = sims.argmax(axis=2)  # (queries, photos): each query keypoint's nearest keypoint in each photo
    nearest = np.take_along_axis(sims, best[..., None], axis=2)[..., 0]
    mutual = nearest >= closest[np.arange(len(gallery)), best]
    np.put_along_axis(sims, best[..., None], -np.inf, axis=2)
    distance = np.sqrt(np.maximum(2 - 2 * np.stack([nearest, sims.max(axis=2)]), 0))
    keep = mutual & (distance[0] < ratio * distance[1])
    keep[:, counts < 2] = False
    return [_first_per_target(np.flatnonzero(keep[:, k]), best[keep[:, k], k]) for k in range(len(gallery))]


def _first_per_target(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(m, 2) (source, target) rows with each target once, taken by its first source: two query keypoints with
    the very same descriptor both reach a gallery keypoint's nearest similarity, and only one can be its neighbour."""
    _, first = np.unique(target, return_index=True)
    return np.stack([source[first], target[first]], axis=1).astype(np.intp)


def consensus(src: np.ndarray, dst: np.ndarray, cfg: SiftConfig) -> int:
    """Matched points (src (m, 2) -> dst (m, 2)) that agree with one transform of cfg.geometry: USAC with MAGSAC++
    for a homography, OpenCV's RANSAC for a partial affine (its estimator takes no USAC method); 0 below the fewest
    points the estimator accepts."""
    if len(src) < MIN_MATCHES[cfg.geometry]:
        return 0
    src, dst = src.reshape(-1, 1, 2).astype(np.float32), dst.reshape(-1, 1, 2).astype(np.float32)
    if cfg.geometry == "homography":
        # USAC draws its samples from a generator it seeds itself, so the counts repeat run to run
        _, status = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, cfg.ransac_px, maxIters=RANSAC_ITERS,
                                       confidence=RANSAC_CONFIDENCE)
    else:
        # plain RANSAC samples from OpenCV's per-thread generator: seeded here, in the thread that matches, so the
        # counts do not depend on the number of workers
        cv2.setRNGSeed(0)
        _, status = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.ransac_px,
                                                maxIters=RANSAC_ITERS, confidence=RANSAC_CONFIDENCE)
    return 0 if status is None else int(status.sum())


def query_inliers(query: tuple[np.ndarray, np.ndarray], gallery: list, cfg: SiftConfig = SiftConfig()) -> np.ndarray:
    """(len(gallery),) float32 inliers of one query's (keypoints, descriptors) against each gallery photo's: the
    mutual, ratio-tested matches of shortlist_matches, then the consensus of each pair's matches."""
    pts, desc = query
    matches = shortlist_matches(desc, [d for _, d in gallery], cfg.ratio)
    return np.array([consensus(pts[m[:, 0]], g_pts[m[:, 1]], cfg) for m, (g_pts, _) in zip(matches, gallery)],
                    np.float32)


def count_inliers(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                  cfg: SiftConfig = SiftConfig()) -> int:
    """Inliers of one pair: a's features matched against b's alone (query_inliers with a one-photo shortlist)."""
    return int(query_inliers(a, [b], cfg)[0])


@contextmanager
def one_thread_each():
    """OpenCV and BLAS limited to one thread while a pool of workers keeps every core busy: their own threads on top
    of the pool's would only contend for the cores."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        cv2.setNumThreads(threads)


def in_threads(work: Callable, items: Iterable, workers: int | None = None) -> list:
    """[work(item) for item in items], `workers` items at a time (default: one per usable core). Threads suffice:
    OpenCV, PIL's decoders and BLAS release the GIL while they work."""
    items = list(items)
    workers = min(workers or usable_cpus(), max(len(items), 1))
    if workers == 1:
        return [work(item) for item in items]
    with one_thread_each(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, items))


def pair_inliers(pairs: list, cfg: SiftConfig = SiftConfig(), workers: int | None = None) -> np.ndarray:
    """(n,) float32 inliers of each (a, b) feature pair: the pairs that share a query (the same `a` object) are
    matched in one query_inliers step, the queries `workers` at a time. A pair's count depends only on its two
    photos (up to the float rounding of the matrix product), not on the other photos of its step nor on the number
    of workers."""
    groups: dict[int, list[int]] = {}
    for n, (a, _) in enumerate(pairs):
        groups.setdefault(id(a), []).append(n)
    counts = np.zeros(len(pairs), np.float32)
    per_query = in_threads(lambda rows: query_inliers(pairs[rows[0]][0], [pairs[n][1] for n in rows], cfg),
                           groups.values(), workers)
    for rows, got in zip(groups.values(), per_query):
        counts[rows] = got
    return counts


def shortlist_pairs(n_queries: int, candidates: np.ndarray) -> list[tuple[int, int]]:
    """(query i, gallery row) of each shortlist entry, row by row; candidates: (n_queries, K) gallery rows."""
    candidates = np.asarray(candidates)
    if candidates.ndim != 2 or len(candidates) != n_queries:
        raise ValueError(f"candidates must be (n_q={n_queries}, K), got shape {candidates.shape}")
    return [(i, int(g)) for i, row in enumerate(candidates) for g in row]


def shortlist_inliers(query_features: list, gallery_features: list, candidates: np.ndarray,
                      cfg: SiftConfig = SiftConfig(), workers: int | None = None) -> np.ndarray:
    """(n_q, K) float32 inlier counts: query i against gallery candidates[i, j] (candidates: (n_q, K) int rows)."""
    pairs = shortlist_pairs(len(query_features), candidates)
    counts = pair_inliers([(query_features[i], gallery_features[g]) for i, g in pairs], cfg, workers)
    return counts.reshape(np.shape(candidates))
