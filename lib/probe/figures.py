"""Figures of notebook 06 (probe): the method x backbone table as bars, what the learned methods lean on, and
rankings of one method beside another."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lib.analysis.figures import QUERY, RIGHT, WRONG, show_thumb


def plot_probe(table: pd.DataFrame, metric: str = "identity_balanced_mAP") -> plt.Figure:
    """Left: `metric` per method, one bar group per method and a bar per backbone; right: ms per query (log scale),
    split into feature extraction and the method's own work."""
    methods = list(dict.fromkeys(table["method"]))
    backbones = list(dict.fromkeys(table["backbone"]))
    width = 0.8 / len(backbones)
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(methods))
    for i, b in enumerate(backbones):
        rows = table[table["backbone"] == b].set_index("method").reindex(methods)
        bars = ax.bar(x + i * width, rows[metric], width, label=b)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        ax_t.bar(x + i * width, rows["feature_ms_per_image"], width, color=bars[0].get_facecolor(), alpha=0.45)
        ax_t.bar(x + i * width, rows["method_ms_per_query"], width, bottom=rows["feature_ms_per_image"],
                 color=bars[0].get_facecolor())
    for a in (ax, ax_t):
        a.set_xticks(x + width * (len(backbones) - 1) / 2, methods)
    ax.set_ylabel(metric)
    ax.set_ylim(0, min(1.0, np.nanmax(table[metric].to_numpy(dtype=float)) * 1.2 + 0.02))
    ax.legend(fontsize=8, title="backbone")
    first = table.iloc[0]
    ax.set_title(f"{first['split']} ({first['protocol']}): {int(first['n_queries'])} queries, "
                 f"{int(first['n_gallery'])} gallery photos each")
    ax_t.set_yscale("log")
    costs = table[["feature_ms_per_image", "method_ms_per_query"]].to_numpy(dtype=float)
    ax_t.set_ylim(bottom=0.5 * costs[costs > 0].min(initial=1.0))  # bars start at 0, which a log axis cannot show
    ax_t.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_t.set_ylabel("ms per query (pale: features, dark: the method)")
    ax_t.set_title("cost")
    fig.tight_layout()
    return fig


def plot_importances(table: pd.DataFrame) -> plt.Figure:
    """One panel per row with an `importance` (JSON): the hybrid's features by their share of the boosted trees'
    split gain, the ensemble's members by their learned weights on standardised cosines; largest at the top."""
    learned = table[table["importance"].fillna("").astype(str).ne("")]
    if learned.empty:
        raise ValueError("no row has importances: probe 'hybrid', or 'ensemble' with ensemble_combine='logistic'")
    values = [pd.Series(json.loads(v)).sort_values() for v in learned["importance"]]
    height = 1.4 + 0.28 * max(len(v) for v in values)
    fig, axes = plt.subplots(1, len(values), figsize=(4.4 * len(values), height), squeeze=False)
    for ax, (_, row), v in zip(axes[0], learned.iterrows(), values, strict=True):
        bars = ax.barh(v.index, v.to_numpy(), color="tab:green" if row["method"] == "hybrid" else "tab:purple")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ax.set_title(f"{row['backbone']} / {row['method']}", fontsize=9)
        ax.set_xlabel("share of split gain" if row["method"] == "hybrid" else "weight (standardised cosine)")
        ax.margins(x=0.15)
    fig.tight_layout()
    return fig


def plot_rankings(rankings: dict, data_dir: str | Path, pairs: list[tuple[str, str]], queries, k: int = 5
                  ) -> plt.Figure:
    """For each query row (of the ranking tables), one line per (backbone, method) in `pairs`: the query, then that
    method's top-k gallery photos framed green (same individual) or red."""
    data_dir = Path(data_dir)
    lines = [(q, pair) for q in queries for pair in pairs]
    fig, axes = plt.subplots(len(lines), k + 1, figsize=(1.9 * (k + 1), 2.3 * len(lines)), squeeze=False)
    for row_axes, (q, pair) in zip(axes, lines):
        table = rankings[pair]
        query = table.iloc[q]
        show_thumb(row_axes[0], data_dir / query["path"], f"{pair[0]} / {pair[1]}\nQUERY {query['identity']}\n"
                   f"AP {query['ap']:.2f}", QUERY)
        for rank, (ax, path, ident) in enumerate(zip(row_axes[1:], query["top_paths"], query["top_identities"]), 1):
            show_thumb(ax, data_dir / path, f"#{rank} {ident}", RIGHT if ident == query["identity"] else WRONG)
        for ax in row_axes[1 + len(query["top_paths"]):]:
            ax.axis("off")
    fig.tight_layout()
    return fig


def most_changed(rankings: dict, before: tuple[str, str], after: tuple[str, str], n: int = 3) -> list[int]:
    """Query rows whose AP moved most between two methods, biggest gains first then biggest losses."""
    delta = rankings[after]["ap"].to_numpy() - rankings[before]["ap"].to_numpy()
    delta = np.nan_to_num(delta)
    order = np.argsort(-delta, kind="stable")
    gains = [int(i) for i in order[:n] if delta[i] > 0]
    losses = [int(i) for i in order[::-1][:n] if delta[i] < 0]
    return gains + losses
