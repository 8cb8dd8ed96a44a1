"""The open-set figure of notebook 03: new-vs-known ROC curves and the BAKS / BAUS trade-off of the threshold."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve


def plot_open_set(is_unknown, top1_distance, margin, sweep: pd.DataFrame, report: dict, title: str = "") -> plt.Figure:
    """Left: ROC of calling a query new by its top-1 distance and by its (negative) vote margin. Right: BAKS, BAUS
    and their harmonic mean against the new-individual threshold (lib.retrieval.open_set.baks_baus_by_threshold), with the
    threshold chosen on val."""
    fig, (roc, trade) = plt.subplots(1, 2, figsize=(11, 4.5))
    d = np.asarray(top1_distance, dtype=np.float64)
    finite_top = np.nanmax(np.where(np.isfinite(d), d, np.nan)) + 1 if np.isfinite(d).any() else 1.0
    for name, score, key in (("top-1 distance", np.nan_to_num(d, posinf=finite_top), "auroc_top1_distance"),
                             ("vote margin", -np.asarray(margin, dtype=np.float64), "auroc_margin")):
        fpr, tpr, _ = roc_curve(is_unknown, score)
        roc.plot(fpr, tpr, label=f"{name}: AUROC {report[key]:.3f}")
    roc.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
    roc.set(xlabel="known queries called new", ylabel="unknown queries called new", title="New vs known", xlim=(0, 1),
            ylim=(0, 1.02))
    roc.legend(loc="lower right", fontsize=8)
    for key in ("BAKS", "BAUS", "harmonic_mean"):
        trade.plot(sweep["threshold"], sweep[key], label=key.replace("_", " "))
    if np.isfinite(report["new_threshold"]):
        trade.axvline(report["new_threshold"], color="k", ls="--", lw=1,
                      label=f"chosen {report['new_threshold']:.3f} (with reshoot): BAKS {report['BAKS']:.2f}, "
                            f"BAUS {report['BAUS']:.2f}")
    trade.set(xlabel="new-individual threshold (top-1 squared distance)", ylabel="balanced accuracy", ylim=(0, 1.02),
              title="Known vs new, by threshold")
    trade.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
