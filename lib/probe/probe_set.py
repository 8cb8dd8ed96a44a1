"""The rows a probe ranks: the probed split's queries, the gallery they search (train photos, or the queries
themselves leave-one-out, with the rule of what each may not find), masks joined from a CSV, and the per-query table
of what each query found."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.retrieval.exclusion import NO_NEIGHBOUR, Exclusion, leave_one_out, resolve_loo_rule
from lib.retrieval.ranking import resolve_val_protocol


@dataclass
class ProbeSet:
    """One probed split: query rows, gallery rows, whether the gallery is the queries themselves, and under
    leave-one-out the rule (lib.retrieval.exclusion) of what each query may not find: `exclude`, its `loo_rule`."""
    queries: pd.DataFrame
    gallery: pd.DataFrame
    protocol: str
    exclude: Exclusion | None = None

    @property
    def loo(self) -> bool:
        return self.protocol == "loo"

    @property
    def loo_rule(self) -> str:
        return self.exclude.rule if self.exclude is not None else ""

    def excluding(self, rows) -> Exclusion | None:
        """The rule for the queries `rows`, None without one."""
        return None if self.exclude is None else self.exclude.of(rows)


def probe_set(index: pd.DataFrame, split: str, identity_col: str, protocol: str, loo_rule: str = "auto") -> ProbeSet:
    if identity_col not in index.columns:
        raise DataError(f"identity_col {identity_col!r} is not a column of the split index; it has {list(index.columns)}")
    queries = index[index["split"] == split].reset_index(drop=True)
    train = index[index["split"] == "train"].reset_index(drop=True)
    if queries.empty:
        raise DataError(f"the split index has no '{split}' photos; splits: {sorted(set(index['split']) - {''})}")
    protocol = resolve_val_protocol(protocol, train[identity_col], queries[identity_col])
    if protocol != "loo":
        return ProbeSet(queries, train, protocol)
    rule = resolve_loo_rule(loo_rule, queries[identity_col], queries["group"])
    return ProbeSet(queries, queries, protocol,
                    leave_one_out(len(queries), queries["group"].to_numpy() if rule == "group" else None))


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


def ranking_table(s: ProbeSet, top: np.ndarray, ap: np.ndarray, identity_col: str) -> pd.DataFrame:
    """Per query: path, identity, AP and the paths and identities of its first gallery photos (`top`: gallery rows,
    the left-out ones already out in loo; '' past the end of a short ranking), for figures and the per-query table."""
    def of(column):
        return list(np.where(top == NO_NEIGHBOUR, "", s.gallery[column].to_numpy().astype(str)[top]))

    return pd.DataFrame({"path": s.queries["path"], "identity": s.queries[identity_col], "ap": ap,
                         "top_paths": of("path"), "top_identities": of(identity_col)})
