"""Every figure the notebooks show: functions that take tables and return matplotlib figures."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


def save(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_split_distribution(index: pd.DataFrame, max_classes: int = 40) -> plt.Figure:
    """Images per class, stacked by split, beside each split's share of every class (stratification at a glance).

    With many classes only the `max_classes` largest are drawn, so labels stay readable; the title says so.
    """
    counts = index.groupby(["label", "split"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=[s for s in SPLIT_COLOURS if s in counts.columns], fill_value=0)
    order = counts.sum(axis=1).sort_values(ascending=False).index
    shown = counts.loc[order[:max_classes]]
    share = shown.div(shown.sum(axis=1), axis=0)
    height = max(3.0, 0.22 * len(shown) + 1.2)
    fig, (ax_n, ax_share) = plt.subplots(1, 2, figsize=(12, height), sharey=True,
                                         gridspec_kw={"width_ratios": [3, 2]})
    for ax, table, xlabel in ((ax_n, shown, "images"), (ax_share, share, "share of the class's images")):
        left = pd.Series(0.0, index=table.index)
        for split in table.columns:
            ax.barh(range(len(table)), table[split], left=left, color=SPLIT_COLOURS[split], label=split)
            left += table[split]
        ax.set_xlabel(xlabel)
    total = index["split"].value_counts(normalize=True)
    for split, x in total.cumsum().items():
        ax_share.axvline(x, color="k", lw=0.8, ls=":")
    ax_n.set_yticks(range(len(shown)), shown.index, fontsize=8 if len(shown) > 20 else 10)
    ax_n.invert_yaxis()
    ax_n.legend(loc="lower right")
    title = "Images per class and split"
    if len(order) > max_classes:
        title += f" (largest {max_classes} of {len(order)} classes)"
    ax_n.set_title(title)
    ax_share.set_title("Split shares (dotted: overall)")
    fig.tight_layout()
    return fig


def plot_training_curves(history: pd.DataFrame) -> plt.Figure:
    """Loss, val retrieval metrics (and the EMA's) per epoch, with the untrained model (epoch 0) as a baseline."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4))
    trained = history[history["epoch"] > 0]
    ax_loss.plot(trained["epoch"], trained["train_loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    for phase, rows in trained.groupby("phase"):
        if phase == "warmup":
            ax_loss.axvspan(rows["epoch"].min() - 0.5, rows["epoch"].max() + 0.5, color="0.9", label="warm-up (frozen)")
    for key, colour in (("val_recall@1", "C0"), ("val_recall@5", "C1"), ("val_mAP", "C2"), ("ema_val_recall@1", "C3")):
        if key in history.columns:
            ax_val.plot(trained["epoch"], trained[key], marker="o", color=colour, label=key)
            ax_val.axhline(history[key].iloc[0], color=colour, ls=":", lw=1)
    ax_val.set(xlabel="epoch", ylabel="score", ylim=(0, 1.02), title="Validation retrieval (dotted: untrained)")
    for ax in (ax_loss, ax_val):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_risk_coverage(curves: dict[str, pd.DataFrame], chosen: dict | None = None,
                       target_accuracy: float | None = None) -> plt.Figure:
    """Accuracy of the answered queries against the share answered (lib.decide.risk_coverage tables, one per
    confidence signal), with the operating point of the chosen thresholds and the target accuracy."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, curve in curves.items():
        ax.plot(curve["coverage"], curve["accuracy"], drawstyle="steps-post", label=f"answer by {name}")
    if target_accuracy is not None:
        ax.axhline(target_accuracy, color="0.5", ls=":", lw=1, label=f"target accuracy {target_accuracy:g}")
    if chosen is not None:
        ax.plot(chosen["coverage"], chosen["accuracy"], "k*", ms=14,
                label=f"chosen: coverage {chosen['coverage']:.2f}, accuracy {chosen['accuracy']:.2f}")
    ax.set(xlabel="coverage (share of queries answered)", ylabel="accuracy of the answered", xlim=(0, 1.02),
           ylim=(0, 1.02), title="Risk–coverage")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig
