"""Features of (query, candidate) pairs for the hybrid scorer, from the two photos' features and the scores the
probe already has. Feature groups (what a user chooses in `hybrid_features`) and the columns each gives:

- cosine: the deep cosine, and its gap below the query's best candidate (a query-relative score: boosted trees
  score pairs of all queries on one scale, and some queries' candidates are all close);
- colour / lbp: chi-square distance of the two photos' histograms;
- hog: 1 - cosine of the two HOG vectors;
- keypoints: the fewer and the more SIFT keypoints of the two photos (inliers mean more beside many keypoints);
- inliers: SIFT + RANSAC inliers of the pair.
"""
from __future__ import annotations

import numpy as np

HYBRID_FEATURES = ("cosine", "colour", "lbp", "hog", "keypoints", "inliers")
SIFT_GROUPS = {"keypoints", "inliers"}  # groups that need the photos' SIFT features


def chi2_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """0.5 * sum((a - b)^2 / (a + b)) over the last axis, of histograms (non-negative); bins empty in both add 0."""
    total = a + b
    return 0.5 * np.divide((a - b) ** 2, total, out=np.zeros_like(total), where=total > 0).sum(axis=-1)


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return 1 - np.divide((a * b).sum(axis=-1), norms, out=np.zeros(norms.shape, np.float32), where=norms > 0)


def pair_features(top: np.ndarray, cos: np.ndarray, groups, query_photos: dict | None = None,
                  gallery_photos: dict | None = None, query_keypoints=None, gallery_keypoints=None,
                  inliers: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{column: (n_q, K) float32} of the chosen groups for query i and gallery photo top[i, j].

    top, cos: (n_q, K) candidate gallery rows and their cosines; query_photos / gallery_photos: {'colour', 'lbp',
    'hog'}: (n, d) photo features (lib.probe.photo_features); *_keypoints: (n,) SIFT keypoint counts; inliers:
    (n_q, K). Each group's inputs are needed only when the group is chosen."""
    unknown = sorted(set(groups) - set(HYBRID_FEATURES))
    if unknown or not groups:
        raise ValueError(f"hybrid feature groups {unknown or list(groups)}: choose from {', '.join(HYBRID_FEATURES)}")
    top, cos = np.asarray(top), np.asarray(cos, dtype=np.float32)
    if top.shape != cos.shape or top.ndim != 2:
        raise ValueError(f"top and cos must be (n_q, K) of one shape, got {top.shape} and {cos.shape}")
    out = {}
    if "cosine" in groups:
        out["cosine"] = cos
        out["cosine_gap"] = cos.max(axis=1, keepdims=True) - cos
    for group, distance, column in (("colour", chi2_distance, "colour_chi2"), ("lbp", chi2_distance, "lbp_chi2"),
                                    ("hog", _cosine_distance, "hog_distance")):
        if group in groups:
            if query_photos is None or gallery_photos is None:
                raise ValueError(f"feature group {group!r} needs the photos' features")
            q, g = query_photos[group], gallery_photos[group]
            if len(q) != len(top):
                raise ValueError(f"feature group {group!r}: {len(q)} query rows for {len(top)} queries")
            out[column] = distance(q[:, None, :], g[top])
    if "keypoints" in groups:
        if query_keypoints is None or gallery_keypoints is None:
            raise ValueError("feature group 'keypoints' needs the photos' keypoint counts")
        q, g = np.asarray(query_keypoints)[:, None], np.asarray(gallery_keypoints)[top]
        out["keypoints_min"], out["keypoints_max"] = np.minimum(q, g), np.maximum(q, g)
    if "inliers" in groups:
        if inliers is None or np.shape(inliers) != top.shape:
            raise ValueError(f"feature group 'inliers' needs (n_q, K) = {top.shape} inlier counts, "
                             f"got {None if inliers is None else np.shape(inliers)}")
        out["inliers"] = inliers
    return {name: np.asarray(v, dtype=np.float32) for name, v in out.items()}
