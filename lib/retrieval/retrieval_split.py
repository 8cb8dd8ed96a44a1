"""The one query/gallery bundle: which photos query, which gallery they search, under which protocol, and which
gallery rows each query may not find (lib.retrieval.exclusion). Training validation, evaluation, the probe and the
analysis of a saved record all build theirs with `retrieval_split`, so the protocol and the leave-one-out rule are
resolved in one place and every search and metric of a split is handed the same `exclude`.

Protocols: 'gallery' (the train photos are the gallery, the split's photos query it) or 'loo' (leave-one-out: the
split is its own gallery, each photo querying all the others, for open-set splits whose individuals training never
saw); 'auto' picks 'loo' when no query's label occurs in the gallery.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.retrieval.exclusion import Exclusion, for_queries, leave_one_out, resolve_loo_rule

PROTOCOLS = ("auto", "gallery", "loo")


def resolve_protocol(protocol: str, gallery_labels, query_labels) -> str:
    """'gallery' or 'loo' for a requested protocol; 'auto' is 'loo' when no query label occurs in the gallery."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if protocol == "auto":
        shared = set(np.asarray(query_labels).tolist()) & set(np.asarray(gallery_labels).tolist())
        return "gallery" if shared else "loo"
    return protocol


@dataclass(frozen=True)
class RetrievalSplit:
    """Query rows, the gallery rows they search (under 'loo' the queries themselves), the resolved protocol, and the
    rule of what each query may not find (None under 'gallery'). label_col names the identity column."""
    queries: pd.DataFrame
    gallery: pd.DataFrame
    protocol: str
    exclude: Exclusion | None
    label_col: str = "label"

    @property
    def loo(self) -> bool:
        return self.protocol == "loo"

    @property
    def loo_rule(self) -> str | None:
        """'photo' or 'group' under leave-one-out, None under the gallery protocol."""
        return None if self.exclude is None else self.exclude.rule

    @property
    def query_labels(self) -> np.ndarray:
        return self.queries[self.label_col].to_numpy()

    @property
    def gallery_labels(self) -> np.ndarray:
        return self.gallery[self.label_col].to_numpy()

    def exclusion_for(self, rows) -> Exclusion | None:
        """The rule for the queries `rows` (a chunk), None without one."""
        return for_queries(self.exclude, rows)

    def describe(self) -> str:
        """One line for a person: what queries what, and what each query may not find."""
        if not self.loo:
            return f"{len(self.queries)} queries against {len(self.gallery)} gallery photos"
        return (f"{len(self.queries)} photos leave-one-out, leaving out each query's own "
                f"{'group' if self.loo_rule == 'group' else 'photo'}")


def retrieval_split(gallery: pd.DataFrame, queries: pd.DataFrame, protocol: str = "auto", loo_rule: str = "auto",
                    label_col: str = "label") -> RetrievalSplit:
    """The split of `queries` (rows of the split index, with label_col and, for the group rule, 'group') searching
    `gallery` (the train rows; not read under 'loo' beyond resolving 'auto'), its protocol resolved and, under
    leave-one-out, its rule (lib.retrieval.exclusion.resolve_loo_rule; a frame without 'group' has only the photo
    rule). Already-resolved values ('gallery'/'loo', 'group'/'photo', as a saved record holds) pass through."""
    queries = queries.reset_index(drop=True)
    protocol = resolve_protocol(protocol, gallery[label_col], queries[label_col])
    if protocol == "gallery":
        return RetrievalSplit(queries, gallery.reset_index(drop=True), protocol, None, label_col)
    groups = queries["group"].to_numpy() if "group" in queries.columns else None
    rule = resolve_loo_rule(loo_rule, queries[label_col], groups)
    if rule == "group" and groups is None:
        raise ValueError("loo_rule='group' needs a 'group' column in the query rows")
    exclude = leave_one_out(len(queries), groups if rule == "group" else None)
    # a copy: a column added to one frame (a decision, an AP) must not appear in the other
    return RetrievalSplit(queries, queries.copy(), protocol, exclude, label_col)
