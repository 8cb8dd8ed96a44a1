"""The one leave-one-out rule: which gallery rows each query may not retrieve.

Under leave-one-out the queries are the gallery. A query never finds itself (the 'photo' rule) and, under the
'group' rule, none of the other photos of its own group (the split's leakage unit: the burst of one encounter, the
other flank of one sighting, the other crops of one photo). Those photos are junk, as Market-1501's same-camera
images are: neither match nor miss, they leave the ranking and the query's count of relevant photos. A user's
gallery holds earlier encounters only, so the group rule measures what the user will see; the photo rule lets a
query find its burst siblings first.

Every ranking that leaves rows out (Faiss search, the probe's dense scores, query expansion, k-reciprocal
re-ranking, the pairs table, the ranking metrics, an approximate index's recall) takes one `exclude: Exclusion | None`
and asks it which rows those are; lib.retrieval.retrieval_split builds it once per split.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

LOO_RULES = ("auto", "group", "photo")
# what every leave-one-out record written before the rule existed used: an evaluation record or probe row without
# 'loo_rule' reads as this
OLD_LOO_RULE = "photo"
# index of a padding entry: a ranking row with fewer real entries than columns (rows left out, a context with fewer
# than k photos, an approximate index that found fewer than k); faiss's own padding value
NO_NEIGHBOUR = -1


def resolve_loo_rule(rule: str, labels, groups) -> str:
    """'group' or 'photo' for a requested rule. 'auto' is 'group' when the groups are finer than the individuals (some
    label has photos in two or more groups), else 'photo': where each group holds all of an individual's photos (a
    group column that names the individual) the group rule would leave no query anything to find."""
    if rule not in LOO_RULES:
        raise ValueError(f"loo_rule={rule!r}; valid: {', '.join(LOO_RULES)}")
    if rule != "auto":
        return rule
    if groups is None:
        return "photo"
    groups_per_label = pd.Series(np.asarray(groups)).groupby(np.asarray(labels)).nunique()
    return "group" if (groups_per_label > 1).any() else "photo"


@dataclass(frozen=True)
class Exclusion:
    """Gallery row j is left out of query i's ranking when gallery_keys[j] == query_keys[i].

    Keys are integer codes: the query's own gallery row under the photo rule, its group's code under the group rule.
    for_queries(rows) gives the same rule for a chunk of the queries (and a part of the gallery).
    """
    query_keys: np.ndarray
    gallery_keys: np.ndarray
    rule: str

    def for_queries(self, rows, gallery_rows=None) -> Exclusion:
        """The rule for the queries `rows` (in that order) against the whole gallery, or against the gallery rows
        `gallery_rows` alone (a context's photos, searched on their own)."""
        gallery_keys = self.gallery_keys if gallery_rows is None else self.gallery_keys[gallery_rows]
        return Exclusion(self.query_keys[rows], gallery_keys, self.rule)

    def counts(self) -> np.ndarray:
        """Gallery rows left out of each query's ranking."""
        keys, n = np.unique(self.gallery_keys, return_counts=True)
        pos = np.searchsorted(keys, self.query_keys).clip(max=len(keys) - 1)
        return np.where(keys[pos] == self.query_keys, n[pos], 0)

    def relevant_counts(self, gallery_codes, query_codes) -> np.ndarray:
        """Left-out gallery rows of each query that share its label code (they leave its count of relevant photos)."""
        width = int(max(np.max(gallery_codes), np.max(query_codes))) + 2  # codes >= -1
        pairs = Exclusion(self.query_keys * width + np.asarray(query_codes) + 1,
                          self.gallery_keys * width + np.asarray(gallery_codes) + 1, self.rule)
        return pairs.counts()

    def matrix(self) -> np.ndarray:
        """Bool (n_q, n_g): gallery row j is left out for query i."""
        return self.gallery_keys[None, :] == self.query_keys[:, None]

    def fill(self, scores: np.ndarray, value=-np.inf) -> np.ndarray:
        """`scores` (n_q, n_g, one column per gallery row) with the left-out entries set to `value`, in place."""
        scores[self.matrix()] = value
        return scores

    def mask(self, ranked: np.ndarray) -> np.ndarray:
        """Bool, ranked's shape: the entry (a gallery row; NO_NEIGHBOUR padding never) is left out for its query."""
        ranked = np.asarray(ranked)
        real = ranked != NO_NEIGHBOUR
        return real & (self.gallery_keys[np.where(real, ranked, 0)] == self.query_keys[:, None])

    def drop(self, ranked: np.ndarray, distances: np.ndarray | None = None, width: int | None = None):
        """Rankings (n_q, K: gallery rows best first) without the left-out rows: the rest move up in order and each
        row ends in padding (NO_NEIGHBOUR, distance inf); `width` columns (K by default). With distances (the same
        shape), (ranked, distances)."""
        ranked = np.asarray(ranked)
        gone = self.mask(ranked) | (ranked == NO_NEIGHBOUR)
        # a stable sort of the bool flags: what stays keeps its order and comes first
        order = np.argsort(gone, axis=1, kind="stable")[:, :width]
        gone = np.take_along_axis(gone, order, axis=1)
        ranked = np.where(gone, NO_NEIGHBOUR, np.take_along_axis(ranked, order, axis=1))
        if distances is None:
            return ranked
        return ranked, np.where(gone, np.float32(np.inf), np.take_along_axis(distances, order, axis=1))


def _codes(values) -> np.ndarray:
    return pd.factorize(pd.Series(np.asarray(values)).astype(str))[0].astype(np.int64)


def leave_one_out(n: int, groups=None) -> Exclusion:
    """The queries are the n gallery rows, in order: each leaves out its own row and, with `groups` (one per row: the
    split's group column), every row of its group."""
    if groups is None:
        keys = np.arange(n, dtype=np.int64)
        return Exclusion(keys, keys, "photo")
    if len(groups) != n:
        raise ValueError(f"groups: {len(groups)} for {n} rows; leave-one-out needs one group per row")
    keys = _codes(groups)
    return Exclusion(keys, keys, "group")


def same_group(query_groups, gallery_groups) -> Exclusion:
    """Each query leaves out the gallery rows of its own group (queries and gallery being different rows)."""
    codes = _codes(np.concatenate([np.asarray(query_groups), np.asarray(gallery_groups)]))
    return Exclusion(codes[:len(query_groups)], codes[len(query_groups):], "group")


def check_sizes(exclude: Exclusion | None, n_queries: int, n_gallery: int) -> None:
    """ValueError unless the rule (where there is one) holds one key per query and one per gallery row of a search."""
    if exclude is not None and (len(exclude.query_keys), len(exclude.gallery_keys)) != (n_queries, n_gallery):
        raise ValueError(f"the exclusion holds keys for {len(exclude.query_keys)} queries and "
                         f"{len(exclude.gallery_keys)} gallery rows, the search has {n_queries} and {n_gallery}")


def most_left_out(exclude: Exclusion | None) -> int:
    """The most gallery rows any query leaves out (0 without a rule): how far past k a search must look."""
    return 0 if exclude is None or not len(exclude.query_keys) else int(exclude.counts().max())


def fewest_left_out(exclude: Exclusion | None) -> int:
    """The fewest gallery rows any query leaves out (0 without a rule): the gallery minus them is the most any query
    can retrieve."""
    return 0 if exclude is None or not len(exclude.query_keys) else int(exclude.counts().min())


def for_queries(exclude: Exclusion | None, rows, gallery_rows=None) -> Exclusion | None:
    """Exclusion.for_queries, None without a rule."""
    return None if exclude is None else exclude.for_queries(rows, gallery_rows)
