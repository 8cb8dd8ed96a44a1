"""The one ranking-metrics engine: recall@k (CMC), per-query AP, mAP and identity-balanced mAP of gallery rankings,
gathered a chunk of queries at a time so memory stays bounded for large splits. Training validation and evaluation
feed it Faiss rankings (evaluate_retrieval); the probe feeds it the rankings of each of its methods.
"""
from __future__ import annotations

import numpy as np

from lib.retrieval.exclusion import NO_NEIGHBOUR, Exclusion, check_sizes, fewest_left_out, most_left_out
from lib.retrieval.faiss_index import build_index, clip_k, knn, unit_queries
from lib.retrieval.metrics import average_precision, identity_balanced_map, recall_at_k, relevance, summarize_ap

# (query, gallery) pairs ranked at once; each pair costs ~30 bytes of temporaries (score, ranking, label code,
# relevance, cumulative precision), so ~0.25 GB per chunk, and under leave-one-out ~20 more (the ranking without the
# left-out rows and its sort order)
RANK_PAIRS = 2**23
GPU_MAX_K = 2048  # faiss-gpu's k-selection limit (GPU_MAX_SELECTION_K): a full ranking beyond it runs on the CPU


def query_chunks(n_queries: int, n_gallery: int, pairs: int | None = None) -> list[np.ndarray]:
    """Query row chunks small enough that a chunk's (queries x gallery) rankings hold at most `pairs` cells
    (RANK_PAIRS by default)."""
    size = max(1, (pairs or RANK_PAIRS) // max(n_gallery, 1))
    return [np.arange(start, min(start + size, n_queries)) for start in range(0, n_queries, size)]


def _label_codes(gallery_labels: np.ndarray, query_labels: np.ndarray):
    """(gallery codes, query codes (-1 = label not in the gallery), gallery count of each query's label).

    Integer codes keep the ranked-label matrix at 8 bytes a cell where strings such as '<U30' take 120.
    """
    names, gallery_codes, counts = np.unique(gallery_labels, return_inverse=True, return_counts=True)
    pos = np.searchsorted(names, query_labels).clip(max=len(names) - 1)
    known = relevance(query_labels, names[pos][:, None])[:, 0]  # also refuses int labels against str ones
    return gallery_codes, np.where(known, pos, -1), np.where(known, counts[pos], 0)


class RankingTally:
    """Ranking metrics gathered a chunk of queries at a time.

    add(rows, ranked): `ranked` holds gallery rows best first for the queries `rows` (the whole gallery, or the first
    max_rank of it; NO_NEIGHBOUR entries are padding). With `exclude` (lib.retrieval.exclusion: leave-one-out's own
    photo, or its whole group) the rows it leaves out are taken out of each ranking here and out of the query's count
    of relevant items: junk, neither match nor miss. A relevant item beyond a truncated ranking counts as never
    retrieved (AP divides by the whole gallery's count), so a truncated mAP is a lower bound.
    keep: the first `keep` gallery rows of each ranking are kept for the metrics' 'top' (and their distances, where
    add is given them, for 'top_distances').
    """

    def __init__(self, gallery_labels, query_labels, exclude: Exclusion | None = None, ks=(1, 5), keep: int = 0):
        self.query_labels, self.ks, self.keep, self.exclude = np.asarray(query_labels), tuple(ks), keep, exclude
        self.gallery_codes, self.query_codes, n_relevant = _label_codes(np.asarray(gallery_labels), self.query_labels)
        check_sizes(exclude, len(self.query_labels), len(self.gallery_codes))
        if exclude is not None:
            n_relevant = n_relevant - exclude.relevant_counts(self.gallery_codes, self.query_codes)
        self.n_relevant = n_relevant
        self.ap, self.ranked, self.top, self.top_distances = [], [], [], []

    def add(self, rows: np.ndarray, ranked: np.ndarray, width: int | None = None,
            distances: np.ndarray | None = None) -> None:
        """width: the ranking's columns kept after the left-out rows are taken out (max_rank); distances: the
        ranking's (same shape), for 'top_distances'."""
        if self.exclude is not None:
            dropped = self.exclude.for_queries(rows).drop(ranked, distances, width=width)
            ranked, distances = dropped if distances is not None else (dropped, None)
        # padding's code -2 matches no query (a label missing from the gallery is -1)
        codes = np.where(ranked == NO_NEIGHBOUR, -2, self.gallery_codes[ranked])
        self.ap.append(average_precision(codes == self.query_codes[rows, None], self.n_relevant[rows]))
        # copies: a slice would keep the chunk's whole ranking alive
        self.ranked.append(codes[:, :max(self.ks)].copy())
        if self.keep:
            self.top.append(ranked[:, :self.keep].copy())
            if distances is not None:
                self.top_distances.append(distances[:, :self.keep].copy())

    def metrics(self) -> dict:
        """{'recall@k'..., 'mAP', 'identity_balanced_mAP', 'n_queries', 'n_queries_without_relevant', 'ap': each
        query's AP (NaN without a relevant item)} and, with keep, 'top' (NO_NEIGHBOUR past a short ranking's end) and
        'top_distances' (inf there) where distances were added.
        Recall@k averages over all queries (a query whose label is not in the gallery, or only among its left-out
        rows, is a miss); mAP over the queries with a relevant item."""
        ap = np.concatenate(self.ap)
        mean_ap, n_without = summarize_ap(ap)
        out = {**recall_at_k(self.query_codes, np.concatenate(self.ranked), self.ks), "mAP": mean_ap,
               "identity_balanced_mAP": identity_balanced_map(self.query_labels, ap), "n_queries": len(ap),
               "n_queries_without_relevant": n_without, "ap": ap}
        if self.keep:
            out["top"] = np.concatenate(self.top)
        if self.top_distances:
            out["top_distances"] = np.concatenate(self.top_distances)
        return out


def ranking_metrics(order: np.ndarray, gallery_labels, query_labels, exclude: Exclusion | None = None,
                    ks=(1, 5)) -> dict:
    """RankingTally.metrics of full rankings `order` (n_q, n_g: gallery rows best first) given at once; the rows
    `exclude` leaves out (e.g. leave-one-out's own row, or group) are dropped from each ranking here."""
    order = np.asarray(order)
    tally = RankingTally(gallery_labels, query_labels, exclude, ks)
    tally.add(np.arange(len(order)), order)
    return tally.metrics()


# 9 parameters: two (embeddings, labels) pairs, which benches and tests hand in as arrays, the rule and the options
def evaluate_retrieval(gallery_emb, gallery_labels, query_emb, query_labels, exclude: Exclusion | None = None,
                       ks=(1, 5), max_rank=None, device="auto", keep: int = 0) -> dict:
    """Recall@k and exact mAP of ranking the gallery by Faiss for each query (RankingTally.metrics, with each query's
    AP under 'ap'; with `keep`, 'top' and 'top_distances': each query's first `keep` gallery rows and their squared
    L2 distances, as lib.retrieval.faiss_index.search gives them, left-out rows already out).

    mAP is exact: every query ranks the whole gallery (k = gallery size), RANK_PAIRS pairs at a time, so memory
    stays bounded whatever the gallery (a million photos: 8 queries a chunk; no queries x gallery matrix), while
    the time grows with queries x gallery. `max_rank` truncates the ranking (a lower bound on mAP).
    exclude (lib.retrieval.exclusion; a RetrievalSplit's): the gallery rows each query may not find, e.g. under
    leave-one-out (the queries are the gallery) each query's own row, or its whole group; they leave its ranking and
    its count of relevant items.
    """
    gallery_labels, query_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    for what, emb, labels in (("gallery", gallery_emb, gallery_labels), ("query", query_emb, query_labels)):
        if len(emb) != len(labels):
            raise ValueError(f"{what}: {len(emb)} embeddings but {len(labels)} labels")
    if max_rank is not None and max_rank < max(ks):
        raise ValueError(f"max_rank={max_rank} is below the largest k in ks={ks}")
    tally = RankingTally(gallery_labels, query_labels, exclude, ks, keep)
    k = clip_k(max_rank or len(gallery_labels), len(gallery_labels) - fewest_left_out(exclude))
    # faiss ranks k plus the most rows any query leaves out; the tally takes them out and keeps k
    searched = min(k + most_left_out(exclude), len(gallery_labels))
    index = build_index(gallery_emb, device if searched <= GPU_MAX_K else "cpu")
    q = unit_queries(index, query_emb)
    for rows in query_chunks(len(q), searched):
        distances, ranked = knn(index, q[rows], searched)
        tally.add(rows, ranked, width=k, distances=distances if keep else None)
    return tally.metrics()
