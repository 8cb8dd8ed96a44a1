"""The query browser: its render function on a constructed run, and its widgets built headless."""
import io
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from test_analysis import E, assert_real_png, constructed_evaluation  # noqa: E402

from lib.analysis import gallery as G  # noqa: E402
from lib.analysis.figures import (  # noqa: E402
    NEUTRAL,
    RIGHT,
    WRONG,
    save,  # noqa: E402
)
from lib.retrieval.decide import Thresholds  # noqa: E402


@pytest.fixture
def ev(tmp_path):
    return constructed_evaluation(tmp_path / "data")


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def frame(ax):
    return matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor())


@pytest.mark.parametrize("k", [1, 3, 4])
def test_render_query_draws_the_query_and_k_neighbours(ev, tmp_path, k):
    fig = G.render_query(ev, 1, k=k)
    axes = image_axes(fig)
    assert len(axes) == k + 1
    labels = ev.gallery["label"].to_numpy()[ev.neighbours[1, :k]]
    groups = ev.gallery["group"].to_numpy()[ev.neighbours[1, :k]]
    assert [frame(ax) for ax in axes[1:]] == [RIGHT if lab == "a" else WRONG for lab in labels]
    for ax, lab, grp, d in zip(axes[1:], labels, groups, ev.distances[1, :k]):
        assert lab in ax.get_title() and grp in ax.get_title() and f"{d:.3f}" in ax.get_title()
    title = fig._suptitle.get_text()
    assert "b 0." in title and "verdict: accepted" in title and "WRONG" in title
    assert_real_png(save(fig, tmp_path / "q.png"))
    plt.close(fig)


def test_query_without_a_neighbour_of_its_class_is_all_red(ev):
    fig = G.render_query(ev, 6, k=4)  # class 'e' has no gallery photo
    assert [frame(ax) for ax in image_axes(fig)[1:]] == [WRONG] * 4
    assert "true: e" in image_axes(fig)[0].get_title()
    plt.close(fig)


def test_photo_result_votes_like_the_recorded_decision(ev):
    """An uploaded photo whose embedding equals query 3's gets query 3's neighbours, vote and margin."""
    image = Image.new("RGB", (50, 40), "white")
    res = G.photo_result(ev, image, lambda im: ev.query_emb[3])
    recorded = G.query_result(ev, 3)
    assert res.label is None and res.pred == ev.queries["pred"].iat[3] == recorded.pred
    assert res.neighbours["path"].tolist() == recorded.neighbours["path"].tolist()
    np.testing.assert_allclose(res.neighbours["distance"], ev.distances[3], atol=1e-5)
    assert res.margin == pytest.approx(ev.queries["margin"].iat[3], abs=1e-6)
    strict = G.photo_result(ev, image, lambda im: ev.query_emb[3], Thresholds(min_margin=1.01))
    assert strict.verdict == "reshoot"
    far = G.photo_result(ev, image, lambda im: E[5], Thresholds(max_distance=1.0))
    assert far.verdict == "unclassifiable", "nothing in the gallery lies along axis 5"
    fig = G.render_result(res, k=4)
    assert len(image_axes(fig)) == 5 and {frame(ax) for ax in image_axes(fig)[1:]} == {NEUTRAL}
    plt.close(fig)


def test_select_queries(ev):
    q = ev.queries
    assert G.select_queries(q).tolist() == list(range(8))
    assert G.select_queries(q, "a").tolist() == [0, 1]
    assert G.select_queries(q, errors_only=True).tolist() == [1, 3, 5, 6]
    assert G.select_queries(q, "b", errors_only=True).tolist() == [3]
    assert G.select_queries(q, G.ALL, errors_only=True).tolist() == [1, 3, 5, 6]


def _widgets(box):
    import ipywidgets as w

    found = []
    for child in box.children:
        found += _widgets(child) if isinstance(child, w.Box) else [child]
    return found


def test_browser_builds_headless_and_filters(ev, monkeypatch):
    import ipywidgets as w

    rendered = []
    monkeypatch.setattr(G, "render_result", lambda result, k: rendered.append(result) or plt.figure())
    box = G.query_browser(ev, embed_fn=lambda im: ev.query_emb[0], k=3)
    class_filter, errors_only, count, picker, upload, out = _widgets(box)
    assert isinstance(upload, w.FileUpload) and not upload.disabled
    assert len(picker.options) == 8 and "8 of 8" in count.value
    errors_only.value = True
    assert [v for _, v in picker.options] == [1, 3, 5, 6]
    class_filter.value = "c"
    assert [v for _, v in picker.options] == [5]
    assert rendered and rendered[-1].name == ev.queries["path"].iat[5]
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    upload.value = ({"name": "new.png", "type": "image/png", "size": buf.tell(), "content": memoryview(buf.getvalue()),
                     "last_modified": datetime.now(timezone.utc)},)
    assert rendered[-1].name == "new.png" and rendered[-1].pred == "a"
    plt.close("all")


def test_browser_without_a_model_disables_upload(ev):
    import ipywidgets as w

    upload = next(x for x in _widgets(G.query_browser(ev)) if isinstance(x, w.FileUpload))
    assert upload.disabled


def test_padding_of_a_context_restricted_row_is_not_drawn(ev):
    """A query whose context held only 2 photos has padding after them (index -1, distance inf): 2 photos drawn,
    not the gallery's last row twice."""
    ev.neighbours[1, 2:], ev.distances[1, 2:] = -1, np.inf
    fig = G.render_query(ev, 1, k=4)
    assert len(image_axes(fig)) == 3
    assert len(G.query_result(ev, 1).neighbours) == 2
    plt.close(fig)
