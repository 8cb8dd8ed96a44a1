"""What the browsers show for one query: its recorded decision, or the decision for a photo from outside the split.

A result (a query of the evaluated split, or an uploaded photo) is a `QueryResult`, which the web page
(lib.analysis.browse_page, notebook 05) draws. Kept free of matplotlib and scikit-learn so that the page, which
imports it, opens fast.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lib.evaluate.record import Evaluation
from lib.retrieval.decide import DEFAULT_WEIGHTING, Thresholds, decisions
from lib.retrieval.faiss_index import NO_NEIGHBOUR, build_index, search

ALL = "(all classes)"
ANY = "(any)"                   # the verdict and outcome filters' "no filter"
OUTCOMES = ("right", "wrong")
# what each verdict tells the person looking (lib.retrieval.decide.verdicts): a known class or individual, a new one
# (nothing in the gallery is near enough), or a photo to take again (two classes about equally likely)
VERDICT_WORDS = {"accepted": "known", "unclassifiable": "new", "reshoot": "reshoot"}


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

    @property
    def top1_distance(self) -> float:
        return float(self.neighbours["distance"].iat[0]) if len(self.neighbours) else float("inf")


def decided_by(result: QueryResult, thresholds: Thresholds) -> tuple[str, str]:
    """(known | new | reshoot, the comparison that decided it): the top-1 distance against max_distance for known
    and new, the vote margin against min_margin for reshoot (lib.retrieval.decide.verdicts' order)."""
    d, limit = result.top1_distance, thresholds.max_distance
    near = f"nearest photo d = {d:.3f} " + (f"<= {limit:.3f}" if np.isfinite(limit) else "(no distance limit)")
    if result.verdict == "unclassifiable":
        return "new", f"nearest photo d = {d:.3f} > {limit:.3f}: nothing like it in the gallery"
    if result.verdict == "reshoot":
        return "reshoot", (f"margin {result.margin:.3f} < {thresholds.min_margin:.3f}: two classes about equally "
                           f"likely ({near})")
    word = VERDICT_WORDS.get(result.verdict, result.verdict)
    return word, f"{near}, margin {result.margin:.3f} >= {thresholds.min_margin:.3f}"


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


def run_thresholds(ev: Evaluation) -> Thresholds:
    """The thresholds notebook 03 applied to this evaluation (none recorded: accept every photo)."""
    return Thresholds(**ev.config.get("thresholds", {}))


def photo_embedder(run_dir: str, checkpoint: str = "best", tta: bool = False) -> Callable[[Image.Image], np.ndarray]:
    """embed_fn for photo_result: the run's model and eval transform applied to one photo on the CPU, as notebook
    03 embedded the split (with tta: mean of the photo and its mirror image). Imports torch only when called."""
    from lib.core.device import auto_settings
    from lib.retrieval.embed import extract_embeddings
    from lib.train.trained_run import load_trained

    run = load_trained(run_dir, checkpoint)
    # one photo at a time: worker processes would cost more than they save
    settings = auto_settings(device="cpu", num_workers=0)

    def embed(image: Image.Image) -> np.ndarray:
        return extract_embeddings(run.model, [(run.eval_tf(image.convert("RGB")), -1)], settings, tta=tta)[0]

    return embed


def select_queries(queries: pd.DataFrame, label: str | None = None, errors_only: bool = False,
                   verdict: str | None = None, outcome: str | None = None) -> np.ndarray:
    """Row positions of the queries of class `label` (None or ALL: every class), with verdict `verdict` and whose
    vote was `outcome` ('right' or 'wrong'; None or ANY: either); errors_only is outcome='wrong'."""
    keep = np.ones(len(queries), dtype=bool)
    if label not in (None, ALL):
        keep &= (queries["label"] == label).to_numpy()
    if verdict not in (None, ANY):
        keep &= (queries["verdict"] == verdict).to_numpy()
    right = queries["correct"].astype(bool).to_numpy()
    if errors_only or outcome == "wrong":
        keep &= ~right
    elif outcome == "right":
        keep &= right
    elif outcome not in (None, ANY):
        raise ValueError(f"outcome must be one of {OUTCOMES} or {ANY!r}, got {outcome!r}")
    return np.flatnonzero(keep)
