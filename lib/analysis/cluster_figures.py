"""Notebook 03's clustering figures: the clusters as contact sheets (a row of thumbnails each, wrong members framed
red) and the score curve the threshold was chosen from."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lib.analysis.figures import RIGHT, WRONG, show_thumb


def cluster_rows(labels, clusters, max_clusters: int = 10, min_size: int = 2) -> list[dict]:
    """The clusters to show, largest first (ties: the one with more wrong members): each with its rows, majority
    individual (what 'right' means in it) and its wrong members. Clusters under `min_size` are left out while larger
    ones remain to show."""
    table = pd.DataFrame({"label": np.asarray(labels).astype(str), "cluster": np.asarray(clusters)})
    table = table[table["cluster"] >= 0]
    out = []
    for c, members in table.groupby("cluster"):
        majority = members["label"].value_counts().index[0]
        out.append({"cluster": int(c), "rows": members.index.to_numpy(), "majority": majority,
                    "wrong": int((members["label"] != majority).sum())})
    out.sort(key=lambda r: (-len(r["rows"]), -r["wrong"], r["cluster"]))
    big = [r for r in out if len(r["rows"]) >= min_size]
    return (big or out)[:max_clusters]


def plot_cluster_sheets(paths, labels, clusters, max_clusters: int = 10, max_per_row: int = 8,
                        title: str = "") -> plt.Figure:
    """One row per cluster (cluster_rows): its photos captioned with their true individual, framed green when that is
    the cluster's majority individual and red when not; a row longer than max_per_row shows its first photos, wrong
    ones first, and says how many more."""
    paths = np.asarray([os.fspath(p) for p in paths], dtype=object)
    labels = np.asarray(labels).astype(str)
    shown = cluster_rows(labels, clusters, max_clusters)
    width = max([min(len(r["rows"]), max_per_row) for r in shown] + [4])  # 4: room for the title over singletons
    fig, axes = plt.subplots(max(len(shown), 1), width, figsize=(1.7 * width, 2.1 * max(len(shown), 1)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for line, r in zip(axes, shown):
        rows = sorted(r["rows"], key=lambda i: labels[i] == r["majority"])[:max_per_row]  # mistakes first
        for j, (ax, i) in enumerate(zip(line, rows)):
            ax.axis("on")
            right = labels[i] == r["majority"]
            show_thumb(ax, Path(paths[i]), labels[i], RIGHT if right else WRONG)
            if j == 0:
                more = len(r["rows"]) - len(rows)
                ax.set_ylabel(f"cluster {r['cluster']}\n{len(r['rows'])} photos, {r['wrong']} wrong"
                              + (f"\n(+{more} not shown)" if more else ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_threshold_curve(curve: pd.DataFrame, threshold: float, title: str = "") -> plt.Figure:
    """ARI, AMI and pairwise F1 against the cosine-distance threshold, with the number of clusters, and the chosen
    threshold marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    curve = pd.DataFrame(curve).sort_values("threshold")
    for key in ("ari", "ami", "pair_f1"):
        ax.plot(curve["threshold"], curve[key], marker=".", label=key)
    ax.axvline(threshold, color="black", linestyle="--", label=f"chosen {threshold:.3f}")
    ax.set_xlabel("cosine distance threshold")
    ax.set_ylabel("score")
    twin = ax.twinx()
    twin.plot(curve["threshold"], curve["n_clusters"], color="grey", alpha=0.5)
    twin.set_ylabel("clusters", color="grey")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
