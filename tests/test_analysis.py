"""Error-analysis tables and figures on a constructed Evaluation whose every answer is known by hand."""
import dataclasses
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from conftest import write_image  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import average_precision_score  # noqa: E402

from lib.analysis import figures as P  # noqa: E402
from lib.analysis import tables as A  # noqa: E402
from lib.analysis.figures import save  # noqa: E402
from lib.core.errors import DataError  # noqa: E402
from lib.evaluate.record import Evaluation, load_evaluation, save_evaluation  # noqa: E402
from lib.retrieval.decide import class_scores, vote  # noqa: E402
from lib.retrieval.faiss_index import build_index, search  # noqa: E402

K = 4
E = np.eye(6)
# gallery: class -> (context, axis its photos lie on, photos); 'd' has a single photo
GALLERY = {"a": ("north", 0, 3), "b": ("north", 1, 3), "c": ("north", 2, 2), "d": ("east", 3, 1)}
# queries: (label, context, embedding). Expected: pred, distinct classes among the top 4 (their labels)
QUERIES = [
    ("a", "north", E[0] + 0.2 * E[1]),                        # a, 2 classes (a a a b), right
    ("a", "north", E[1] + 0.5 * E[0]),                        # b, 2 (b b b a), wrong, true class 2nd
    ("b", "north", E[1] + 0.2 * E[2]),                        # b, 2 (b b b c), right
    ("b", "north", E[0] + 0.5 * E[1]),                        # a, 2 (a a a b), wrong, 2nd
    ("c", "north", E[2] + 0.3 * E[3] + 0.1 * E[0]),           # c, 3 (c c d a), right
    ("c", "north", E[1] + 0.4 * E[2]),                        # b, 2 (b b b c), wrong, 2nd
    ("e", "west", E[3] + 0.3 * E[2] + 0.15 * E[0] + E[4]),    # d, 3 (d c c a), wrong: 'e' has no gallery photo
    ("d", "east", E[3] + 0.3 * E[2] + 0.15 * E[0]),           # d, 3 (d c c a), right
]
EXPECTED_PRED = ["a", "b", "b", "a", "c", "b", "d", "d"]
EXPECTED_CANDIDATES = [2, 2, 2, 2, 3, 2, 3, 3]


def constructed_evaluation(root, queries=QUERIES, seed=0) -> Evaluation:
    """A small Evaluation decided the way notebook 03 decides (faiss top-K, inverse-distance vote), with real
    image files under `root`."""
    rng = np.random.default_rng(seed)
    g_rows, g_emb = [], []
    for label, (context, axis, n) in GALLERY.items():
        for j in range(n):
            g_rows.append({"path": f"{label}/{label}{j}_1.jpg", "label": label, "group": f"{label}{j}",
                           "context": context})
            g_emb.append(E[axis] + 0.05 * rng.standard_normal(6))
    q_rows = [{"path": f"{label}/q{i}_1.jpg", "label": label, "group": f"q{i}", "context": context}
              for i, (label, context, _) in enumerate(queries)]
    gallery, q = pd.DataFrame(g_rows), pd.DataFrame(q_rows)
    g_emb = np.array(g_emb, dtype=np.float32)
    q_emb = np.array([v for *_, v in queries], dtype=np.float32)
    distances, neighbours = search(build_index(g_emb, "cpu"), q_emb, K)
    classes = sorted(GALLERY)
    shares = class_scores(distances, gallery["label"].to_numpy()[neighbours], classes)
    winner, score, margin = vote(shares)
    q["pred"] = np.array(classes)[winner]
    q["score"], q["margin"], q["top1_distance"] = score, margin, distances[:, 0]
    q["verdict"] = "accepted"
    q["correct"] = q["pred"] == q["label"]
    hit = gallery["label"].to_numpy()[neighbours] == q["label"].to_numpy()[:, None]
    q["rank_of_true"] = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)  # as lib.evaluate.run_eval: first photo of it
    for i, path in enumerate(list(gallery["path"]) + list(q["path"])):
        write_image(root / path, size=(96, 72), seed=i)
    return Evaluation(split="val", data_root=str(root), gallery=gallery, queries=q, neighbours=neighbours,
                      distances=distances, class_scores=pd.DataFrame(shares, columns=classes), gallery_emb=g_emb,
                      query_emb=q_emb, config={"k": K, "weighting": "inverse"})


@pytest.fixture
def ev(tmp_path):
    return constructed_evaluation(tmp_path / "data")


def many_class_queries(n_classes=300, seed=0) -> pd.DataFrame:
    """300 classes, 3 queries each; classes c000-c059 lose some queries to a neighbour class."""
    rng = np.random.default_rng(seed)
    names = [f"c{i:03d}" for i in range(n_classes)]
    rows = []
    for i, name in enumerate(names):
        for j in range(3):
            wrong = i < 60 and rng.random() < 0.6
            pred = names[(i + 1 + rng.integers(0, 3)) % n_classes] if wrong else name
            rows.append({"path": f"{name}/{j}.jpg", "label": name, "pred": pred, "correct": pred == name})
    return pd.DataFrame(rows)


def assert_real_png(path, min_bytes=10_000):
    assert path.stat().st_size > min_bytes, f"{path.name}: {path.stat().st_size} bytes"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.reshape(-1, 3).std(axis=0).max() > 10, f"{path.name} is (nearly) a single colour"


def test_constructed_run_is_what_the_tests_assume(ev):
    assert ev.queries["pred"].tolist() == EXPECTED_PRED
    assert ev.queries["rank_of_true"].tolist() == [1, 4, 1, 4, 1, 4, 0, 1]
    assert A.true_class_rank(ev).tolist() == [1, 2, 1, 2, 1, 2, 0, 1]


def test_candidate_counts_match_a_set_count(ev):
    labels = ev.gallery["label"].to_numpy()[ev.neighbours]
    assert A.candidate_counts(ev).tolist() == [len(set(r)) for r in labels] == EXPECTED_CANDIDATES
    assert A.candidate_counts(ev, k=1).tolist() == [1] * 8
    # padding (a context-restricted row shorter than k) adds no class: rows cut to their first 2 real neighbours
    ev.neighbours[:, 2:], ev.distances[:, 2:] = -1, np.inf
    assert A.candidate_counts(ev).tolist() == [len(set(r[:2])) for r in labels]


def test_accuracy_by_candidates_and_by_context_candidates(ev):
    by_cand = A.accuracy_by(ev.queries, A.candidate_counts(ev), "candidates")
    assert by_cand.index.tolist() == [2, 3]
    assert by_cand["queries"].tolist() == [5, 3] and by_cand["errors"].tolist() == [3, 1]
    np.testing.assert_allclose(by_cand["accuracy"], [2 / 5, 2 / 3])
    np.testing.assert_allclose(by_cand["share_of_errors"], [0.75, 0.25])
    # gallery classes in the query's context: north has a, b, c; east only d; west (the 'e' query) none
    assert A.context_candidates(ev).tolist() == [3] * 6 + [0, 1]
    by_ctx = A.accuracy_by(ev.queries, A.context_candidates(ev), "candidates")
    assert by_ctx["accuracy"].to_dict() == {0: 0.0, 1: 1.0, 3: 0.5}
    no_context = Evaluation(**{**ev.__dict__, "queries": ev.queries.drop(columns="context")})
    assert A.context_candidates(no_context) is None


def test_confused_pairs_counts_and_examples(ev):
    pairs = A.confused_pairs(ev)
    assert pairs[["class_a", "class_b", "a_as_b", "b_as_a", "errors"]].values.tolist() == [
        ["a", "b", 1, 1, 2], ["b", "c", 0, 1, 1], ["d", "e", 0, 1, 1]]
    np.testing.assert_allclose(pairs["share_of_errors"], [0.5, 0.25, 0.25])
    first = pairs.iloc[0]
    assert first["example_query"] in {"a/q1_1.jpg", "b/q3_1.jpg"}
    g = ev.gallery.set_index("path")
    q = ev.queries.set_index("path")
    assert g.loc[first["example_match"], "label"] == q.loc[first["example_query"], "pred"]
    assert A.confused_pairs(ev, top=1).shape[0] == 1


def test_worst_always_fail_and_rank_of_true(ev):
    w = A.worst(ev.queries, "label")
    assert w.index.tolist() == ["e", "a", "b", "c"] and w["errors"].tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(w["cumulative_share"], [0.25, 0.5, 0.75, 1.0])
    by_ctx = A.worst(ev.queries, "context", top=1)
    assert by_ctx.index.tolist() == ["north"] and by_ctx["share_of_errors"].tolist() == [0.75]
    fail = A.always_fail(ev)
    assert fail.index.tolist() == ["e"] and fail.iloc[0].tolist() == [1, 0, "d"]
    ranks = A.rank_of_true_table(ev)
    assert ranks["errors"].to_dict() == {"2": 3, A.NOT_RANKED: 1}


def test_margin_summary_against_numpy(ev):
    m = A.margin_summary(ev.queries, thresholds=(0.5,))
    wrong = ~ev.queries["correct"].to_numpy()
    margins = ev.queries["margin"].to_numpy()
    assert m.loc["wrong", "queries"] == 4 and m.loc["right", "queries"] == 4
    assert m.loc["wrong", "median"] == pytest.approx(np.median(margins[wrong]))
    assert m.loc["right", "share_below_0.5"] == pytest.approx(np.mean(margins[~wrong] < 0.5))


def test_per_class_ap_against_sklearn(ev):
    g = ev.gallery_emb / np.linalg.norm(ev.gallery_emb, axis=1, keepdims=True)
    q = ev.query_emb / np.linalg.norm(ev.query_emb, axis=1, keepdims=True)
    sims = q @ g.T
    expected = {}
    for i, label in enumerate(ev.queries["label"]):
        truth = ev.gallery["label"].to_numpy() == label
        if truth.any():
            expected.setdefault(label, []).append(average_precision_score(truth, sims[i]))
    table = A.per_class_ap(ev)
    assert set(table.index) == {"a", "b", "c", "d"}, "'e' has no gallery photo, so no AP"
    for label, aps in expected.items():
        assert table.loc[label, "ap"] == pytest.approx(np.mean(aps), abs=1e-6), label
    assert table["ap"].is_monotonic_increasing
    assert table.loc["d", "gallery_photos"] == 1
    for label in table.index:  # top1: the share of the class's queries decided as the class, counted by hand
        rows = [p == label for t, p in zip(ev.queries["label"], ev.queries["pred"]) if t == label]
        assert table.loc[label, "top1"] == pytest.approx(sum(rows) / len(rows)), label


def test_worst_queries_and_paths(ev):
    rows = A.worst_queries(ev.queries, 5)
    wrong = set(np.flatnonzero(~ev.queries["correct"].to_numpy()))
    assert set(rows[:4]) == wrong
    assert np.all(np.diff(ev.queries["score"].to_numpy()[rows[:4]]) <= 0), "most confidently wrong first"
    right = ev.queries[ev.queries["correct"]]
    assert rows[4] == ev.queries.index.get_loc(right["margin"].idxmin())
    assert A.rows_for_paths(ev.queries, ["d/q7_1.jpg", "a/q0_1.jpg"]).tolist() == [7, 0]
    with pytest.raises(ValueError, match="nope.jpg"):
        A.rows_for_paths(ev.queries, ["nope.jpg"])


def test_key_findings(ev):
    f = A.key_findings(ev)
    assert f["errors"] == 4 and f["error_rate"] == 0.5
    assert f["errors_with_true_class_second"] == 0.75
    assert f["classes_always_failing"] == 1
    assert f["worst_10_contexts_share_of_errors"] == pytest.approx(1.0)
    assert f["accuracy_fewest_candidates"] == pytest.approx(0.4)


def test_small_confusion_view_is_the_full_row_normalised_matrix(ev):
    view = A.confusion_view(ev.queries, top_n=30)
    assert list(view.index) == list(view.columns) == ["a", "b", "c", "d", "e"]
    assert view.loc["a", "a"] == 0.5 and view.loc["a", "b"] == 0.5 and view.loc["e", "d"] == 1.0
    np.testing.assert_allclose(view.drop(index="d").sum(axis=1), 1.0)


def test_many_class_confusion_keeps_the_most_confused():
    q = many_class_queries()
    view = A.confusion_view(q, top_n=30)
    assert view.shape == (30, 30)
    wrong = q[~q["correct"]]
    involvement = Counter(wrong["label"]) + Counter(wrong["pred"])
    ranked = sorted(involvement, key=lambda c: (-involvement[c], c))
    assert list(view.index) == ranked[:30]
    counts = Counter(zip(wrong["label"], wrong["pred"]))
    a, b = next((t, p) for (t, p) in counts if t in view.index and p in view.index)
    assert view.loc[a, b] == pytest.approx(counts[(a, b)] / 3), "rows are shares of all of the class's queries"


def _overlaps(labels) -> bool:
    boxes = [t.get_window_extent() for t in labels if t.get_text()]
    return any(b1.overlaps(b2) for b1, b2 in zip(boxes, boxes[1:]))


@pytest.mark.parametrize("case", ["5 classes", "300 classes"])
def test_confusion_figure_is_readable(ev, tmp_path, case):
    q = ev.queries if case == "5 classes" else many_class_queries()
    view = A.confusion_view(q, top_n=30)
    fig = P.plot_confusion(view, n_classes=q["label"].nunique())
    fig.canvas.draw()
    ax = fig.axes[0]
    assert len(ax.get_yticklabels()) == len(view) <= 30
    assert not _overlaps(ax.get_yticklabels()) and not _overlaps(ax.get_xticklabels())
    assert ("most confused of 300" in ax.get_title()) == (case == "300 classes")
    assert_real_png(save(fig, tmp_path / "confusion.png"))
    plt.close(fig)


def test_confusion_heatmap_draws_the_view_and_the_class_heatmap_the_table(ev, tmp_path):
    view = A.confusion_view(ev.queries, top_n=30)
    fig = P.plot_confusion(view)
    mesh = fig.axes[0].collections[0]  # seaborn's QuadMesh; zero cells are masked in small matrices
    np.testing.assert_allclose(np.ma.filled(mesh.get_array(), 0.0).reshape(view.shape), view.to_numpy())
    written = {t.get_text() for t in fig.axes[0].texts}
    assert written == {f"{v:.2f}" for v in view.to_numpy().ravel() if v > 0}
    plt.close(fig)
    table = A.per_class_ap(ev)
    fig = P.plot_class_heatmap(table)
    drawn = fig.axes[0].collections[0].get_array().reshape(len(table), 2)
    np.testing.assert_allclose(drawn, table[["ap", "top1"]].to_numpy())
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0].startswith(f"{table.index[0]} (n=")
    assert_real_png(save(fig, tmp_path / "class_heatmap.png"))
    plt.close(fig)


@pytest.mark.parametrize("n_classes", [5, 300])
def test_class_heatmap_stays_readable(n_classes):
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"ap": rng.random(n_classes), "top1": rng.random(n_classes),
                          "queries": rng.integers(1, 9, n_classes)},
                         index=[f"class_with_a_long_name_{i}" for i in range(n_classes)]).sort_values("ap")
    fig = P.plot_class_heatmap(table, max_classes=40)
    fig.canvas.draw()
    labels = fig.axes[0].get_yticklabels()
    assert len(labels) == min(n_classes, 40) and not _overlaps(labels)
    assert ("of 300 classes" in fig.axes[0].get_title()) == (n_classes == 300)
    plt.close(fig)


def test_analysis_figures_are_real_images(ev, tmp_path):
    q = ev.queries
    figures = {
        "margins": P.plot_margins(q),
        "margins_by": P.plot_margins_by(q, "label", A.worst(q, "label").index),
        "candidates": P.plot_accuracy_by(A.accuracy_by(q, A.candidate_counts(ev), "candidates"),
                                         "classes among the top 4", "Accuracy by candidates"),
        "shares": P.plot_error_shares(A.rank_of_true_table(ev), A.worst(q, "label"), "class"),
        "ap": P.plot_per_class_ap(A.per_class_ap(ev)),
        "tsne": P.plot_embedding_map(ev),
        "grid": P.plot_retrieval_grid(ev, A.worst_queries(q, 3), k=4, title="worst"),
        "pairs": P.plot_confused_pairs(ev, A.confused_pairs(ev)),
    }
    # what the bars and histograms draw is what lib's tables hold
    heights = [bar.get_height() for bar in figures["candidates"].axes[0].patches]
    np.testing.assert_allclose(heights, A.accuracy_by(q, A.candidate_counts(ev), "candidates")["accuracy"])
    widths = sorted(bar.get_width() for bar in figures["ap"].axes[0].patches)
    np.testing.assert_allclose(widths, sorted(A.per_class_ap(ev)["ap"]))
    counted = sum(bar.get_height() for bar in figures["margins"].axes[0].patches)
    assert counted == len(q), "every query's margin is in one of the two histograms"
    for name, fig in figures.items():
        assert_real_png(save(fig, tmp_path / f"{name}.png"))
        plt.close(fig)


def test_retrieval_grid_frames_right_and_wrong(ev):
    fig = P.plot_retrieval_grid(ev, [1], k=4)
    axes = fig.axes
    assert len(axes) == 5
    frames = [ax.spines["top"].get_edgecolor() for ax in axes[1:]]
    expected = [P.RIGHT if lab == "a" else P.WRONG for lab in ev.gallery["label"].to_numpy()[ev.neighbours[1]]]
    assert [matplotlib.colors.to_hex(c) for c in frames] == expected
    assert "d=" in axes[1].get_title()
    plt.close(fig)


def test_evaluation_round_trip_keeps_the_tables(ev, tmp_path):
    back = load_evaluation(save_evaluation(ev, tmp_path / "eval"))
    pd.testing.assert_frame_equal(A.worst(back.queries, "context"), A.worst(ev.queries, "context"))
    pd.testing.assert_frame_equal(A.confused_pairs(back), A.confused_pairs(ev))


def test_an_evaluation_save_stopped_half_way_is_refused_not_read_mixed(ev, tmp_path, monkeypatch):
    folder = save_evaluation(ev, tmp_path / "eval")

    def killed(*args, **kwargs):  # the process dies after the tables of the new record, before its arrays
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        save_evaluation(dataclasses.replace(ev, split="again"), folder)
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"the evaluation record in .*eval cannot be read: .*run notebook 03"):
        load_evaluation(folder)
    assert load_evaluation(save_evaluation(ev, folder)).split == ev.split


def test_per_context_counts_accuracy_ap_and_always_failing_individuals():
    q = pd.DataFrame({"context": ["X", "X", "X", "X", "Y"], "label": ["a", "a", "b", "b", "c"],
                      "correct": [True, False, False, False, True], "ap": [1.0, 0.5, 0.2, 0.0, 1.0],
                      "margin": [0.5, 0.1, 0.3, 0.0, 0.9]})
    table = A.per_context(q)
    assert table.loc["X", "median_margin_right"] == 0.5 and table.loc["X", "median_margin_wrong"] == 0.1
    assert table.loc["Y", "median_margin_right"] == 0.9 and np.isnan(table.loc["Y", "median_margin_wrong"])
    assert table.index.tolist() == ["X", "Y"]  # worst first
    assert table.loc["X", ["queries", "individuals", "errors"]].tolist() == [4, 2, 3]
    assert table.loc["X", "accuracy"] == pytest.approx(0.25) and table.loc["X", "mean_ap"] == pytest.approx(0.425)
    assert table.loc["X", "always_fail"] == ["b"] and table.loc["Y", "always_fail"] == []
    assert A.per_context(q.drop(columns="context")) is None


def _old_leave_one_out_record(ev, rule=None) -> Evaluation:
    """ev's gallery evaluated leave-one-out as an older notebook 03 saved it: no per-query 'ap' column, and, before
    the rule existed, no 'loo_rule' key. a0 and a1 are one burst (group 'a-burst'); a2, a's other encounter, looks
    least like them of all photos."""
    gallery = ev.gallery.copy()
    gallery.loc[gallery["path"].str.match(r"a/a[01]_"), "group"] = "a-burst"
    emb = ev.gallery_emb.copy()
    emb[gallery["path"] == "a/a2_1.jpg"] = -E[0]
    config = {"protocol": "loo", **({"loo_rule": rule} if rule else {})}
    return Evaluation(split="val", data_root=ev.data_root, gallery=gallery, queries=gallery.copy(),
                      neighbours=ev.neighbours, distances=ev.distances, class_scores=ev.class_scores,
                      gallery_emb=emb, query_emb=emb, config=config)


@pytest.mark.parametrize("rule", [None, "photo", "group"])
def test_query_ap_of_an_older_leave_one_out_record_follows_its_rule(ev, rule):
    old = _old_leave_one_out_record(ev, rule)
    labels, groups = old.gallery["label"].to_numpy(), old.gallery["group"].to_numpy()
    g = old.gallery_emb / np.linalg.norm(old.gallery_emb, axis=1, keepdims=True)
    sims = g @ g.T
    expected = []
    for i in range(len(labels)):  # scikit-learn over the ranking without the query (and under 'group' its group)
        others = groups != groups[i] if rule == "group" else np.arange(len(labels)) != i
        relevant = labels[others] == labels[i]
        expected.append(average_precision_score(relevant, sims[i, others]) if relevant.any() else np.nan)
    np.testing.assert_allclose(A.query_ap(old), expected, atol=1e-6)  # float32 embeddings, same rankings
    table = A.per_class_ap(old)
    want = pd.Series(expected).groupby(labels).mean().dropna()
    np.testing.assert_allclose(table["ap"].sort_index(), want.sort_index(), atol=1e-6)
    assert "d" not in table.index, "d's one photo has nothing left to find in leave-one-out"
    # a0: its sibling a1 first and a2 last of 8 under the photo rule; a2 last of the 7 outside its burst under 'group'
    assert expected[0] == pytest.approx(1 / 7 if rule == "group" else (1 + 2 / 8) / 2)
