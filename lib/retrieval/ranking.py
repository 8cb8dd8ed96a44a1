"""The one ranking-metrics engine: recall@k (CMC), per-query AP, mAP and identity-balanced mAP of gallery rankings,
gathered a chunk of queries at a time so memory stays bounded for large splits. Training validation and evaluation
feed it Faiss rankings (evaluate_retrieval); the probe feeds it the rankings of each of its methods.

Also the validation protocol: the train split as gallery, or the split leave-one-out when it shares no label with it.
"""
from __future__ import annotations

import numpy as np

from lib.retrieval.exclusion import NO_NEIGHBOUR, Exclusion, loo_exclusion
from lib.retrieval.faiss_index import build_index, clip_k, knn, unit_queries
from lib.retrieval.metrics import average_precision, identity_balanced_map, recall_at_k, relevance, summarize_ap

# (query, gallery) pairs ranked at once; each pair costs ~30 bytes of temporaries (score, ranking, label code,
# relevance, cumulative precision), so ~0.25 GB per chunk, and under leave-one-out ~20 more (the ranking without the
# left-out rows and its sort order)
RANK_PAIRS = 2**23
GPU_MAX_K = 2048  # faiss-gpu's k-selection limit (GPU_MAX_SELECTION_K): a full ranking beyond it runs on the CPU
VAL_PROTOCOLS = ("auto", "gallery", "loo")


def resolve_val_protocol(protocol: str, gallery_labels, query_labels) -> str:
    """'gallery' or 'loo' for a requested protocol; 'auto' is 'loo' when no query label occurs in the gallery
    (open-set: the split's individuals were never seen in training)."""
    if protocol not in VAL_PROTOCOLS:
        raise ValueError(f"val_protocol={protocol!r}; valid: {', '.join(VAL_PROTOCOLS)}")
    if protocol == "auto":
        return "loo" if not set(np.asarray(query_labels).tolist()) & set(np.asarray(gallery_labels).tolist()) else "gallery"
    return protocol


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
    keep: the first `keep` gallery rows of each ranking are kept for the metrics' 'top'.
    """

    def __init__(self, gallery_labels, query_labels, exclude: Exclusion | None = None, ks=(1, 5), keep: int = 0):
        self.query_labels, self.ks, self.keep, self.exclude = np.asarray(query_labels), tuple(ks), keep, exclude
        self.gallery_codes, self.query_codes, n_relevant = _label_codes(np.asarray(gallery_labels), self.query_labels)
        if exclude is not None:
            n_relevant = n_relevant - exclude.relevant_counts(self.gallery_codes, self.query_codes)
        self.n_relevant = n_relevant
        self.ap, self.ranked, self.top = [], [], []

    def add(self, rows: np.ndarray, ranked: np.ndarray, width: int | None = None) -> None:
        """width: the ranking's columns kept after the left-out rows are taken out (max_rank)."""
        if self.exclude is not None:
            ranked = self.exclude.of(rows).drop(ranked, width=width)
        # padding's code -2 matches no query (a label missing from the gallery is -1)
        codes = np.where(ranked == NO_NEIGHBOUR, -2, self.gallery_codes[ranked])
        self.ap.append(average_precision(codes == self.query_codes[rows, None], self.n_relevant[rows]))
        # copies: a slice would keep the chunk's whole ranking alive
        self.ranked.append(codes[:, :max(self.ks)].copy())
        if self.keep:
            self.top.append(ranked[:, :self.keep].copy())

    def metrics(self) -> dict:
        """{'recall@k'..., 'mAP', 'identity_balanced_mAP', 'n_queries', 'n_queries_without_relevant', 'ap': each
        query's AP (NaN without a relevant item)} and, with keep, 'top' (NO_NEIGHBOUR past a short ranking's end).
        Recall@k averages over all queries (a query whose label is not in the gallery, or only among its left-out
        rows, is a miss); mAP over the queries with a relevant item."""
        ap = np.concatenate(self.ap)
        mean_ap, n_without = summarize_ap(ap)
        out = {**recall_at_k(self.query_codes, np.concatenate(self.ranked), self.ks), "mAP": mean_ap,
               "identity_balanced_mAP": identity_balanced_map(self.query_labels, ap), "n_queries": len(ap),
               "n_queries_without_relevant": n_without, "ap": ap}
        return {**out, "top": np.concatenate(self.top)} if self.keep else out


def ranking_metrics(order: np.ndarray, gallery_labels, query_labels, loo: bool, ks=(1, 5), groups=None) -> dict:
    """RankingTally.metrics of full rankings `order` (n_q, n_g: gallery rows best first) given at once. loo: queries
    are the gallery and each query's own row (with `groups`, its group's rows) is dropped from its ranking here."""
    order = np.asarray(order)
    tally = RankingTally(gallery_labels, query_labels, loo_exclusion(loo, len(order), groups), ks)
    tally.add(np.arange(len(order)), order)
    return tally.metrics()


def evaluate_retrieval(
    gallery_emb, gallery_labels, query_emb, query_labels, ks=(1, 5), exclude_self=False, max_rank=None, device="auto",
    per_query=False, groups=None, keep: int = 0,
) -> dict:
    """Recall@k and exact mAP of ranking the gallery by Faiss for each query (RankingTally.metrics; 'ap' only with
    per_query=True; with `keep`, 'top': each query's first `keep` gallery rows, left-out rows already out).

    mAP is exact: every query ranks the whole gallery (k = gallery size), RANK_PAIRS pairs at a time, so memory
    stays bounded whatever the gallery (a million photos: 8 queries a chunk; no queries x gallery matrix), while
    the time grows with queries x gallery. `max_rank` truncates the ranking (a lower bound on mAP).
    exclude_self=True is leave-one-out: the query set must be the gallery itself (same rows, same order);
    each query's own row is removed from its ranking and from its count of relevant items, and with `groups` (one
    per row: the split's group column) every row of its group (lib.retrieval.exclusion's group rule).
    """
    gallery_labels, query_labels = np.asarray(gallery_labels), np.asarray(query_labels)
    for what, emb, labels in (("gallery", gallery_emb, gallery_labels), ("query", query_emb, query_labels)):
        if len(emb) != len(labels):
            raise ValueError(f"{what}: {len(emb)} embeddings but {len(labels)} labels")
    if exclude_self and not (
        np.array_equal(gallery_emb, query_emb, equal_nan=True) and np.array_equal(gallery_labels, query_labels)
    ):
        raise ValueError("exclude_self=True is leave-one-out: query embeddings and labels must be the gallery's")
    if max_rank is not None and max_rank < max(ks):
        raise ValueError(f"max_rank={max_rank} is below the largest k in ks={ks}")
    exclude = loo_exclusion(exclude_self, len(gallery_labels), groups)
    left_out = np.zeros(len(query_labels), dtype=int) if exclude is None else exclude.counts()
    k = clip_k(max_rank or len(gallery_labels), len(gallery_labels) - int(left_out.min()))
    # faiss ranks k plus the most rows any query leaves out; the tally takes them out and keeps k
    searched = min(k + int(left_out.max()), len(gallery_labels))
    tally = RankingTally(gallery_labels, query_labels, exclude, ks, keep)
    index = build_index(gallery_emb, device if searched <= GPU_MAX_K else "cpu")
    q = unit_queries(index, query_emb)
    for rows in query_chunks(len(q), searched):
        _, ranked = knn(index, q[rows], searched)
        tally.add(rows, ranked, width=k)
    m = tally.metrics()
    return m if per_query else {key: v for key, v in m.items() if key != "ap"}
