"""Where a model fails: tables computed from an Evaluation (notebook 04).

The views are the ones error analyses of re-identification runs kept needing: confusion between
classes, the top-1/top-2 margin of right and wrong answers, accuracy against the number of candidate classes,
the rank of the true class in the errors, the few classes/contexts that hold most errors, classes that always
fail, and per-class AP. Every function takes an Evaluation or its `queries` table and returns data.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from lib.core.errors import DataError
from lib.evaluate.record import Evaluation, record_split
from lib.retrieval.faiss_index import NO_NEIGHBOUR, fill_padding
from lib.retrieval.metrics import confusion_table, per_identity_ap
from lib.retrieval.ranking import evaluate_retrieval

MARGIN_THRESHOLDS = (0.005, 0.01, 0.05, 0.1)
NOT_RANKED = "no vote"  # the true class got no vote (none of its photos among the neighbours, or none at all)


def errors(queries: pd.DataFrame) -> pd.Series:
    """Bool per query: the decision was wrong."""
    return ~queries["correct"].astype(bool)


def most_confused_classes(counts: pd.DataFrame, top_n: int) -> list[str]:
    """The `top_n` classes most involved in errors (as the true or the predicted class), most first.

    Ties go by name so the view is stable; classes without any error are left out.
    """
    off = counts.to_numpy().copy()
    np.fill_diagonal(off, 0)
    involvement = pd.Series(off.sum(axis=0) + off.sum(axis=1), index=counts.index)
    involvement = involvement[involvement > 0]
    order = sorted(involvement.index, key=lambda c: (-involvement[c], c))
    return order[:top_n]


def confusion_view(queries: pd.DataFrame, top_n: int = 30) -> pd.DataFrame:
    """Row-normalised confusion matrix (share of each true class's queries), or with more than `top_n` classes
    its block of the `top_n` most confused classes. Rows keep their share of *all* the class's queries, so a
    row of the block may sum to less than 1 (the rest went to classes outside the block)."""
    counts = confusion_table(queries["label"], queries["pred"])
    shares = counts.div(counts.sum(axis=1).replace(0, np.nan), axis=0).fillna(0.0)
    if len(counts) <= top_n:
        return shares
    keep = most_confused_classes(counts, top_n)
    return shares.loc[keep, keep]


def confused_pairs(ev: Evaluation, top: int = 20) -> pd.DataFrame:
    """Most-confused class pairs (either direction), most errors first, with one example image pair each.

    Columns: class_a, class_b, a_as_b, b_as_a, errors, share_of_errors, example_query (a query of one class
    decided as the other) and example_match (its nearest gallery photo of the class it was taken for).
    """
    q = ev.queries
    wrong = np.flatnonzero(errors(q).to_numpy())
    cols = ["class_a", "class_b", "a_as_b", "b_as_a", "errors", "share_of_errors", "example_query", "example_match"]
    if len(wrong) == 0:
        return pd.DataFrame(columns=cols)
    rows: dict[tuple[str, str], dict] = {}
    gallery_labels = ev.gallery["label"].to_numpy()
    for i in wrong:
        true, pred = q["label"].iat[i], q["pred"].iat[i]
        a, b = sorted((true, pred))
        row = rows.setdefault((a, b), {"class_a": a, "class_b": b, "a_as_b": 0, "b_as_a": 0,
                                       "example_query": q["path"].iat[i], "example_match": ""})
        row["a_as_b" if true == a else "b_as_a"] += 1
        if not row["example_match"]:
            real = ev.neighbours[i][ev.neighbours[i] != NO_NEIGHBOUR]
            hits = real[gallery_labels[real] == pred]
            if len(hits):
                row["example_query"], row["example_match"] = q["path"].iat[i], ev.gallery["path"].iat[hits[0]]
    table = pd.DataFrame(rows.values())
    table["errors"] = table["a_as_b"] + table["b_as_a"]
    table["share_of_errors"] = table["errors"] / len(wrong)
    table = table.sort_values(["errors", "class_a", "class_b"], ascending=[False, True, True])
    return table[cols].head(top).reset_index(drop=True)


def margin_summary(queries: pd.DataFrame, thresholds=MARGIN_THRESHOLDS) -> pd.DataFrame:
    """Top-1/top-2 vote margin of right vs wrong answers: count, median, and the share below each threshold."""
    out = {}
    wrong = errors(queries)
    for name, rows in (("right", queries[~wrong]), ("wrong", queries[wrong])):
        m = rows["margin"].astype(float)
        out[name] = {"queries": len(m), "median": m.median(),
                     **{f"share_below_{t:g}": (m < t).mean() if len(m) else np.nan for t in thresholds}}
    return pd.DataFrame(out).T.rename_axis("answer")


def candidate_counts(ev: Evaluation, k: int | None = None) -> np.ndarray:
    """Distinct gallery classes among each query's first k neighbours (all stored neighbours when None)."""
    codes, _ = pd.factorize(ev.gallery["label"])
    ranked = np.sort(codes[fill_padding(ev.neighbours[:, :k])], axis=1)
    return 1 + (np.diff(ranked, axis=1) != 0).sum(axis=1)


def context_candidates(ev: Evaluation) -> np.ndarray | None:
    """Gallery classes that share each query's context (e.g. the trees at a street address); None without contexts."""
    if "context" not in ev.queries.columns or "context" not in ev.gallery.columns:
        return None
    per_context = ev.gallery.groupby("context")["label"].nunique()
    return ev.queries["context"].map(per_context).fillna(0).astype(int).to_numpy()


def accuracy_by(queries: pd.DataFrame, key, name: str) -> pd.DataFrame:
    """Queries, errors, accuracy and share of all errors for each value of `key` (one value per query)."""
    wrong = errors(queries).to_numpy()
    frame = pd.DataFrame({name: np.asarray(key), "wrong": wrong})
    table = frame.groupby(name).agg(queries=("wrong", "size"), errors=("wrong", "sum"))
    table["accuracy"] = 1 - table["errors"] / table["queries"]
    table["share_of_errors"] = table["errors"] / max(int(wrong.sum()), 1)
    return table


def true_class_rank(ev: Evaluation) -> np.ndarray:
    """1-based rank of each query's true class in its vote (2 = the correct class was the second choice);
    0 when its class got no vote. Ties count in the true class's favour."""
    scores = ev.class_scores.to_numpy(dtype=float)
    column = {c: j for j, c in enumerate(ev.class_scores.columns)}
    j = np.array([column.get(label, -1) for label in ev.queries["label"]])
    true_score = np.where(j >= 0, scores[np.arange(len(scores)), j.clip(0)], 0.0)
    return np.where(true_score > 0, 1 + (scores > true_score[:, None]).sum(axis=1), 0)


def rank_of_true_table(ev: Evaluation) -> pd.DataFrame:
    """Among the errors: how often the true class came 2nd, 3rd, ... in the vote, or got no vote at all."""
    wrong = errors(ev.queries).to_numpy()
    key = [str(r) if r >= 1 else NOT_RANKED for r in true_class_rank(ev)[wrong]]
    counts = pd.Series(key, dtype=object).value_counts()
    order = sorted(counts.index, key=lambda r: (r == NOT_RANKED, int(r) if r != NOT_RANKED else 0))
    table = counts.reindex(order).rename("errors").rename_axis("rank_of_true_class").to_frame()
    table["share_of_errors"] = table["errors"] / max(int(wrong.sum()), 1)
    return table


def worst(queries: pd.DataFrame, by: str = "label", top: int = 10) -> pd.DataFrame:
    """Classes (or contexts) with the most errors, with their share and the cumulative share of all errors."""
    table = accuracy_by(queries, queries[by], by)
    table = table[table["errors"] > 0].sort_values(["errors", "accuracy"], ascending=[False, True])
    table["cumulative_share"] = table["share_of_errors"].cumsum()
    return table.head(top)


def per_context(queries: pd.DataFrame) -> pd.DataFrame | None:
    """Per context (camera site, street address), worst first: queries, individuals, accuracy, mean AP, the median
    vote margin of its right and of its wrong answers, and the individuals none of whose photos there was decided
    right ('always-fail' individuals). None without contexts."""
    if "context" not in queries:
        return None
    frame = queries.assign(wrong=errors(queries).to_numpy())
    by = frame.groupby("context")
    table = by.agg(queries=("wrong", "size"), individuals=("label", "nunique"), errors=("wrong", "sum"))
    table["accuracy"] = 1 - table["errors"] / table["queries"]
    if "ap" in frame:
        table["mean_ap"] = by["ap"].mean()
    if "margin" in frame:  # errors whose margin sits near 0 there are coin tosses between look-alikes of one site
        for name, rows in (("right", frame[~frame["wrong"]]), ("wrong", frame[frame["wrong"]])):
            table[f"median_margin_{name}"] = rows.groupby("context")["margin"].median()
    failing = frame.groupby(["context", "label"])["wrong"].all()
    table["always_fail"] = [sorted(failing[c][failing[c]].index) for c in table.index]
    return table.sort_values(["accuracy", "queries"], ascending=[True, False])


def always_fail(ev: Evaluation) -> pd.DataFrame:
    """Classes none of whose queries was decided right, with their gallery (training) photo count and the class
    they were most often taken for: the ones more photos alone will not fix when they already have many."""
    q = ev.queries
    table = accuracy_by(q, q["label"], "label")
    table = table[table["accuracy"] == 0].copy()
    table["gallery_photos"] = ev.gallery["label"].value_counts().reindex(table.index).fillna(0).astype(int)
    table["taken_for"] = [q.loc[q["label"] == c, "pred"].mode().iat[0] for c in table.index]
    return table[["queries", "gallery_photos", "taken_for"]].sort_values("queries", ascending=False)


def query_ap(ev: Evaluation) -> np.ndarray:
    """Exact AP of each query's ranking of the whole gallery; NaN where its class has no gallery photo.
    notebook 03 stores it; older records recompute it under the record's leave-one-out rule (each photo, and under
    the group rule its group, out of its own ranking; lib.evaluate.record.record_split)."""
    if "ap" in ev.queries:
        return ev.queries["ap"].to_numpy(dtype=float)
    s = record_split(ev)
    return evaluate_retrieval(ev.gallery_emb, s.gallery_labels.astype(str), ev.query_emb, s.query_labels.astype(str),
                              s.exclude, device="cpu")["ap"]


def per_class_ap(ev: Evaluation) -> pd.DataFrame:
    """Mean AP of each class's queries (per-identity AP, to spot weak classes; lib.retrieval.metrics.per_identity_ap),
    lowest first, with the class's gallery photo count and top1 (the share of its queries decided right, where
    the record holds decisions).

    Classes absent from the gallery have no AP and are left out (see `always_fail` for them).
    """
    table = per_identity_ap(ev.queries["label"].to_numpy(), query_ap(ev)).dropna(subset=["ap"]).rename_axis("label")
    table["gallery_photos"] = ev.gallery["label"].value_counts().reindex(table.index).astype(int)
    q = ev.queries
    if "pred" in q.columns:  # a leave-one-out record ranks without deciding
        table["top1"] = (q["label"] == q["pred"]).groupby(q["label"]).mean().reindex(table.index)
    return table


def key_findings(ev: Evaluation, k: int | None = None, tiny_margin: float = 0.005, worst_n: int = 10) -> dict:
    """Headline numbers of an error analysis: how many errors, how close their votes were, where they concentrate."""
    q = ev.queries
    wrong = errors(q)
    n_wrong = int(wrong.sum())
    ranks = rank_of_true_table(ev)["share_of_errors"]
    by = "context" if "context" in q.columns else "label"
    findings = {
        "queries": len(q), "errors": n_wrong, "error_rate": n_wrong / max(len(q), 1),
        f"errors_with_margin_below_{tiny_margin:g}": float((q.loc[wrong, "margin"].astype(float) < tiny_margin).mean())
        if n_wrong else 0.0,
        "errors_with_true_class_second": float(ranks.get("2", 0.0)),
        f"worst_{worst_n}_{by}s_share_of_errors": float(worst(q, by, worst_n)["share_of_errors"].sum()),
        "classes_always_failing": len(always_fail(ev)),
    }
    by_candidates = accuracy_by(q, candidate_counts(ev, k), "candidates")["accuracy"]
    findings["accuracy_fewest_candidates"] = float(by_candidates.iloc[0])
    findings["accuracy_most_candidates"] = float(by_candidates.iloc[-1])
    return findings


def worst_queries(queries: pd.DataFrame, n: int) -> np.ndarray:
    """Row positions of the n worst queries: errors, most confident first (sure and wrong is the worst kind);
    when there are fewer than n errors, then the right answers with the smallest margin."""
    wrong = errors(queries).to_numpy()
    pos = np.arange(len(queries))
    confidently_wrong = pos[wrong][np.argsort(-queries["score"].to_numpy()[wrong], kind="stable")]
    barely_right = pos[~wrong][np.argsort(queries["margin"].to_numpy()[~wrong], kind="stable")]
    return np.concatenate([confidently_wrong, barely_right])[:n]


def rows_for_paths(queries: pd.DataFrame, paths) -> np.ndarray:
    """Row positions of the queries with these paths, in the order given; DataError names a path not in the split."""
    where = {p: i for i, p in enumerate(queries["path"])}
    missing = [p for p in paths if p not in where]
    if missing:
        raise DataError(f"not queries of this split: {missing[:5]} (paths are relative to the data root, as in "
                        "the index)")
    return np.array([where[p] for p in paths], dtype=int)
