"""The query browser page (lib.analysis.browse_page) driven through its widgets, headless, on a constructed run whose
every answer is known; its thumbnails, run listing and the Voilà launch it is served with (no browser here: see
test_browse_browser.py)."""
import dataclasses
import io
import os
from datetime import datetime, timezone

import numpy as np
import pytest
from conftest import write_image
from PIL import Image
from test_analysis import E, constructed_evaluation

from lib.analysis import browse_page as B
from lib.analysis import browse_server, thumbs
from lib.analysis.query_results import ANY, select_queries
from lib.analysis.run_finder import evaluated_runs, newest_run
from lib.core.errors import DataError
from lib.data.images import UnreadableImage
from lib.evaluate.record import save_evaluation
from lib.retrieval.decide import Thresholds


@pytest.fixture
def runs(tmp_path):
    """runs/good (val: queries 1 and 3 'reshoot'; test: val's last 4 queries), runs/empty (never evaluated)."""
    ev = constructed_evaluation(tmp_path / "data")
    ev.queries.loc[[1, 3], "verdict"] = "reshoot"
    ev.config["thresholds"] = {"max_distance": 1.5, "min_margin": 0.2}
    save_evaluation(ev, tmp_path / "runs" / "good" / "eval" / "val")
    last4 = dataclasses.replace(ev, split="test", queries=ev.queries.iloc[4:].reset_index(drop=True),
                                neighbours=ev.neighbours[4:], distances=ev.distances[4:], query_emb=ev.query_emb[4:],
                                class_scores=ev.class_scores.iloc[4:].reset_index(drop=True))
    save_evaluation(last4, tmp_path / "runs" / "good" / "eval" / "test")
    (tmp_path / "runs" / "empty").mkdir()
    return tmp_path / "runs", ev


def page(runs_root, run="good", embedder=None, **kw) -> B.BrowsePage:
    kw.setdefault("thumbs_dir", str(runs_root.parent / "thumbs"))
    return B.BrowsePage(evaluated_runs(runs_root), str(runs_root / run), k=3, embedder=embedder, **kw)


def shown(p: B.BrowsePage) -> list[str]:
    """Captions of the neighbour cards on display."""
    return [c.caption.value for c in p.cards if c.box.layout.display != "none"]


def upload(p: B.BrowsePage, name: str, content: bytes) -> None:
    p.upload.value = ({"name": name, "type": "", "size": len(content), "content": memoryview(content),
                       "last_modified": datetime.now(timezone.utc)},)


def png(colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "PNG")
    return buf.getvalue()


def test_evaluated_runs_lists_runs_with_an_evaluation_val_first(runs, tmp_path):
    root, _ = runs
    assert evaluated_runs(root) == {str(root / "good"): ["val", "test"]}
    assert newest_run(root) == str(root / "good")
    assert evaluated_runs(tmp_path / "nowhere") == {} and newest_run(tmp_path / "nowhere") is None


def test_select_queries_by_verdict_and_outcome(runs):
    q = runs[1].queries  # right: 0 2 4 7; wrong: 1 3 5 6; reshoot: 1 3
    assert select_queries(q, verdict="reshoot").tolist() == [1, 3]
    assert select_queries(q, outcome="right").tolist() == [0, 2, 4, 7]
    assert select_queries(q, outcome="wrong", verdict="accepted").tolist() == [5, 6]
    assert select_queries(q, "b", verdict=ANY, outcome=ANY).tolist() == [2, 3]
    with pytest.raises(ValueError, match="outcome must be one of"):
        select_queries(q, outcome="maybe")


def test_opens_on_the_first_query_with_k_captioned_neighbours(runs):
    root, ev = runs
    p = page(root)
    assert p.run.value == str(root / "good") and list(p.split.options) == ["val", "test"]
    assert p.count.value == "8 of 8 queries" and p.picker.value == 0 and p.message.value == ""
    assert ev.queries["path"].iat[0] in p.title.value and "RIGHT" in p.title.value
    captions = shown(p)
    assert len(captions) == 3
    for caption, g, d in zip(captions, ev.neighbours[0], ev.distances[0]):
        row = ev.gallery.iloc[g]
        assert row["label"] in caption and f"group {row['group']}" in caption and f"{d:.3f}" in caption
    assert all(Image.open(io.BytesIO(c.image.value)).size == (96, 72) for c in p.cards)  # small photos stay as they are


def test_filters_narrow_the_list_and_keep_or_replace_the_shown_query(runs):
    root, ev = runs
    p = page(root)
    p.outcome.value = "wrong"
    assert [v for _, v in p.picker.options] == [1, 3, 5, 6] and p.count.value == "4 of 8 queries"
    assert p.picker.value == 1 and ev.queries["path"].iat[1] in p.title.value, "query 0 left the list: its first shows"
    p.verdict.value = "reshoot"
    assert [v for _, v in p.picker.options] == [1, 3] and p.picker.value == 1
    p.picker.value = 3
    assert ev.queries["path"].iat[3] in p.title.value and "WRONG" in p.title.value
    p.label.value = "d"
    assert p.picker.options == () and "no query matches" in p.message.value and shown(p) == []
    p.label.value = B.ALL
    assert p.picker.value == 1 and p.message.value == ""


def test_a_run_without_evaluation_says_so_and_another_run_works_again(runs):
    root, ev = runs
    p = page(root, run="empty")
    assert "no evaluation in" in p.message.value and "run notebook 03" in p.message.value
    assert p.picker.options == () and shown(p) == [] and p.title.value == ""
    p.run.value = str(root / "good")
    assert p.message.value == "" and len(p.picker.options) == 8 and len(shown(p)) == 3
    p.split.value = "test"
    assert p.ev.split == "test" and p.count.value == "4 of 4 queries" and len(shown(p)) == 3
    assert p.picker.value == 0 and ev.queries["path"].iat[4] in p.title.value, "the new split's first query shows"


def test_a_run_named_with_a_trailing_slash_is_the_listed_run(runs):
    root, _ = runs
    p = B.BrowsePage(evaluated_runs(root), f"{root}/good/", thumbs_dir=str(root.parent / "thumbs"))
    assert list(p.run.options) == [str(root / "good")] and list(p.split.options) == ["val", "test"]


def test_a_damaged_evaluation_is_a_message(runs):
    root, _ = runs
    (root / "good" / "eval" / "val" / "arrays.npz").unlink()
    p = page(root)
    assert "cannot be read" in p.message.value and "arrays.npz" in p.message.value and shown(p) == []


def test_a_moved_photo_is_grey_and_named(runs):
    root, ev = runs
    moved = ev.gallery["path"].iat[ev.neighbours[0, 1]]
    os.remove(os.path.join(ev.data_root, moved))
    p = page(root)
    assert len(shown(p)) == 3, "the other photos keep their places"
    assert p.cards[1].image.value == B.MISSING and p.cards[0].image.value != B.MISSING
    assert "1 photo(s) could not be shown" in p.message.value and moved in p.message.value


def test_upload_shows_the_neighbours_and_the_decision_with_the_run_thresholds(runs):
    """A photo embedded as query 3 gets query 3's neighbours; its verdict follows the run's thresholds."""
    root, ev = runs
    made = []

    def embedder(run_dir, checkpoint, tta):
        made.append((run_dir, checkpoint, tta))
        return lambda image: ev.query_emb[3] if image.getpixel((0, 0))[0] > 128 else E[5]

    p = page(root, embedder=embedder)
    upload(p, "new.png", png("red"))
    assert "new.png" in p.title.value and "true: unknown" in p.title.value
    assert "d &lt;= 1.500, margin &gt;= 0.200" in p.title.value
    first = ev.gallery.iloc[ev.neighbours[3, 0]]
    assert first["label"] in shown(p)[0] and f"{ev.distances[3, 0]:.3f}" in shown(p)[0]
    assert p.picker.value is None and p.message.value == ""
    upload(p, "far.png", png("blue"))  # nothing in the gallery lies along axis 5: beyond max_distance
    assert "unclassifiable" in p.title.value
    assert made == [(str(root / "good"), "best", False)], "the model is loaded once, at the first upload"


def test_upload_of_a_non_image_or_without_a_model(runs):
    root, _ = runs
    p = page(root, embedder=lambda *a: pytest.fail("no model for a file that is not an image"))
    upload(p, "notes.txt", b"these are not pixels")
    assert "notes.txt: not an image" in p.message.value
    off = page(root, upload=False)
    assert off.upload.disabled


@pytest.mark.parametrize("error, said", [(DataError("no checkpoint runs/good/best_model.pt"), "no checkpoint runs"),
                                         (RuntimeError("size mismatch"), "unexpected error (RuntimeError): size")])
def test_a_failing_model_load_is_a_message(runs, error, said):
    def embedder(*_):
        raise error

    p = page(runs[0], embedder=embedder)
    upload(p, "new.png", png())
    assert said in p.message.value


def test_thumbnails_are_made_once_and_again_for_a_changed_photo(tmp_path, monkeypatch):
    photo = write_image(tmp_path / "big.jpg", size=(900, 600))
    decoded = []
    real = thumbs.load_resized
    monkeypatch.setattr(thumbs, "load_resized", lambda *a, **kw: decoded.append(a) or real(*a, **kw))
    first = thumbs.thumbnail(photo, tmp_path / "cache")
    assert Image.open(io.BytesIO(first)).size == (thumbs.THUMB_PX, 128)
    assert thumbs.thumbnail(photo, tmp_path / "cache") == first and len(decoded) == 1
    write_image(photo, size=(300, 600), seed=1)
    os.utime(photo, ns=(1, 1))  # another mtime, whatever the clock's resolution
    assert Image.open(io.BytesIO(thumbs.thumbnail(photo, tmp_path / "cache"))).size == (96, thumbs.THUMB_PX)
    assert len(decoded) == 2
    with pytest.raises(UnreadableImage, match="gone.jpg: cannot read file"):
        thumbs.thumbnail(tmp_path / "gone.jpg", tmp_path / "cache")
    (tmp_path / "fake.jpg").write_text("no pixels")
    with pytest.raises(UnreadableImage, match="fake.jpg: not an image"):
        thumbs.thumbnail(tmp_path / "fake.jpg", tmp_path / "cache")


def test_the_page_notebook_gets_the_page_parameters_and_voila_stays_local(tmp_path):
    import nbformat

    nb = nbformat.read(browse_server.prepare_page(tmp_path, "runs/x", "test", "runs", 4, "cache/t"), as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    for line in ('run_dir = "runs/x"', 'split = "test"', "k = 4", "report = False", "browser = True"):
        assert line in injected.source
    cmd = browse_server.voila_command(tmp_path / "page.ipynb", 8999)
    assert "--Voila.ip=127.0.0.1" in cmd and "--port=8999" in cmd and "--template=browse" in cmd
    assert sum("extension_allowlist" in a for a in cmd) == len(browse_server.WIDGET_EXTENSIONS)
    assert browse_server.free_port(8999) >= 8999


def test_thresholds_are_the_recorded_ones(runs):
    from lib.analysis.query_results import run_thresholds

    assert run_thresholds(runs[1]) == Thresholds(max_distance=1.5, min_margin=0.2)
    runs[1].config.pop("thresholds")
    assert run_thresholds(runs[1]) == Thresholds() and np.isinf(run_thresholds(runs[1]).max_distance)


def test_the_title_says_known_new_or_reshoot_with_the_distance_or_margin_that_decided_it(runs):
    from lib.analysis.query_results import query_result

    runs_root, ev = runs
    p = page(runs_root, upload=False)
    d = ev.distances[:, 0]
    pred = ev.queries["pred"].iat[0]
    assert f"<b>known: {pred}</b> &mdash; nearest photo d = {d[0]:.3f} &lt;= 1.500, margin " in p.title.value
    p.picker.value = 1  # recorded 'reshoot' (the fixture's thresholds: max_distance 1.5, min_margin 0.2)
    shares = np.sort(ev.class_scores.iloc[1].to_numpy())[::-1]
    assert (f"<b>reshoot</b> &mdash; margin {shares[0] - shares[1]:.3f} &lt; 0.200: two classes about equally likely "
            f"(nearest photo d = {d[1]:.3f} &lt;= 1.500)") in p.title.value
    assert dict((v, k) for k, v in p.verdict.options[1:]) == {"accepted": "known (accepted)", "reshoot": "reshoot"}
    assert "(a -> " in p.picker.options[0][0] and ", known (accepted))" in p.picker.options[0][0]
    far = dataclasses.replace(query_result(ev, 0), verdict="unclassifiable")
    said = B.title_html(far, thresholds=Thresholds(max_distance=d[0] / 2))
    assert f"<b>new</b> &mdash; nearest photo d = {d[0]:.3f} &gt; {d[0] / 2:.3f}: nothing like it" in said
    assert "(no distance limit)" in B.title_html(query_result(ev, 0))


def test_the_clusters_notebook_03_grouped_the_queries_in_filter_the_list(runs):
    root, ev = runs
    assert page(root).cluster.options == (B.ALL,), "an evaluation made before clustering: nothing to filter by"
    ev.queries["cluster_unknown"] = [0, 0, 1, -1, 1, 0, -1, 2]  # -1: a query not clustered (calibration part)
    save_evaluation(ev, root / "good" / "eval" / "val")
    p = page(root)
    assert p.cluster.options == (B.ALL, 0, 1, 2) and p.count.value == "8 of 8 queries"
    p.cluster.value = 1
    assert [v for _, v in p.picker.options] == [2, 4] and p.picker.options[0][0].endswith(", cluster 1)")
    p.outcome.value = "wrong"
    assert [v for _, v in p.picker.options] == []
    p.outcome.value, p.cluster.value = ANY, 0
    assert [v for _, v in p.picker.options] == [0, 1, 5]
