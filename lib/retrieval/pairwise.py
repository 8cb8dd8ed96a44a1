"""Re-identification outputs: the all-vs-all similarity table that re-ID competitions take as a submission."""
from __future__ import annotations

import numpy as np
import pandas as pd

from lib.retrieval.faiss_index import unit_rows
from lib.retrieval.ranking import query_chunks


def pairwise_scores(query_emb, query_ids, gallery_emb, gallery_ids, exclude_self: bool = False,
                    top: int | None = None) -> pd.DataFrame:
    """One row per (query, gallery) pair with the cosine similarity of their embeddings, each query's pairs
    highest first; `top` keeps each query's best `top`. exclude_self: queries are the gallery (same rows, same
    order) and a photo is not paired with itself."""
    q, g = unit_rows(query_emb, "query embeddings"), unit_rows(gallery_emb, "gallery embeddings")
    if len(q) != len(query_ids) or len(g) != len(gallery_ids):
        raise ValueError(f"{len(q)} query embeddings for {len(query_ids)} ids, {len(g)} gallery embeddings for "
                         f"{len(gallery_ids)} ids")
    if exclude_self and len(q) != len(g):
        raise ValueError("exclude_self needs the queries to be the gallery")
    keep = len(g) - exclude_self if top is None else min(top, len(g) - exclude_self)
    parts = []
    # a chunk of queries at a time, so a large gallery never needs its whole (queries x gallery) score matrix
    for rows in query_chunks(len(q), len(g)):
        scores = q[rows] @ g.T
        if exclude_self:
            scores[np.arange(len(rows)), rows] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        parts.append(pd.DataFrame({"query": np.asarray(query_ids)[np.repeat(rows, keep)],
                                   "gallery": np.asarray(gallery_ids)[order.ravel()],
                                   "score": np.take_along_axis(scores, order, axis=1).ravel()}))
    return pd.concat(parts, ignore_index=True)
