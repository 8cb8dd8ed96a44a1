"""Local-feature matching to re-rank a global retrieval shortlist: SIFT, Lowe's ratio test, RANSAC inliers.

A global embedding ranks the gallery; the few top candidates per query are then re-scored by how many
keypoint matches agree with one geometric transform. Plain OpenCV SIFT, so nothing is downloaded.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

GEOMETRIES = ("homography", "affine")
MIN_MATCHES = {"homography": 4, "affine": 2}  # fewest point pairs each OpenCV estimator accepts
# RANSAC's cap on samples (OpenCV's default is 2000). A true pair's consensus is found early and ends the search;
# an unrelated pair runs to the cap, which at 2000 was most of a pair's time. At 500 the lions probe (Lite0, val
# leave-one-out, local and fusion) ranked exactly as before, and unrelated pairs kept about their chance inliers
# (docs/benchmarks.md, "Probe methods").
RANSAC_ITERS = 500


@dataclass(frozen=True)
class SiftConfig:
    max_side: int = 512  # images scaled (never up) so their longer side is at most this before detection
    n_features: int = 1000  # cv2.SIFT_create(nfeatures=...); 0 keeps every keypoint
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


def count_inliers(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                  cfg: SiftConfig = SiftConfig()) -> int:
    """Matches of a's descriptors to b's that pass the ratio test, are one-to-one, and agree with one RANSAC geometry.

    0 when either side has fewer than 2 descriptors (the ratio test needs two neighbours) or fewer matches
    survive than the geometry needs (4 for a homography, 2 for a partial affine).
    """
    (pts_a, desc_a), (pts_b, desc_b) = a, b
    if len(desc_a) < 2 or len(desc_b) < 2:
        return 0
    # float32 always: OpenCV's brute-force L2 matcher is vectorised for float32 only, and on uint8 (the probe's
    # compact store, same distances) it is several times slower (docs/benchmarks.md, "Figures behind lib's defaults").
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc_a.astype(np.float32, copy=False),
                                               desc_b.astype(np.float32, copy=False), k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < cfg.ratio * p[1].distance]
    # One match per keypoint of b (the nearest): otherwise many of a's keypoints can pile onto one of b's and
    # a degenerate transform that collapses them to that point counts them all (unrelated images got ~25).
    one_to_one: dict[int, cv2.DMatch] = {}
    for m in sorted(good, key=lambda m: m.distance):
        one_to_one.setdefault(m.trainIdx, m)
    good = list(one_to_one.values())
    if len(good) < MIN_MATCHES[cfg.geometry]:
        return 0
    src = pts_a[[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = pts_b[[m.trainIdx for m in good]].reshape(-1, 1, 2)
    # RANSAC samples at random: a fixed seed keeps re-ranked lists identical run to run, and since OpenCV's RNG is
    # per thread, seeding it here, in the thread that matches, keeps them identical for any number of workers.
    cv2.setRNGSeed(0)
    if cfg.geometry == "homography":
        _, status = cv2.findHomography(src, dst, cv2.RANSAC, cfg.ransac_px, maxIters=RANSAC_ITERS)
    else:
        _, status = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.ransac_px,
                                                maxIters=RANSAC_ITERS)
    return 0 if status is None else int(status.sum())


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pair_inliers(pairs: list, cfg: SiftConfig = SiftConfig(), workers: int | None = None) -> np.ndarray:
    """(n,) float32 count_inliers of each (a, b) feature pair, `workers` pairs at a time (default: one per usable
    core). Threads suffice because OpenCV releases the GIL while matching; each pair is still matched alone, with
    its own RANSAC seed, so the counts do not depend on the number of workers."""
    workers = min(workers or default_workers(), max(len(pairs), 1))
    if workers == 1:
        return np.array([count_inliers(a, b, cfg) for a, b in pairs], np.float32)
    threads = cv2.getNumThreads()
    # One OpenCV thread per worker: the pool already keeps every core busy, and OpenCV's own threads on top of it
    # would only contend for them.
    cv2.setNumThreads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return np.fromiter(pool.map(lambda pair: count_inliers(*pair, cfg), pairs), np.float32, len(pairs))
    finally:
        cv2.setNumThreads(threads)


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
