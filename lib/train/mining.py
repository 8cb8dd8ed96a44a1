"""Hard-context mining: contexts whose val queries fail more often are sampled more often."""
from __future__ import annotations

import numpy as np
import pandas as pd


def context_error(contexts, hits) -> pd.Series:
    """Share of top-1 misses among the queries of each context."""
    return 1.0 - pd.Series(np.asarray(hits, dtype=float)).groupby(np.asarray(contexts)).mean()


def mining_weights(errors: pd.Series, floor: float = 0.25) -> dict:
    """Sampling weight per context, mean 1: a `floor` share stays uniform so that contexts the model already
    gets right are still revisited (and so never forgotten); the rest follows each context's error."""
    if errors.empty or errors.sum() == 0:
        return {c: 1.0 for c in errors.index}
    share = errors / errors.mean()
    return {c: float(floor + (1 - floor) * w) for c, w in share.items()}


def mined_context_weights(query_contexts, hits, sampled_contexts) -> tuple[dict, str]:
    """(sampling weight per context the sampler draws from, the three worst contexts as text for the metrics log)
    from one validation's top-1 hits."""
    errors = context_error(query_contexts, hits)
    weights = mining_weights(errors[errors.index.isin(sampled_contexts)])
    worst = errors.sort_values(ascending=False).head(3)
    return weights, "; ".join(f"{c} {e:.2f}" for c, e in worst.items())
