"""The rows a probe ranks: the probed split's queries, the gallery they search (train photos, or the queries
themselves leave-one-out, with the rule of what each may not find), masks joined from a CSV, and the per-query table
of what each query found."""
from __future__ import annotations


import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.retrieval.exclusion import NO_NEIGHBOUR
from lib.retrieval.retrieval_split import RetrievalSplit, retrieval_split


def probe_set(index: pd.DataFrame, split: str, identity_col: str, protocol: str, loo_rule: str = "auto") -> RetrievalSplit:
    """The probed split of the split index: its `split` rows querying the train rows (or themselves, leave-one-out),
    identities in identity_col."""
    if identity_col not in index.columns:
        raise DataError(f"identity_col {identity_col!r} is not a column of the split index; it has {list(index.columns)}")
    queries = index[index["split"] == split]
    if queries.empty:
        raise DataError(f"the split index has no '{split}' photos; splits: {sorted(set(index['split']) - {''})}")
    return retrieval_split(index[index["split"] == "train"], queries, protocol, loo_rule, identity_col)


def with_masks(index: pd.DataFrame, masks_csv: str, mask_col: str) -> pd.DataFrame:
    """The index with mask_col joined from masks_csv by path (photos it does not list are used whole)."""
    if not masks_csv:
        if mask_col and mask_col not in index.columns:
            raise DataError(f"mask_col {mask_col!r} is not a column of the split index (columns: {list(index.columns)}); "
                            "name a CSV that has it in masks_csv")
        return index
    table = pd.read_csv(masks_csv, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", mask_col) if c not in table.columns]
    if missing:
        raise DataError(f"{masks_csv} lacks the column(s) {missing}; its columns are {list(table.columns)}")
    masks = table.drop_duplicates("path").set_index("path")[mask_col]
    return index.drop(columns=mask_col, errors="ignore").assign(**{mask_col: index["path"].map(masks).fillna("")})


def ranking_table(s: RetrievalSplit, top: np.ndarray, ap: np.ndarray) -> pd.DataFrame:
    """Per query: path, identity, AP and the paths and identities of its first gallery photos (`top`: gallery rows,
    the left-out ones already out in loo; '' past the end of a short ranking), for figures and the per-query table."""
    def of(column):
        return list(np.where(top == NO_NEIGHBOUR, "", s.gallery[column].to_numpy().astype(str)[top]))

    return pd.DataFrame({"path": s.queries["path"], "identity": s.queries[s.label_col], "ap": ap,
                         "top_paths": of("path"), "top_identities": of(s.label_col)})
