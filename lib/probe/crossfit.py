"""Learned scorers fitted where the answers are known, never on the identity they score.

A scorer fitted on pairs of the probed split itself (fusion's calibrators, the ensemble's weights, the hybrid's
boosted trees) would score its own training pairs and flatter itself. So the identities are split in two halves
and each half's queries are scored by the model fitted on the other half's; a model fitted on another split
scores every query.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def identity_halves(labels: np.ndarray) -> np.ndarray:
    """0/1 per query: its identity's half of the sorted identities, alternating, so both halves hold similar mixes."""
    names = np.unique(labels)
    return (np.searchsorted(names, labels) % 2).astype(int)


@dataclass
class QueryModels:
    """models[h] scores the queries whose half[i] is h."""
    models: list
    half: np.ndarray

    def apply(self, rows: np.ndarray, score: Callable) -> np.ndarray:
        """score(model, its rows) for the query rows `rows` (integer indices), each row scored by its own model,
        assembled in the order of `rows`."""
        rows = np.asarray(rows)
        out = None
        for h, model in enumerate(self.models):
            mine = self.half[rows] == h
            if mine.any():
                part = np.asarray(score(model, rows[mine]))
                if out is None:
                    out = np.empty((len(rows), *part.shape[1:]), dtype=part.dtype)
                out[mine] = part
        return out

    def in_use(self) -> list:
        """The models that score some query (a half with no query has none)."""
        return [m for h, m in enumerate(self.models) if (self.half == h).any()]


def fitted_once(model, n_queries: int) -> QueryModels:
    """One model (fitted on another split) for all n_queries."""
    return QueryModels([model], np.zeros(n_queries, dtype=int))


def cross_fit(labels: np.ndarray, fit: Callable[[np.ndarray], object]) -> QueryModels:
    """fit(rows) (rows: a bool mask of the queries to fit on) once per identity half, on the other half's queries."""
    half = identity_halves(np.asarray(labels))
    return QueryModels([fit(half != h) if (half == h).any() else None for h in (0, 1)], half)
