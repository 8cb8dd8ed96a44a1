"""The query browser of notebook 05: one render function (tested directly) and the ipywidgets around it.

A result — a query of the evaluated split, or a photo uploaded in the browser — is a `QueryResult`; the same
`render_result` draws both, so what the browser shows for a new photo is what notebook 04 shows for a val query.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from lib.analysis.figures import NEUTRAL, QUERY, RIGHT, WRONG, show_thumb
from lib.analysis.tables import errors
from lib.evaluate.record import Evaluation
from lib.retrieval.decide import DEFAULT_WEIGHTING, Thresholds, decisions
from lib.retrieval.faiss_index import NO_NEIGHBOUR, build_index, search

ALL = "(all classes)"


@dataclass
class QueryResult:
    image: Image.Image | Path   # the query photo
    neighbours: pd.DataFrame    # gallery rows nearest first: path (openable), label, group, distance
    votes: pd.Series            # vote share of each class, largest first
    verdict: str                # accepted | unclassifiable | reshoot
    label: str | None = None    # true class; None for a photo from outside the split
    name: str = ""              # what to call the query (its path, or the uploaded file's name)

    @property
    def pred(self) -> str:
        return str(self.votes.index[0])

    @property
    def margin(self) -> float:
        return float(self.votes.iat[0] - (self.votes.iat[1] if len(self.votes) > 1 else 0.0))


def _neighbour_table(ev: Evaluation, rows, distances) -> pd.DataFrame:
    real = np.asarray(rows) != NO_NEIGHBOUR  # padding of a context-restricted search is no photo to show
    rows, distances = np.asarray(rows)[real], np.asarray(distances)[real]
    g = ev.gallery.iloc[rows]
    return pd.DataFrame({"path": [str(Path(ev.data_root) / p) for p in g["path"]], "label": g["label"].to_numpy(),
                         "group": g["group"].to_numpy(), "distance": np.asarray(distances, dtype=float)})


def query_result(ev: Evaluation, i: int) -> QueryResult:
    """The recorded decision for row i of ev.queries."""
    q = ev.queries.iloc[i]
    votes = ev.class_scores.iloc[i].astype(float).sort_values(ascending=False, kind="stable")
    return QueryResult(image=Path(ev.data_root) / q["path"], neighbours=_neighbour_table(ev, ev.neighbours[i],
                       ev.distances[i]), votes=votes, verdict=str(q["verdict"]), label=str(q["label"]),
                       name=str(q["path"]))


def photo_result(ev: Evaluation, image: Image.Image, embed_fn: Callable[[Image.Image], np.ndarray],
                 thresholds: Thresholds | None = None, name: str = "uploaded photo", index=None) -> QueryResult:
    """Search and vote for a new photo as notebook 03 did for the split: same k (the stored neighbour count),
    same weighting (ev.config['weighting'], else DEFAULT_WEIGHTING), verdict from `thresholds` (none: accepted).

    `index`: a lib.retrieval.faiss_index index over ev.gallery_emb, to reuse across photos.
    """
    index = index if index is not None else build_index(ev.gallery_emb, device="cpu")
    emb = np.asarray(embed_fn(image), dtype=np.float32).reshape(1, -1)
    distances, rows = search(index, emb, k=ev.neighbours.shape[1])
    classes = sorted(set(ev.class_scores.columns) | set(ev.gallery["label"]))
    labels = ev.gallery["label"].to_numpy()[rows]
    table, shares = decisions(distances, labels, classes, ev.config.get("weighting", DEFAULT_WEIGHTING), thresholds)
    votes = pd.Series(shares[0], index=classes).sort_values(ascending=False, kind="stable")
    return QueryResult(image=image, neighbours=_neighbour_table(ev, rows[0], distances[0]), votes=votes,
                       verdict=str(table["verdict"].iat[0]), name=name)


def render_result(result: QueryResult, k: int = 5) -> plt.Figure:
    """The query, then its top-k gallery photos with label, group and distance (green frame: the query's class,
    red: another; grey when the query's class is unknown); the vote and the verdict in the title."""
    shown = result.neighbours.head(k)
    fig, axes = plt.subplots(1, k + 1, figsize=(2.1 * (k + 1), 3.0), squeeze=False)
    axes = axes[0]
    truth = f"true: {result.label}" if result.label is not None else "true: unknown"
    show_thumb(axes[0], result.image, f"QUERY\n{truth}", QUERY)
    for ax, (rank, n) in zip(axes[1:], enumerate(shown.itertuples(), start=1)):
        colour = NEUTRAL if result.label is None else RIGHT if n.label == result.label else WRONG
        show_thumb(ax, n.path, f"#{rank} {n.label}\ngroup {n.group}\nd={n.distance:.3f}", colour)
    for ax in axes[1 + len(shown):]:
        ax.axis("off")
    top = result.votes[result.votes > 0].head(3)
    votes = ", ".join(f"{c} {s:.2f}" for c, s in top.items())
    right = "" if result.label is None else ("  RIGHT" if result.pred == result.label else "  WRONG")
    fig.suptitle(f"{result.name}\nvote: {votes} | margin {result.margin:.3f} | verdict: {result.verdict}{right}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def render_query(ev: Evaluation, query_row: int, k: int = 5) -> plt.Figure:
    """Figure for row `query_row` of ev.queries: the query and its top-k neighbours, vote and verdict."""
    return render_result(query_result(ev, query_row), k)


def photo_embedder(run_dir: str, checkpoint: str = "best", tta: bool = False) -> Callable[[Image.Image], np.ndarray]:
    """embed_fn for query_browser: the run's model and eval transform applied to one photo on the CPU, as notebook
    03 embedded the split (with tta: mean of the photo and its mirror image)."""
    from lib.core.device import auto_settings
    from lib.retrieval.embed import extract_embeddings
    from lib.train.trained_run import load_trained

    run = load_trained(run_dir, checkpoint)
    settings = auto_settings(device="cpu", num_workers=0)  # one photo at a time: worker processes cost more than they save

    def embed(image: Image.Image) -> np.ndarray:
        return extract_embeddings(run.model, [(run.eval_tf(image.convert("RGB")), -1)], settings, tta=tta)[0]

    return embed


def select_queries(queries: pd.DataFrame, label: str | None = None, errors_only: bool = False) -> np.ndarray:
    """Row positions of the queries of class `label` (None or ALL: every class), only the wrong ones if asked."""
    keep = np.ones(len(queries), dtype=bool)
    if label not in (None, ALL):
        keep &= (queries["label"] == label).to_numpy()
    if errors_only:
        keep &= errors(queries).to_numpy()
    return np.flatnonzero(keep)


def _option(q: pd.Series) -> str:
    mark = "ok " if q["correct"] else "ERR"
    return f"{mark} {q['path']}  ({q['label']} -> {q['pred']})"


def query_browser(ev: Evaluation, embed_fn: Callable[[Image.Image], np.ndarray] | None = None, k: int = 5,
                  thresholds: Thresholds | None = None):
    """ipywidgets browser over the queries of `ev`: filter by class and 'errors only', pick a query, or upload a
    photo (needs `embed_fn(PIL image) -> vector`, the run's model); shows render_result of the choice."""
    import ipywidgets as w
    from IPython.display import display

    q = ev.queries
    class_filter = w.Dropdown(options=[ALL, *sorted(q["label"].unique())], description="class")
    errors_only = w.Checkbox(value=False, description="errors only")
    picker = w.Dropdown(description="query", layout=w.Layout(width="70%"))
    upload = w.FileUpload(accept="image/*", multiple=False, disabled=embed_fn is None,
                          description="upload photo" if embed_fn else "upload (needs embed_fn)")
    count = w.Label()
    out = w.Output()
    index = build_index(ev.gallery_emb, device="cpu") if embed_fn else None

    def show(result: QueryResult) -> None:
        with out:
            out.clear_output(wait=True)
            fig = render_result(result, k)
            display(fig)
            plt.close(fig)

    def refilter(_=None) -> None:
        rows = select_queries(q, class_filter.value, errors_only.value)
        count.value = f"{len(rows)} of {len(q)} queries ({ev.split})"
        picker.options = [(_option(q.iloc[i]), int(i)) for i in rows]
        if len(rows) and picker.value is None:  # a new filter that drops the shown query shows its first match
            picker.value = int(rows[0])
        if len(rows) == 0:
            with out:
                out.clear_output()
                print("no query matches the filter")

    def on_pick(change) -> None:
        if change["new"] is not None:
            show(query_result(ev, change["new"]))

    def on_upload(change) -> None:
        for f in change["new"]:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(bytes(f["content"])))).convert("RGB")
            show(photo_result(ev, image, embed_fn, thresholds, name=f["name"], index=index))

    class_filter.observe(refilter, names="value")
    errors_only.observe(refilter, names="value")
    picker.observe(on_pick, names="value")
    upload.observe(on_upload, names="value")
    refilter()
    return w.VBox([w.HBox([class_filter, errors_only, count]), w.HBox([picker, upload]), out])
