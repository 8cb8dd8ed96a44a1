"""Approximate Faiss indexes (lib.retrieval.ann_index) and chunked evaluation (lib.retrieval.ranking)."""
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import assert_neighbours_match, assert_rankings_match, score_tolerance

import lib.retrieval.ranking
from lib.retrieval.ann_index import (
    IndexSpec,
    approximation_recall,
    build_search_index,
    describe,
    is_exact,
    resolve_factory,
    sample_rows,
    searchable,
)
from lib.retrieval.exclusion import leave_one_out
from lib.retrieval.faiss_index import NO_NEIGHBOUR, knn, load_index, save_index, search
from lib.retrieval.pairwise import pairwise_scores
from lib.retrieval.ranking import evaluate_retrieval, ranking_metrics

KINDS = ["flat", "ivf", "hnsw", "ivfpq", "IVF8,SQ8"]  # the named kinds and a factory string


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(seed, n_gallery=1200, n_query=60, dim=16, n_clusters=40):
    """Gallery and queries around shared random centres, with the cluster of each as its label."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    g_labels, q_labels = rng.integers(0, n_clusters, n_gallery), rng.integers(0, n_clusters, n_query)
    gallery = (centres[g_labels] + 0.8 * rng.normal(size=(n_gallery, dim))).astype(np.float32)
    query = (centres[q_labels] + 0.8 * rng.normal(size=(n_query, dim))).astype(np.float32)
    names = np.array([f"id{i}" for i in range(n_clusters)])
    return gallery, names[g_labels], query, names[q_labels]


# squared L2 of unit vectors is 2 - 2 cos: twice a float32 score's rounding (the test data are 16-dimensional)
TOL = 2 * score_tolerance(16)


def _d2(gallery, queries):
    """(n_q, n_g) squared L2 between the unit rows, in float64."""
    return ((_unit(queries.astype(np.float64))[:, None] - _unit(gallery.astype(np.float64))[None]) ** 2).sum(-1)


def _exact_topk(gallery, queries, k, self_rows=None):
    """Row numbers of each query's k nearest gallery rows by float64 numpy; self_rows: each query's own row, left
    out."""
    d2 = _d2(gallery, queries)
    if self_rows is not None:
        d2[np.arange(len(queries)), self_rows] = np.inf
    return np.argsort(d2, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("kind", KINDS)
def test_every_index_kind_round_trips_through_save_and_load_with_the_same_results(tmp_path, kind):
    gallery, labels, query, _ = _clustered(0)
    spec = IndexSpec(index=kind, nprobe=3, ef_search=40)  # not faiss's defaults, so they must be restored
    index, info = build_search_index(gallery, spec, device="cpu")
    assert is_exact(index) == (kind == "flat") == info["exact"]
    meta = pd.DataFrame({"path": [f"p{i}.jpg" for i in range(len(gallery))], "label": labels})
    save_index(index, meta, tmp_path / kind, {"index": info})
    loaded, loaded_meta, saved = load_index(tmp_path / kind)
    loaded, how = searchable(loaded, IndexSpec(**saved["index"]["spec"]), device="cpu")
    assert saved["index"]["factory"] == info["factory"] and how["search_params"] == info["search_params"]
    pd.testing.assert_frame_equal(loaded_meta, meta)
    for before, after in zip(search(index, query, k=10), search(loaded, query, k=10)):
        np.testing.assert_array_equal(before, after)


def test_search_parameters_are_applied_and_change_results_without_a_rebuild():
    gallery, _, query, _ = _clustered(1)
    index, info = build_search_index(gallery, IndexSpec(index="ivf", nprobe=1), device="cpu")
    assert info["factory"] == "IVF16,Flat" and info["search_params"] == {"nprobe": 1}
    narrow = search(index, query, k=10)[1]
    searchable(index, IndexSpec(index="ivf", nprobe=16), device="cpu")  # every list: exact
    assert_neighbours_match(search(index, query, k=10)[1], _exact_topk(gallery, query, 10), _d2(gallery, query), TOL)
    assert not np.array_equal(narrow, _exact_topk(gallery, query, 10))
    _, hnsw = build_search_index(gallery, IndexSpec(index="hnsw", ef_search=77), device="cpu")
    assert hnsw["search_params"] == {"efSearch": 77}  # nprobe has no meaning for a graph and is not claimed


@pytest.mark.parametrize("exclude_self", [False, True])
def test_recall_report_equals_an_independent_recomputation(exclude_self):
    gallery, _, query, _ = _clustered(2)
    queries = gallery if exclude_self else query
    index, _ = build_search_index(gallery, IndexSpec(index="ivfpq", nprobe=2), device="cpu")
    k, sample = 10, 25
    report = approximation_recall(index, gallery, queries, k, sample=sample, seed=3,
                                  exclude=leave_one_out(len(gallery)) if exclude_self else None)
    rows = sample_rows(len(queries), sample, seed=3)
    assert len(rows) == sample == report["queries_sampled"] and report["k"] == k
    _, found = search(index, queries, k + exclude_self)  # what the index returns, then its own row dropped by hand
    exact = _exact_topk(gallery, queries[rows], k, rows if exclude_self else None)
    hits = 0
    for row, want in zip(rows, exact):
        got = [g for g in found[row] if not (exclude_self and g == row)][:k]
        hits += len(set(got) & set(want.tolist()))
    assert report["recall"] == pytest.approx(hits / (sample * k), abs=1e-12)
    assert 0 < report["recall"] < 1, "an index this coarse must lose something, or the test shows nothing"


def test_recall_report_of_an_index_that_misses_nothing_is_one():
    gallery, _, query, _ = _clustered(3)
    index, _ = build_search_index(gallery, IndexSpec(index="ivf", nprobe=1000), device="cpu")
    assert approximation_recall(index, gallery, query, 10)["recall"] == 1.0


def test_auto_is_exact_below_the_threshold_and_approximate_from_it_saying_so():
    gallery, _, query, _ = _clustered(4, n_gallery=600)
    small, small_info = build_search_index(gallery[:599], IndexSpec(index="auto", exact_below=600), device="cpu")
    # given search parameters: IVF without measuring (lib.retrieval.index_tuning's tests measure)
    large, large_info = build_search_index(gallery, IndexSpec(index="auto", exact_below=600, nprobe=2), device="cpu")
    assert is_exact(small) and small_info["exact"] and "599 gallery vectors < 600" in small_info["chosen"]
    assert not is_exact(large) and not large_info["exact"] and large_info["factory"].startswith("IVF")
    assert "600 gallery vectors >= 600" in large_info["chosen"]
    recall = approximation_recall(large, gallery, query, 5)
    line = describe({**large_info, "recall_vs_exact": recall})
    assert large_info["factory"] in line and "auto" in line and f"recall@5 {recall['recall']:.3f}" in line
    assert describe(small_info).startswith("index: exact search (auto")


def test_the_flat_path_is_the_exact_index_of_before():
    gallery, _, query, _ = _clustered(5)
    index, _ = build_search_index(gallery, IndexSpec(index="flat"), device="cpu")
    assert_neighbours_match(search(index, query, k=10)[1], _exact_topk(gallery, query, 10), _d2(gallery, query), TOL)


def test_an_index_that_finds_fewer_than_k_pads_with_no_neighbour_at_infinite_distance():
    gallery, _, query, _ = _clustered(6)
    index, _ = build_search_index(gallery, IndexSpec(index="ivf", nprobe=1), device="cpu")
    distances, indices = search(index, query, k=300)  # one list of ~75 vectors cannot fill 300
    padding = indices == NO_NEIGHBOUR
    assert padding.any() and np.isinf(distances[padding]).all() and np.isfinite(distances[~padding]).all()


@pytest.mark.parametrize("bad, message", [
    ("IVF64x,PQ4", "could not parse"),
    ("IVF8,PQ5", "multiple of the number of subquantizers"),  # 16 dimensions do not split into 5
    ("flta", "give one of flat, ivf, hnsw, ivfpq, auto, or a faiss.index_factory string"),
])
def test_a_bad_index_setting_names_the_setting_and_the_valid_ones(bad, message):
    gallery = _clustered(7)[0]
    with pytest.raises(ValueError, match=message) as err:
        build_search_index(gallery, IndexSpec(index=bad), device="cpu")
    assert repr(bad) in str(err.value) and "Error in" not in str(err.value)


def test_an_index_that_cannot_take_the_gallery_and_bad_parameters_are_refused_clearly():
    with pytest.raises(ValueError, match=r"'IDMap,Flat'.*could not be built over 1,200 vectors: add does not make"):
        build_search_index(_clustered(8)[0], IndexSpec(index="IDMap,Flat"), device="cpu")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        IndexSpec(nprobe=0)


def test_without_a_faiss_gpu_an_approximate_index_asked_onto_cuda_stays_on_the_cpu_saying_so():
    with pytest.warns(UserWarning, match="no GPU"):
        _, info = build_search_index(_clustered(9)[0], IndexSpec(index="ivf"), device="cuda:0")
    assert info["placement"] == "cpu"


# Evaluation is chunked: RANK_PAIRS bounds the (queries x gallery) cells ranked at once, and no chunking changes a
# number.


def _chunked(monkeypatch, pairs, fn, *args, **kwargs):
    """fn run with RANK_PAIRS = pairs, recording the cells of every ranking faiss returns."""
    cells = []

    def recording(index, q, k, exclude=None):
        cells.append(len(q) * (k + (0 if exclude is None else int(exclude.counts().max()))))
        return knn(index, q, k, exclude)

    monkeypatch.setattr(lib.retrieval.ranking, "RANK_PAIRS", pairs)
    monkeypatch.setattr(lib.retrieval.ranking, "knn", recording)
    return fn(*args, **kwargs), cells


def _assert_same_metrics(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key == "ap":
            np.testing.assert_array_equal(a[key], b[key])  # NaN where no relevant item, in the same places
        else:
            assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), key


@pytest.mark.parametrize("loo", [False, True])
def test_chunked_evaluation_equals_unchunked_exactly_and_never_ranks_more_than_its_chunk(monkeypatch, loo):
    gallery, g_labels, query, q_labels = _clustered(10, n_gallery=300, n_query=47)
    g_labels = g_labels.astype("U12")
    g_labels[:3] = ["single_a", "single_b", "single_c"]  # identities with one photo: no AP in leave-one-out
    if loo:
        query, q_labels = gallery, g_labels
    args = (gallery, g_labels, query, q_labels)
    kwargs = {"exclude": leave_one_out(len(gallery)) if loo else None, "ks": (1, 5), "device": "cpu"}
    whole, whole_cells = _chunked(monkeypatch, 10**9, evaluate_retrieval, *args, **kwargs)
    pairs = 7 * len(gallery) + 13  # 7 queries a chunk, and a last chunk of fewer
    chunked, cells = _chunked(monkeypatch, pairs, evaluate_retrieval, *args, **kwargs)
    assert len(whole_cells) == 1 and len(cells) == -(-len(query) // 7) and max(cells) <= pairs + 7
    _assert_same_metrics(chunked, whole)
    # and the whole ranking given at once, made by plain numpy (float64, so equal up to rounding)
    expected = ranking_metrics(_exact_topk(gallery, query, len(gallery)), g_labels, q_labels, kwargs["exclude"],
                               ks=(1, 5))
    np.testing.assert_allclose(chunked.pop("ap"), expected.pop("ap"), rtol=1e-12)
    assert chunked == pytest.approx(expected, rel=1e-12, nan_ok=True)
    singletons = sum(np.sum(g_labels == label) == 1 for label in q_labels) if loo else 0
    assert chunked["n_queries_without_relevant"] == singletons >= 3 * loo
    assert np.isfinite(chunked["identity_balanced_mAP"])


def test_chunked_pairwise_scores_equal_the_whole_matrix(monkeypatch):
    gallery, ids, _, _ = _clustered(11, n_gallery=90)
    ids = np.array([f"{label}_{i}" for i, label in enumerate(ids)])
    tol = score_tolerance(gallery.shape[1])
    scores = _unit(gallery.astype(np.float64)) @ _unit(gallery.astype(np.float64)).T  # the reference, in float64
    for exclude_self, top in [(True, None), (False, 5)]:
        exclude = leave_one_out(len(gallery)) if exclude_self else None
        monkeypatch.setattr(lib.retrieval.ranking, "RANK_PAIRS", 10**9)
        whole = pairwise_scores(gallery, ids, gallery, ids, exclude, top=top)
        monkeypatch.setattr(lib.retrieval.ranking, "RANK_PAIRS", 4 * len(gallery))
        chunked = pairwise_scores(gallery, ids, gallery, ids, exclude, top=top)
        # a 4-row and a 90-row product sum in another order: equal to float32 rounding, near-ties in either order
        assert_rankings_match(chunked, whole, tol)
        keep = top or len(gallery) - 1
        ranked = np.where(np.eye(len(ids), dtype=bool) & exclude_self, -np.inf, scores)
        order = np.argsort(-ranked, axis=1, kind="stable")[:, :keep]
        expected = pd.DataFrame({"query": np.repeat(ids, keep), "gallery": ids[order.ravel()],
                                 "score": np.take_along_axis(ranked, order, axis=1).ravel()})
        assert_rankings_match(whole, expected, tol)
        assert len(whole) == len(gallery) * keep


def test_evaluation_with_an_approximate_index_reports_its_recall_and_prediction_reuses_it(run_dir, demo, tmp_path,
                                                                                          capsys):
    from lib.evaluate.predict import predict_photos
    from lib.evaluate.run_eval import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ev = evaluate_run(run, k=5, device="cpu", index=IndexSpec(index="ivf", nprobe=1))
    report = ev.metrics["index"]
    assert report["factory"].startswith("IVF") and not report["exact"] and report["search_params"] == {"nprobe": 1}
    assert report["recall_vs_exact"]["queries_sampled"] == len(ev.queries)
    assert 0 < report["recall_vs_exact"]["recall"] <= 1 and ev.config["index"]["index"] == "ivf"
    # recall@k and mAP stay exact whatever index found the votes
    exact = evaluate_run(run, k=5, device="cpu", index=IndexSpec(index="flat"))
    assert ev.metrics["mAP"] == exact.metrics["mAP"] and ev.metrics["recall@5"] == exact.metrics["recall@5"]
    assert "recall_vs_exact" not in exact.metrics["index"] and exact.metrics["index"]["exact"]
    # its results row is another row, not a replacement of the exact one's
    from lib.evaluate.results_table import evaluation_id
    assert evaluation_id(ev) != evaluation_id(exact)

    evaluate_run(run, k=5, device="cpu", index=IndexSpec(index="ivf", nprobe=1))  # saved again: the IVF one
    saved = (run / "index" / "index.faiss").stat().st_mtime_ns
    photos = [str(demo[0] / p) for p in ev.queries["path"]]
    table = predict_photos(run, photos, k=5, device="cpu")
    assert (run / "index" / "index.faiss").stat().st_mtime_ns == saved, "prediction rebuilt the saved index"
    assert table.attrs["index"]["factory"] == report["factory"]
    assert {key: table.attrs["index"]["recall_vs_exact"][key] for key in ("k", "queries_sampled")} == {
        "k": 5, "queries_sampled": len(photos)}
    assert "recall@5" in capsys.readouterr().out
    wide = predict_photos(run, photos, k=5, device="cpu", nprobe=64)  # a search parameter: no rebuild either
    assert (run / "index" / "index.faiss").stat().st_mtime_ns == saved
    assert wide.attrs["index"]["recall_vs_exact"]["recall"] == 1.0
    flat = predict_photos(run, photos, k=5, device="cpu", index="flat")  # another index: rebuilt, exact
    assert flat.attrs["index"]["exact"] and (run / "index" / "index.faiss").stat().st_mtime_ns != saved
    assert flat["pred"].tolist() == exact.queries["pred"].tolist()


def test_a_saved_auto_index_is_what_auto_chose_not_what_auto_would_guess_again():
    """A search asking for the setting the saved index was built with ('auto', which measured its choice) uses it,
    from the run folder and from an export alike (gallery_index.other_index); another kind is refused or rebuilt."""
    from dataclasses import asdict

    import faiss

    from lib.evaluate.gallery_index import other_index

    saved = faiss.IndexFlatL2(4)
    saved.add(np.eye(4, dtype=np.float32)[np.arange(8) % 4])
    info = {"index": {"spec": asdict(IndexSpec(index="auto", exact_below=4)), "factory": "Flat"}}
    assert resolve_factory("auto", 8, 4, 4)[0] != "Flat"  # what 'auto' would guess for 8 vectors without measuring
    assert other_index(IndexSpec(index="auto", exact_below=4), saved, info) == ""
    assert other_index(IndexSpec(index="flat"), saved, info) == ""
    assert other_index(IndexSpec(index="ivf"), saved, info) == "Flat"
