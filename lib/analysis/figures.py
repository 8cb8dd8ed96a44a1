"""Every figure of notebooks 01-05 (split distribution, training curves, risk-coverage, confusion analysis,
retrieval grids): tables or an Evaluation in, matplotlib figures out. The probe's figures are in lib.probe.figures."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import PowerNorm
from PIL import Image

from lib.analysis.tables import errors
from lib.data.images import open_image
from lib.evaluate.record import Evaluation
from lib.retrieval.faiss_index import NO_NEIGHBOUR

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
    shading = {"head": ("0.82", "head on cached features"), "warmup": ("0.9", "warm-up (frozen)")}
    for phase, rows in trained.groupby("phase"):
        if phase in shading:
            colour, label = shading[phase]
            ax_loss.axvspan(rows["epoch"].min() - 0.5, rows["epoch"].max() + 0.5, color=colour, label=label)
    for key, colour in (("val_recall@1", "C0"), ("val_recall@5", "C1"), ("val_mAP", "C2"), ("ema_val_recall@1", "C3")):
        if key in history.columns:
            ax_val.plot(trained["epoch"], trained[key], marker="o", color=colour, label=key)
            ax_val.axhline(history[key].iloc[0], color=colour, ls=":", lw=1)
            frozen = f"frozen_{key}"
            if frozen in history.columns:
                ax_val.axhline(history[frozen].iloc[0], color=colour, ls="--", lw=1)
    ax_val.set(xlabel="epoch", ylabel="score", ylim=(0, 1.02),
               title="Validation retrieval (dotted: untrained, dashed: frozen backbone features)")
    for ax in (ax_loss, ax_val):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_risk_coverage(curves: dict[str, pd.DataFrame], chosen: dict | None = None,
                       target_accuracy: float | None = None) -> plt.Figure:
    """Accuracy of the answered queries against the share answered (lib.retrieval.decide.risk_coverage tables, one per
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


RIGHT, WRONG, NEUTRAL, QUERY = "#2ca02c", "#d62728", "#7f7f7f", "#1f4e9c"
THUMB = 192  # px, longer side of a thumbnail: enough to see a pattern, small enough for 60 of them in one figure


def thumbnail(image: Image.Image | str | Path, size: int = THUMB) -> Image.Image:
    """An RGB copy no larger than size x size; a path is opened with lib.data.images (EXIF-upright, any mode)."""
    im = open_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
    im = im.copy()
    im.thumbnail((size, size))
    return im


def show_thumb(ax: plt.Axes, image, caption: str, colour: str | None = None) -> None:
    """An image with a thick coloured frame (green right, red wrong) and a caption above it."""
    ax.imshow(thumbnail(image))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        spine.set_color(colour or "white")
        spine.set_linewidth(5)
    ax.set_title(caption, fontsize=8, color=colour if colour in (RIGHT, WRONG) else "black")


def neighbour_cells(ev: Evaluation, i: int, k: int, with_group: bool = False) -> list[tuple[str, str, str]]:
    """(image path, caption, frame colour) of query i's first k gallery neighbours."""
    root = Path(ev.data_root)
    true = ev.queries["label"].iat[i]
    cells = []
    real = ev.neighbours[i, :k] != NO_NEIGHBOUR  # padding of a context-restricted search is no photo to show
    for rank, (g, d) in enumerate(zip(ev.neighbours[i, :k][real], ev.distances[i, :k][real]), start=1):
        row = ev.gallery.iloc[g]
        caption = f"#{rank} {row['label']}" + (f"\n{row['group']}" if with_group else "") + f"\nd={d:.3f}"
        cells.append((str(root / row["path"]), caption, RIGHT if row["label"] == true else WRONG))
    return cells


def query_caption(row: pd.Series) -> str:
    verdict = f" [{row['verdict']}]" if row.get("verdict", "accepted") != "accepted" else ""
    return f"QUERY {row['label']}\n-> {row['pred']} ({row['score']:.2f}){verdict}"


def plot_retrieval_grid(ev: Evaluation, rows, k: int = 5, title: str = "", with_group: bool = False) -> plt.Figure:
    """One line per query: the query (blue frame) with its vote, then its top-k gallery photos with label (and
    group) and distance, framed green where the label is the query's and red where it is not."""
    rows = list(rows)
    k = min(k, ev.neighbours.shape[1])
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.9 * (k + 1), (2.5 if with_group else 2.3) * len(rows)),
                             squeeze=False)
    root = Path(ev.data_root)
    for line, i in zip(axes, rows):
        q = ev.queries.iloc[i]
        show_thumb(line[0], root / q["path"], query_caption(q), QUERY)
        for ax, (path, caption, colour) in zip(line[1:], neighbour_cells(ev, i, k, with_group)):
            show_thumb(ax, path, caption, colour)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_confused_pairs(ev: Evaluation, pairs: pd.DataFrame, n: int = 8) -> plt.Figure:
    """Each most-confused pair as an image pair: a query and the gallery photo it was mistaken for."""
    pairs = pairs[pairs["example_match"] != ""].head(n)
    cols = 2 * min(2, max(len(pairs), 1))
    lines = max(1, -(-len(pairs) // 2))
    fig, axes = plt.subplots(lines, cols, figsize=(2.2 * cols, 2.5 * lines), squeeze=False)
    root = Path(ev.data_root)
    labels = dict(zip(ev.queries["path"], ev.queries["label"]))
    preds = dict(zip(ev.queries["path"], ev.queries["pred"]))
    for ax in axes.flat:
        ax.axis("off")
    for j, (_, p) in enumerate(pairs.iterrows()):
        a, b = axes.flat[2 * j], axes.flat[2 * j + 1]
        for ax in (a, b):
            ax.axis("on")
        q = p["example_query"]
        show_thumb(a, root / q, f"query: {labels[q]}\n({p['errors']} errors in pair)", WRONG)
        show_thumb(b, root / p["example_match"], f"taken for: {preds[q]}", NEUTRAL)
    fig.suptitle("Most-confused class pairs: an example of each", fontsize=11)
    fig.tight_layout()
    return fig


def _label_font(n: int) -> int:
    """Tick labels that fit: one row of text per class at the figure heights used here."""
    return 10 if n <= 15 else 8 if n <= 40 else 6


def plot_confusion(view: pd.DataFrame, n_classes: int | None = None) -> plt.Figure:
    """Row-normalised confusion matrix (seaborn heatmap); a square-root colour scale so that small confusions stay
    visible.

    `view` comes from lib.analysis.tables.confusion_view (at most its top_n most confused classes, so 300 classes
    draw as a readable block); `n_classes` (all classes) puts 'top N of M' in the title. Cell size and font follow
    the number of classes, so labels never overlap; shares are written in the cells while they fit (up to 15).
    """
    n = len(view)
    cell = 0.5 if n <= 15 else 0.28
    side = max(4.0, cell * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    sns.heatmap(view, ax=ax, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), square=True, annot=n <= 15,
                fmt=".2f", annot_kws={"fontsize": 8}, mask=view.to_numpy() == 0 if n <= 15 else None,
                xticklabels=True, yticklabels=True, cbar_kws={"label": "share of row", "fraction": 0.046, "pad": 0.04})
    ax.set_facecolor(plt.get_cmap("Blues")(0.0))  # masked (zero) cells read as zero, not as a hole
    font = _label_font(n)
    ax.tick_params(axis="x", labelrotation=90, labelsize=font)
    ax.tick_params(axis="y", labelrotation=0, labelsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    title = "Confusion matrix (share of each true class's queries)"
    if n_classes and n_classes > n:
        title = f"Confusion among the {n} most confused of {n_classes} classes\n(rows: share of the class's queries)"
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_class_heatmap(table: pd.DataFrame, columns=("ap", "top1"), max_classes: int = 40) -> plt.Figure:
    """Per-class scores as a seaborn heatmap (rows: classes, worst first as `table` is ordered; columns: the scores,
    each 0-1), annotated; with many classes only the first `max_classes` rows, so 300 classes stay readable."""
    shown = table[[c for c in columns if c in table.columns]].head(max_classes).astype(float)
    shown.index = [f"{c} (n={n})" for c, n in zip(shown.index, table["queries"].head(max_classes))]
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(columns), max(3.0, 0.24 * len(shown) + 1.4)))
    sns.heatmap(shown, ax=ax, cmap="RdYlGn", vmin=0, vmax=1, annot=True, fmt=".2f",
                annot_kws={"fontsize": 7 if len(shown) > 20 else 9}, yticklabels=True, cbar_kws={"label": "score"})
    ax.tick_params(axis="y", labelrotation=0, labelsize=_label_font(len(shown)))
    title = "Per-class scores, weakest first"
    if len(table) > max_classes:
        title += f"\n(weakest {max_classes} of {len(table)} classes)"
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_margins(queries: pd.DataFrame, tiny: float = 0.005) -> plt.Figure:
    """Histograms of the top-1/top-2 vote margin for right and wrong answers (errors tend to pile up near 0)."""
    wrong = errors(queries)
    margins = queries["margin"].astype(float)
    bins = np.linspace(0, max(float(margins.max()), 1e-3), 31)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, mask, colour in (("right", ~wrong, RIGHT), ("wrong", wrong, WRONG)):
        share = f"{(margins[mask] < tiny).mean():.0%} < {tiny:g}" if mask.any() else "none"
        ax.hist(margins[mask], bins=bins, color=colour, alpha=0.55, label=f"{name} (n={int(mask.sum())}, {share})")
    ax.axvline(tiny, color="k", ls=":", lw=1)
    ax.set(xlabel="vote margin between the best two classes", ylabel="queries",
           title="Margin of right and wrong answers")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_margins_by(queries: pd.DataFrame, by: str, order) -> plt.Figure:
    """Vote margin of every query of the values `order` of `by` (e.g. the worst contexts, worst first), right and
    wrong answers apart: a context whose errors sit at 0 holds look-alikes, one with confident errors label trouble."""
    wrong = errors(queries).to_numpy()
    names = [str(v) for v in order]
    x = pd.Series(np.arange(len(names)), index=names).reindex(queries[by].astype(str)).to_numpy(dtype=float)
    margins = queries["margin"].astype(float).to_numpy()
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, len(x))  # spreads equal margins apart, same every run
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(names) + 2), 4))
    for name, mask, colour in (("right", ~wrong, RIGHT), ("wrong", wrong, WRONG)):
        shown = mask & ~np.isnan(x)
        ax.scatter(x[shown] + jitter[shown], margins[shown], s=12, color=colour, alpha=0.6,
                   label=f"{name} (n={int(shown.sum())})")
    ax.set_xticks(np.arange(len(names)), names, rotation=90 if len(names) > 15 else 0)
    ax.set(xlabel=by, ylabel="vote margin between the best two classes", title=f"Vote margin per {by}")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_accuracy_by(table: pd.DataFrame, xlabel: str, title: str) -> plt.Figure:
    """Accuracy per value of a key (candidate classes, context, ...) as bars, each labelled with its query count."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(table) + 2), 4))
    x = np.arange(len(table))
    bars = ax.bar(x, table["accuracy"], color="#4C72B0")
    for bar, n in zip(bars, table["queries"]):
        ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x, [str(v) for v in table.index], rotation=90 if len(table) > 15 else 0)
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.12), title=title)
    fig.tight_layout()
    return fig


PLURAL = {"class": "classes", "label": "classes", "identity": "identities"}


def plot_error_shares(rank_table: pd.DataFrame, worst_table: pd.DataFrame, by: str) -> plt.Figure:
    """Left: rank of the true class among the errors. Right: the worst classes/contexts and the cumulative share
    of all errors they hold."""
    fig, (ax_rank, ax_worst) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax_rank.bar([str(r) for r in rank_table.index], rank_table["share_of_errors"], color=WRONG, alpha=0.8)
    ax_rank.set(xlabel="rank of the true class in the vote", ylabel="share of errors", ylim=(0, 1),
                title=f"Where the true class was in the {int(rank_table['errors'].sum())} errors")
    names = [str(v) for v in worst_table.index]
    ax_worst.bar(names, worst_table["share_of_errors"], color="#DD8452", label="share of errors")
    ax_worst.plot(names, worst_table["cumulative_share"], "k-o", ms=3, label="cumulative")
    ax_worst.set_ylim(0, 1)
    ax_worst.set_ylabel("share of all errors")
    ax_worst.set_title(f"Worst {len(worst_table)} {PLURAL.get(by, by + 's')}")
    ax_worst.tick_params(axis="x", rotation=90, labelsize=8 if len(names) > 10 else 10)
    ax_worst.legend(loc="upper left")
    fig.tight_layout()
    return fig


def plot_per_class_ap(ap: pd.DataFrame, max_classes: int = 40) -> plt.Figure:
    """Per-class AP as horizontal bars, lowest at the top; with many classes only the `max_classes` lowest."""
    shown = ap.head(max_classes)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.24 * len(shown) + 1.3)))
    y = np.arange(len(shown))
    ax.barh(y, shown["ap"], color=plt.cm.RdYlGn(shown["ap"].to_numpy()))
    ax.set_yticks(y, [f"{c} (n={n})" for c, n in zip(shown.index, shown["queries"])],
                  fontsize=8 if len(shown) > 20 else 10)
    ax.invert_yaxis()
    mean = ap["ap"].mean()
    ax.axvline(mean, color="k", ls=":", lw=1, label=f"class-balanced mAP {mean:.3f}")
    title = "Per-class AP"
    if len(ap) > max_classes:
        title += f" (lowest {max_classes} of {len(ap)} classes)"
    ax.set(xlabel="average precision", xlim=(0, 1), title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def embedding_map(emb: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates of the rows of `emb`: t-SNE (scikit-learn, cosine) or UMAP (umap-learn, if installed)."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(emb) - 1) / 3)))
        return TSNE(2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(emb)
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(emb)
    raise ValueError(f"method={method!r}; valid: tsne, umap")


def plot_embedding_map(ev: Evaluation, method: str = "tsne", max_points: int = 5000, seed: int = 0) -> plt.Figure:
    """Gallery (dots) and queries (stars; wrong ones ringed red) in 2-D, coloured by class.

    More than `max_points` photos are subsampled (t-SNE is quadratic); a legend is drawn for up to 20 classes.
    """
    labels = np.concatenate([ev.gallery["label"].to_numpy(), ev.queries["label"].to_numpy()]).astype(str)
    is_query = np.r_[np.zeros(len(ev.gallery), bool), np.ones(len(ev.queries), bool)]
    wrong = np.r_[np.zeros(len(ev.gallery), bool), errors(ev.queries).to_numpy()]
    emb = np.concatenate([ev.gallery_emb, ev.query_emb])
    keep = np.arange(len(emb))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(emb), max_points, replace=False))
    xy = embedding_map(emb[keep], method, seed)
    labels, is_query, wrong = labels[keep], is_query[keep], wrong[keep]
    classes = sorted(set(labels))
    # tab10's colours are all distinct hues; tab20 pairs a dark and a light shade of each, so only past 10 classes
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "gist_ncar")
    colour = {c: cmap(j / max(len(classes) - 1, 1) if len(classes) > 20 else j) for j, c in enumerate(classes)}
    fig, ax = plt.subplots(figsize=(9 if len(classes) <= 20 else 8, 7))
    for c in classes:
        g, q = (labels == c) & ~is_query, (labels == c) & is_query
        ax.scatter(*xy[g].T, s=14, color=colour[c], alpha=0.7, label=c)
        ax.scatter(*xy[q].T, s=90, marker="*", color=colour[c], edgecolors="k", linewidths=0.5)
    ax.scatter(*xy[wrong].T, s=180, facecolors="none", edgecolors=WRONG, linewidths=1.5, label="wrong query")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{method.upper()} of the embeddings: gallery dots, query stars ({ev.split}), coloured by class")
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
