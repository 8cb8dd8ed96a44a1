"""WildFusion-style score fusion (Cermak et al. 2024).

Similarity scores of different kinds (global cosine in [-1, 1], local-feature inlier counts in 0..hundreds) cannot
be averaged as they are. Each score is first calibrated into P(same identity) by an increasing isotonic regression
fitted on pairs whose answer is known (a validation split); the calibrated scores share one scale and are averaged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.isotonic import IsotonicRegression


@dataclass
class ScoreFusion:
    calibrators: dict = field(default_factory=dict)  # score name -> fitted IsotonicRegression

    def fit(self, scores: dict[str, np.ndarray], same: np.ndarray) -> "ScoreFusion":
        """Fit one calibrator per score; replaces any earlier ones.

        scores: name -> 1-D array of raw scores of the calibration pairs (higher = more similar); same: bool array,
        True where the pair shows one identity. Needs both classes present.
        """
        same = np.asarray(same)
        if same.ndim != 1 or same.dtype != bool:
            raise ValueError(f"same must be a 1-D bool array, got shape {same.shape} dtype {same.dtype}")
        positives, negatives = int(same.sum()), int((~same).sum())
        if positives == 0 or negatives == 0:
            raise ValueError(f"calibration needs both same and different pairs, got {positives} positive and "
                             f"{negatives} negative pairs")
        if not scores:
            raise ValueError("scores is empty: nothing to calibrate")
        calibrators = {}
        for name, raw in scores.items():
            raw = np.asarray(raw, dtype=np.float64)
            if raw.shape != same.shape:
                raise ValueError(f"score {name!r} has shape {raw.shape} but same has {same.shape}")
            if not np.isfinite(raw).all():
                raise ValueError(f"score {name!r} contains NaN or inf")
            # clip: a score beyond the calibration range gets the probability of the nearest seen score
            # fitted to 0/1 answers, the step function's values are already in [0, 1]
            calibrator = IsotonicRegression(increasing=True, out_of_bounds="clip")
            calibrators[name] = calibrator.fit(raw, same.astype(np.float64))
        self.calibrators = calibrators
        return self

    def calibrated(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each score mapped to P(same) by its calibrator; arrays of any shape (e.g. (n_q, K)) keep their shape."""
        out = {}
        for name, raw in scores.items():
            if name not in self.calibrators:
                raise ValueError(f"no calibrator for score {name!r}; fitted: {sorted(self.calibrators)}")
            raw = np.asarray(raw, dtype=np.float64)
            out[name] = self.calibrators[name].predict(raw.ravel()).reshape(raw.shape)
        return out

    def fuse(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """Mean of the calibrated scores; every fitted score must be given, and only those."""
        if not scores:
            raise ValueError("scores is empty: nothing to fuse")
        missing = sorted(set(self.calibrators) - set(scores))
        if missing:
            raise ValueError(f"fitted scores {missing} are missing from scores (given: {sorted(scores)})")
        calibrated = self.calibrated(scores)
        shapes = {name: p.shape for name, p in calibrated.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"scores must all have one shape to be fused, got {shapes}")
        return np.mean(list(calibrated.values()), axis=0)
