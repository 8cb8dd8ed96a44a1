"""The query browser as a page a person opens: notebook 05's last cell, served by `make browse` (Voilà) and the same
in JupyterLab. Pick a run and split, filter the queries by class, verdict and right/wrong, see a query beside its
top-K gallery photos (label, group, distance, vote, verdict), or upload a photo and see what the run's model answers
with the run's thresholds.

Built from plain ipywidgets: every photo is an <img> of a cached thumbnail (lib.analysis.thumbs), so a new query
sends K+1 small JPEGs instead of drawing a figure. Whatever a person can meet (a run without an evaluation, a file
that is not an image, a photo moved since the evaluation, a checkpoint gone) becomes a message on the page, never a
traceback.
"""
from __future__ import annotations

import functools
import html
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as w
import numpy as np
from PIL import Image

from lib.analysis.query_results import (
    ALL,
    ANY,
    OUTCOMES,
    VERDICT_WORDS,
    QueryResult,
    decided_by,
    photo_embedder,
    photo_result,
    query_result,
    run_thresholds,
    select_queries,
)
from lib.analysis.run_finder import evaluated_runs
from lib.analysis.thumbs import jpeg_bytes, thumbnail
from lib.core.errors import DataError
from lib.data.images import UnreadableImage, open_image
from lib.evaluate.record import VERDICTS, Evaluation, load_evaluation
from lib.retrieval.decide import Thresholds
from lib.retrieval.faiss_index import build_index

# frame colours of lib.analysis.figures, written again: importing it would bring matplotlib and scikit-learn (about
# a second) into the page's first render
RIGHT, WRONG, NEUTRAL, QUERY = "#2ca02c", "#d62728", "#7f7f7f", "#1f4e9c"
CARD_PX = 170
# shown where a photo cannot be read (moved, deleted): grey, so the other photos keep their places
MISSING = jpeg_bytes(Image.new("RGB", (CARD_PX, CARD_PX), "#d0d0d0"))

EmbedderFactory = Callable[[str, str, bool], Callable[[Image.Image], np.ndarray]]


def _esc(x) -> str:
    return html.escape(str(x))


def _reported(handler):
    """A widget callback whose failure shows on the page: in Voilà a callback's exception only reaches the server
    log, so the person would see nothing happen."""
    @functools.wraps(handler)
    def run(self, *args):
        try:
            return handler(self, *args)
        except DataError as e:
            self.say(str(e))
        except Exception as e:  # anything else is a bug, but the page must still say that something failed
            self.say(f"unexpected error ({type(e).__name__}): {e}")
    return run


def option_label(q) -> str:
    """A query as the list shows it: right or wrong, path, true -> voted class, verdict (known / new / reshoot), and
    the cluster notebook 03 grouped it in."""
    mark = "ok " if q["correct"] else "ERR"
    col = cluster_column(q.index)
    cluster = f", cluster {q[col]}" if col and int(q[col]) >= 0 else ""
    return f"{mark} {q['path']}  ({q['label']} -> {q['pred']}, {verdict_word(q['verdict'])}{cluster})"


def cluster_column(columns) -> str | None:
    """The queries' cluster ids notebook 03 wrote (lib.evaluate.cluster_eval): the unknown queries' where an open split
    has them, else all queries'; None for an evaluation made before clustering."""
    return next((c for c in ("cluster_unknown", "cluster_all") if c in columns), None)


def verdict_word(verdict: str) -> str:
    """'known (accepted)', 'new (unclassifiable)', 'reshoot': what the verdict means, and its recorded name."""
    word = VERDICT_WORDS.get(verdict, verdict)
    return word if word == verdict else f"{word} ({verdict})"


def vote_text(result: QueryResult) -> str:
    top = result.votes[result.votes > 0].head(3)
    return ", ".join(f"{c} {s:.2f}" for c, s in top.items())


def decision_html(result: QueryResult, thresholds: Thresholds) -> str:
    """The verdict as known (with the class) / new / reshoot, and the distance or margin that decided it."""
    word, why = decided_by(result, thresholds)
    what = f"{word}: {result.pred}" if word == "known" else word
    return f'<span class="browse-decision"><b>{_esc(what)}</b> &mdash; {_esc(why)}</span>'


def title_html(result: QueryResult, thresholds_note: str = "", thresholds: Thresholds | None = None) -> str:
    """The result's headline: what it is, the vote, margin and verdict, whether the vote was right, and the verdict
    as known / new / reshoot with what decided it (under `thresholds`; None: accept every query)."""
    truth = f"true: <b>{_esc(result.label)}</b>" if result.label is not None else "true: unknown"
    right = ""
    if result.label is not None:
        ok = result.pred == result.label
        right = f' &middot; <b style="color:{RIGHT if ok else WRONG}">{"RIGHT" if ok else "WRONG"}</b>'
    return (f"<b>{_esc(result.name)}</b> &middot; {truth}<br>vote: {_esc(vote_text(result))} &middot; "
            f"margin {result.margin:.3f} &middot; verdict: <b>{_esc(result.verdict)}</b>{right}"
            f"<br>{decision_html(result, thresholds or Thresholds())}"
            + (f"<br><small>{_esc(thresholds_note)}</small>" if thresholds_note else ""))


def neighbour_caption(rank: int, n, colour: str) -> str:
    return (f'<div style="color:{colour};line-height:1.25"><b>#{rank} {_esc(n.label)}</b><br>'
            f"group {_esc(n.group)}<br>d = {n.distance:.3f}</div>")


class _Card:
    """One photo with a coloured frame and a caption under it."""

    def __init__(self, css_class: str):
        self.image = w.Image(format="jpeg", layout=w.Layout(width=f"{CARD_PX}px", height=f"{CARD_PX}px",
                                                             object_fit="contain"))
        self.image.add_class(css_class)
        self.caption = w.HTML()
        self.caption.add_class(f"{css_class}-caption")
        self.box = w.VBox([self.image, self.caption], layout=w.Layout(width=f"{CARD_PX + 14}px", margin="0 6px 0 0",
                                                                      display="none"))

    def show(self, data: bytes, caption: str, colour: str) -> None:
        self.image.value = data
        self.image.layout.border = f"5px solid {colour}"
        self.caption.value = caption
        self.box.layout.display = "flex"

    def hide(self) -> None:
        self.box.layout.display = "none"


class BrowsePage:
    """The page's widgets and what they do; `widget` is what to display.

    runs: {run folder: evaluated splits} (lib.analysis.run_finder.evaluated_runs); `run_dir` is shown first and
    may be missing from it (then the page says why it cannot be browsed). upload=False leaves the model unloaded.
    """

    def __init__(self, runs: dict[str, list[str]], run_dir: str, split: str = "val", k: int = 5,
                 thumbs_dir: str = "cache/thumbs", upload: bool = True, embedder: EmbedderFactory = photo_embedder):
        self.runs, self.k, self.thumbs_dir, self.embedder = runs, k, thumbs_dir, embedder
        run_dir = str(Path(run_dir))  # runs/demo/ and ./runs/demo name the run the listing calls runs/demo
        self.ev: Evaluation | None = None
        self.run_dir = ""
        self._index = None                   # Faiss index over the gallery, built at the first upload
        self._embed_fns: dict[tuple, Callable] = {}
        self._quiet = False                  # set while the page itself changes the query list
        self._shown: int | None = None       # the query row on display (None: nothing, or an uploaded photo)

        def dropdown(description, css_class, **kw):
            d = w.Dropdown(description=description, layout=w.Layout(width="auto", margin="2px 12px 2px 0"),
                           style={"description_width": "initial"}, **kw)
            d.add_class(css_class)
            return d

        self.run = dropdown("run", "browse-run", options=sorted({*runs, run_dir}), value=run_dir)
        self.split = dropdown("split", "browse-split")
        self.label = dropdown("class", "browse-class")
        self.verdict = dropdown("verdict", "browse-verdict")
        self.outcome = dropdown("vote", "browse-outcome", options=[ANY, *OUTCOMES])
        self.cluster = dropdown("cluster", "browse-cluster", options=[ALL], value=ALL)
        self.count = w.Label()
        self.count.add_class("browse-count")
        self.picker = w.Select(rows=8, layout=w.Layout(width="100%"))
        self.picker.add_class("browse-queries")
        self.upload = w.FileUpload(accept="image/*", multiple=False, disabled=not upload,
                                   description="upload a photo" if upload else "upload (off)")
        self.upload.add_class("browse-upload")
        self.message = w.HTML()
        self.message.add_class("browse-message")
        self.title = w.HTML()
        self.title.add_class("browse-title")
        self.query_card = _Card("browse-query-photo")
        self.cards = [_Card("browse-neighbour") for _ in range(k)]

        self.run.observe(self._on_run, names="value")
        self.split.observe(self._on_split, names="value")
        for f in (self.label, self.verdict, self.outcome, self.cluster):
            f.observe(self._on_filter, names="value")
        self.picker.observe(self._on_pick, names="value")
        self.upload.observe(self._on_upload, names="value")

        self.widget = w.VBox([
            w.HTML("<h2 style='margin:0'>Query browser</h2><div>Pick a run and split, filter the queries, click one "
                   "to see its nearest gallery photos (green: the query's class, red: another) - or upload a photo "
                   "to see what the run's model answers.</div>"),
            w.HBox([self.run, self.split, self.upload]),
            w.HBox([self.label, self.verdict, self.outcome, self.cluster, self.count]),
            self.message, self.picker, self.title,
            w.HBox([self.query_card.box, *(c.box for c in self.cards)], layout=w.Layout(flex_flow="row wrap")),
        ])
        self.widget.add_class("browse-page")
        self._choose_run(run_dir, split)

    @contextmanager
    def _quietly(self):
        """While the page itself sets widget values, their observers do nothing."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    # what the page says
    def say(self, text: str) -> None:
        """A message above the list (red); empty text clears it."""
        self.message.value = (f'<div style="color:{WRONG};border:1px solid {WRONG};padding:4px 8px">{_esc(text)}</div>'
                              if text else "")

    # choosing what to browse
    def _choose_run(self, run_dir: str, split: str) -> None:
        splits = self.runs.get(run_dir, [])
        with self._quietly():
            self.split.options = splits
            self.split.value = split if split in splits else (splits[0] if splits else None)
        self._load(run_dir, self.split.value or split)

    @_reported
    def _on_run(self, change) -> None:
        self._choose_run(change["new"], self.split.value or "val")

    @_reported
    def _on_split(self, change) -> None:
        if not self._quiet and change["new"]:
            self._load(self.run.value, change["new"])

    def _load(self, run_dir: str, split: str) -> None:
        self.ev, self.run_dir, self._index = None, run_dir, None
        self.say("")
        self._blank()
        try:
            self.ev = load_evaluation(Path(run_dir) / "eval" / split)
        except DataError as e:
            self._clear(str(e))
            return
        except (OSError, ValueError, KeyError) as e:  # a folder with queries.csv but a missing or damaged other file
            self._clear(f"{Path(run_dir) / 'eval' / split}: the evaluation cannot be read ({e}); "
                        "run notebook 03 for this run again")
            return
        q = self.ev.queries
        with self._quietly():
            self.label.options = [ALL, *sorted(q["label"].unique())]
            self.verdict.options = [(ANY, ANY), *((verdict_word(v), v) for v in VERDICTS
                                                  if (q["verdict"] == v).any())]
            col = cluster_column(q.columns)
            self.cluster.options = [ALL, *(sorted(int(c) for c in q[col].unique() if int(c) >= 0) if col else [])]
            self.label.value, self.verdict.value, self.outcome.value, self.cluster.value = ALL, ANY, ANY, ALL
        self._refilter()

    def _clear(self, reason: str) -> None:
        self.say(reason)
        with self._quietly():
            self.picker.options = []
        self.count.value = ""
        self._blank()

    def _blank(self) -> None:
        self._shown = None
        self.title.value = ""
        for card in (self.query_card, *self.cards):
            card.hide()

    # the query list
    @_reported
    def _on_filter(self, change) -> None:
        if not self._quiet:
            self._refilter()

    def _refilter(self) -> None:
        q = self.ev.queries
        rows = select_queries(q, self.label.value, verdict=self.verdict.value, outcome=self.outcome.value)
        if self.cluster.value != ALL:
            rows = rows[q[cluster_column(q.columns)].to_numpy()[rows] == self.cluster.value]
        self.count.value = f"{len(rows)} of {len(q)} queries"
        with self._quietly():
            self.picker.options = [(option_label(q.iloc[i]), int(i)) for i in rows]
            self.picker.value = self._shown if self._shown in rows else (int(rows[0]) if len(rows) else None)
        if not len(rows):
            self._blank()
            self.say("no query matches these filters")
        elif self.picker.value != self._shown:
            self._show_query(self.picker.value)

    @_reported
    def _on_pick(self, change) -> None:
        if not self._quiet and change["new"] is not None:
            self._show_query(change["new"])

    def _show_query(self, i: int) -> None:
        self.say("")
        self._show(query_result(self.ev, i))
        self._shown = i

    # what a result looks like
    def _photo(self, path) -> tuple[bytes, str]:
        """Thumbnail bytes of `path`, or the grey stand-in and why."""
        try:
            return thumbnail(path, self.thumbs_dir), ""
        except DataError as e:
            return MISSING, str(e)

    def _show(self, result: QueryResult, thresholds_note: str = "") -> None:
        problems = []
        if isinstance(result.image, Image.Image):
            data = jpeg_bytes(result.image)
        else:
            data, problem = self._photo(result.image)
            problems += [problem] if problem else []
        self.title.value = title_html(result, thresholds_note, run_thresholds(self.ev))
        truth = "true class unknown" if result.label is None else f"true: {_esc(result.label)}"
        self.query_card.show(data, f'<div style="color:{QUERY};line-height:1.25"><b>query</b><br>{truth}</div>', QUERY)
        shown = result.neighbours.head(self.k)
        for rank, (card, n) in enumerate(zip(self.cards, shown.itertuples()), start=1):
            data, problem = self._photo(n.path)
            problems += [problem] if problem else []
            colour = NEUTRAL if result.label is None else RIGHT if n.label == result.label else WRONG
            card.show(data, neighbour_caption(rank, n, colour), colour)
        for card in self.cards[len(shown):]:
            card.hide()
        if problems:
            self.say(f"{len(problems)} photo(s) could not be shown (moved or deleted since the evaluation? photos are "
                     f"read from {self.ev.data_root}): " + "; ".join(problems))

    # a new photo
    def _embed_fn(self) -> Callable[[Image.Image], np.ndarray]:
        cfg = self.ev.config
        key = (self.run_dir, str(cfg.get("checkpoint", "best")), bool(cfg.get("tta", False)))
        if key not in self._embed_fns:
            self.say(f"loading the model of {self.run_dir} (once)...")
            self._embed_fns[key] = self.embedder(*key)
        return self._embed_fns[key]

    @_reported
    def _on_upload(self, change) -> None:
        if not change["new"]:
            return
        if self.ev is None:
            self.say("choose an evaluated run first: the upload is searched in its gallery")
            return
        f = change["new"][0]
        name = f["name"]
        with tempfile.TemporaryDirectory() as tmp:
            # decoded from a file by lib.data.images, like every photo of the project (EXIF turns, HEIC, 16-bit, ...)
            path = Path(tmp) / "upload"
            path.write_bytes(bytes(f["content"]))
            try:
                image = open_image(path)
            except UnreadableImage as e:
                self.say(f"{name}: {e.reason}")
                return
        embed_fn = self._embed_fn()
        if self._index is None:
            self._index = build_index(self.ev.gallery_emb, device="cpu")
        thresholds = run_thresholds(self.ev)
        result = photo_result(self.ev, image, embed_fn, thresholds, name=name, index=self._index)
        with self._quietly():
            self.picker.value = None  # so that clicking the query shown before shows it again
        self._shown = None
        self.say("")
        self._show(result, f"decision with the thresholds of {self.run_dir} ({self.ev.split}): nearest photo "
                           f"d <= {thresholds.max_distance:.3f}, margin >= {thresholds.min_margin:.3f}")


def browse_page(runs_root: str, run_dir: str, split: str = "val", k: int = 5, thumbs_dir: str = "cache/thumbs",
                upload: bool = True) -> w.Widget:
    """The page for the runs evaluated under `runs_root`, opened on `run_dir`/`split`."""
    return BrowsePage(evaluated_runs(runs_root), run_dir, split, k, thumbs_dir, upload).widget
