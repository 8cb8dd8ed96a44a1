"""Boosted hybrid scorer: gradient-boosted trees (LightGBM) turn a pair's features (the deep cosine beside engineered
colour, texture and keypoint features; lib.probe.pair_features) into P(same identity), and the shortlist is
re-sorted by it. Trees find thresholds and interactions that an average of calibrated scores cannot (many inliers
count only when both photos have keypoints to spare), and their gain per feature says what the score leaned on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from lightgbm import LGBMClassifier

# Small trees, many gentle steps: a probe's pairs are a few thousand with a few hundred positives, where deep
# trees memorise individuals. One thread: the fit takes a second, and the machine's cores are busy elsewhere.
DEFAULT_PARAMS = {"n_estimators": 200, "learning_rate": 0.05, "num_leaves": 7, "min_child_samples": 20,
                  "subsample": 0.8, "subsample_freq": 1, "reg_lambda": 1.0, "random_state": 0, "n_jobs": 1,
                  "deterministic": True, "force_row_wise": True, "verbose": -1}


def gbm_params(overrides: dict | None = None) -> dict:
    """DEFAULT_PARAMS updated by `overrides`; a name that is no LGBMClassifier parameter is an error listing them."""
    overrides = dict(overrides or {})
    valid = set(LGBMClassifier().get_params()) | set(DEFAULT_PARAMS)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown LightGBM parameter(s) {unknown}; valid: {sorted(valid)}")
    return {**DEFAULT_PARAMS, **overrides}


def _matrix(features: dict[str, np.ndarray], names: list[str] | None = None) -> tuple[np.ndarray, tuple]:
    """((n_pairs, n_features) matrix, the features' common shape) of a {name: array} of one shape each."""
    if not features:
        raise ValueError("features is empty: nothing to score")
    if names is not None and sorted(features) != sorted(names):
        raise ValueError(f"features {sorted(features)} are not the ones fitted: {sorted(names)}")
    names = names or list(features)
    shapes = {n: np.shape(features[n]) for n in names}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"features must all have one shape, got {shapes}")
    return np.stack([np.asarray(features[n], dtype=np.float64).ravel() for n in names], axis=1), shapes[names[0]]


@dataclass
class HybridScorer:
    params: dict = field(default_factory=dict)  # LightGBM overrides of DEFAULT_PARAMS
    names: list = field(default_factory=list)   # feature names, in the fitted model's column order
    model: LGBMClassifier | None = None

    def fit(self, features: dict[str, np.ndarray], same: np.ndarray) -> "HybridScorer":
        """features: {name: array} of the training pairs, any one shape (e.g. (n_q, K) shortlists); same: bool array
        of that shape, True where the pair shows one identity. Needs both kinds of pair."""
        x, shape = _matrix(features)
        same = np.asarray(same)
        if same.dtype != bool or same.shape != shape:
            raise ValueError(f"same must be a bool array of the features' shape {shape}, got {same.dtype} {same.shape}")
        positives, negatives = int(same.sum()), int((~same).sum())
        if positives == 0 or negatives == 0:
            raise ValueError(f"the hybrid scorer needs both same and different pairs to learn from, got {positives} "
                             f"positive and {negatives} negative pairs")
        if np.isinf(x).any():
            raise ValueError("features contain inf (NaN is allowed: LightGBM treats it as missing)")
        self.names = list(features)
        self.model = LGBMClassifier(**gbm_params(self.params)).fit(pd.DataFrame(x, columns=self.names),
                                                                    same.ravel())
        return self

    def score(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """P(same identity) of each pair, in the features' shape."""
        if self.model is None:
            raise ValueError("the hybrid scorer is not fitted yet: call fit first")
        x, shape = _matrix(features, self.names)
        return self.model.predict_proba(pd.DataFrame(x, columns=self.names))[:, 1].reshape(shape)

    def importances(self) -> pd.Series:
        """Each feature's share of the trees' total split gain, largest first (zeros if no split was made)."""
        if self.model is None:
            raise ValueError("the hybrid scorer is not fitted yet: call fit first")
        gain = self.model.booster_.feature_importance(importance_type="gain")
        share = gain / gain.sum() if gain.sum() > 0 else gain
        return pd.Series(share, index=self.names, name="gain share").sort_values(ascending=False)
