"""Re-identification outputs: the all-vs-all similarity table that re-ID competitions take as a submission."""
from __future__ import annotations

import numpy as np
import pandas as pd

from lib.retrieval.exclusion import Exclusion, check_sizes, fewest_left_out
from lib.retrieval.faiss_index import unit_rows
from lib.retrieval.ranking import query_chunks


def pairwise_scores(query_emb, query_ids, gallery_emb, gallery_ids, exclude: Exclusion | None = None,
                    top: int | None = None) -> pd.DataFrame:
    """One row per (query, gallery) pair with the cosine similarity of their embeddings, each query's pairs
    highest first; `top` keeps each query's best `top`. exclude (lib.retrieval.exclusion; a RetrievalSplit's): the
    pairs it leaves out are not listed, e.g. under leave-one-out a photo with itself, or with the photos of its
    group."""
    q, g = unit_rows(query_emb, "query embeddings"), unit_rows(gallery_emb, "gallery embeddings")
    if len(q) != len(query_ids) or len(g) != len(gallery_ids):
        raise ValueError(f"{len(q)} query embeddings for {len(query_ids)} ids, {len(g)} gallery embeddings for "
                         f"{len(gallery_ids)} ids")
    check_sizes(exclude, len(q), len(g))
    most = len(g) - fewest_left_out(exclude)
    keep = most if top is None else min(top, most)
    parts = []
    # a chunk of queries at a time, so a large gallery never needs its whole (queries x gallery) score matrix
    for rows in query_chunks(len(q), len(g)):
        scores = q[rows] @ g.T
        if exclude is not None:
            exclude.for_queries(rows).fill(scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        best = np.take_along_axis(scores, order, axis=1)
        paired = np.isfinite(best)  # a query in a large group has fewer pairs than `keep`
        parts.append(pd.DataFrame({"query": np.asarray(query_ids)[np.repeat(rows, keep)[paired.ravel()]],
                                   "gallery": np.asarray(gallery_ids)[order[paired]],
                                   "score": best[paired]}))
    return pd.concat(parts, ignore_index=True)
