import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_neighbours_match, score_tolerance
from sklearn.metrics import average_precision_score
from torchvision.transforms import v2

from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.retrieval.embed import extract_embeddings, intra_op_threads
from lib.retrieval.faiss_index import (
    NO_NEIGHBOUR,
    build_index,
    fill_padding,
    load_index,
    save_index,
    search,
    search_table,
    search_within,
)
from lib.retrieval.exclusion import leave_one_out
from lib.retrieval.ranking import evaluate_retrieval


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# squared L2 of unit vectors is 2 - 2 cos: twice a float32 score's rounding (the test data are 16-dimensional)
TOL = 2 * score_tolerance(16)


def _data(seed, n_gallery=120, n_query=30, dim=16, n_labels=8):
    rng = np.random.default_rng(seed)
    gallery = rng.normal(size=(n_gallery, dim)).astype(np.float32)
    query = rng.normal(size=(n_query, dim)).astype(np.float32)
    labels = np.array([f"id{i}" for i in range(n_labels)])
    return gallery, labels[rng.integers(0, n_labels, n_gallery)], query, labels[rng.integers(0, n_labels, n_query)]


def _brute_force(gallery, query, k, sort: bool = True):
    """Squared L2 between unit vectors and the k nearest, by plain numpy (sort=False: the whole (n_q, n_g) matrix)."""
    d2 = ((_unit(query.astype(np.float64))[:, None] - _unit(gallery.astype(np.float64))[None]) ** 2).sum(-1)
    if not sort:
        return d2, None
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d2, order, axis=1), order


def test_search_equals_brute_force_topk():
    gallery, _, query, _ = _data(0)
    distances, indices = search(build_index(gallery, device="cpu"), query, k=10)
    expected_d, expected_i = _brute_force(gallery, query, 10)
    assert_neighbours_match(indices, expected_i, _brute_force(gallery, query, len(gallery), sort=False)[0], TOL)
    np.testing.assert_allclose(distances, expected_d, atol=1e-5)
    cos = np.take_along_axis(_unit(query) @ _unit(gallery).T, indices, axis=1)
    np.testing.assert_allclose(distances, 2 - 2 * cos, atol=1e-5)  # the documented d² = 2 − 2·cos


def test_k_is_clipped_to_the_gallery_and_the_full_ranking_is_a_permutation():
    gallery, _, query, _ = _data(1, n_gallery=25)
    distances, indices = search(build_index(gallery, device="cpu"), query, k=1000)
    assert indices.shape == (len(query), 25)
    assert all(sorted(row) == list(range(25)) for row in indices)
    assert np.all(np.diff(distances, axis=1) >= 0)


def test_batched_search_equals_unbatched():
    gallery, _, query, _ = _data(2, n_query=50)
    index = build_index(gallery, device="cpu")
    whole = search(index, query, k=7, batch_size=10_000)
    batched = search(index, query, k=7, batch_size=7)
    # Faiss scores fewer than 20 queries with its own loop and more with BLAS: equal to float32 rounding
    assert_neighbours_match(batched[1], whole[1], _brute_force(gallery, query, len(gallery), sort=False)[0], TOL)
    np.testing.assert_allclose(batched[0], whole[0], rtol=0, atol=TOL)


def test_float64_and_non_contiguous_input_give_the_float32_result():
    gallery, _, query, _ = _data(3)
    reference = search(build_index(gallery, device="cpu"), query, k=5)
    # the same float32 rows reach the same Faiss call: exactly the same result
    fortran = np.asfortranarray(gallery.astype(np.float64))
    result = search(build_index(fortran, device="cpu"), np.repeat(query, 2, axis=1)[:, ::2].astype(np.float64), k=5)
    np.testing.assert_array_equal(result[1], reference[1])


def test_nan_embeddings_raise_a_clear_error_naming_the_rows():
    gallery, _, query, _ = _data(4)
    gallery[[3, 17], 0] = np.nan
    with pytest.raises(DataError, match=r"2 rows contain NaN.*\[3, 17\]"):
        build_index(gallery, device="cpu")
    index = build_index(_data(4)[0], device="cpu")
    query[5, 2] = np.inf
    with pytest.raises(DataError, match=r"queries.*\[5\]"):
        search(index, query, k=3)


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((4, 3), dtype=np.float32), DataError),  # all-zero rows have no direction to normalise
        (np.ones((4, 3), dtype=np.int64), TypeError),
        (np.ones(3), ValueError),
    ],
)
def test_unusable_embeddings_are_refused(bad, error):
    with pytest.raises(error):
        build_index(bad, device="cpu")


def test_query_dimension_must_match_the_index():
    with pytest.raises(ValueError, match="dimension 8"):
        search(build_index(_data(5)[0], device="cpu"), np.ones((2, 8), np.float32), k=3)


def test_device_names():
    gallery = _data(6)[0]
    with pytest.raises(ValueError, match="'cpu'"):
        build_index(gallery, device="tpu")
    with pytest.warns(UserWarning, match="no GPU"):  # faiss-cpu on this machine: falls back, says so
        assert build_index(gallery, device="cuda:0").ntotal == len(gallery)


def test_leave_one_out_search_equals_brute_force():
    gallery = _data(7)[0]
    distances, indices = search(build_index(gallery, device="cpu"), gallery, k=6, batch_size=11,
                                exclude=leave_one_out(len(gallery)))
    full_d, full_i = _brute_force(gallery, gallery, len(gallery))
    expected = np.array([row[row != i][:6] for i, row in enumerate(full_i)])
    assert (indices != np.arange(len(gallery))[:, None]).all(), "a photo found itself"
    assert_neighbours_match(indices, expected, _brute_force(gallery, gallery, len(gallery), sort=False)[0], TOL)
    expected_d = np.array([d[r != i][:6] for i, (d, r) in enumerate(zip(full_d, full_i))])
    np.testing.assert_allclose(distances, expected_d, atol=1e-5)


def test_leave_one_out_drops_the_query_even_when_its_duplicate_ranks_first():
    rng = np.random.default_rng(8)
    gallery = rng.normal(size=(30, 8)).astype(np.float32)
    gallery[1] = gallery[0]  # a tie, which faiss breaks by row: query 1 gets row 0 before itself
    _, indices = search(build_index(gallery, device="cpu"), gallery, k=3, exclude=leave_one_out(30))
    assert indices[0, 0] == 1 and indices[1, 0] == 0
    assert not np.any(indices == np.arange(30)[:, None])


def _brute_force_metrics(gallery, g_labels, query, q_labels, ks, exclude_self=False):
    """Recall@k by a per-query loop and AP by sklearn on cosine scores: independent of lib/."""
    scores = _unit(query.astype(np.float64)) @ _unit(gallery.astype(np.float64)).T
    hits, aps = {k: [] for k in ks}, []
    for i, (q_label, row) in enumerate(zip(q_labels, scores)):
        labels = g_labels
        if exclude_self:
            row, labels = np.delete(row, i), np.delete(g_labels, i)
        ranked = labels[np.argsort(-row)]
        for k in ks:
            hits[k].append(q_label in ranked[:k])
        if np.any(labels == q_label):
            aps.append(average_precision_score(labels == q_label, row))
    recalls = {f"recall@{k}": np.mean(hits[k]) for k in ks}
    return {**recalls, "mAP": np.mean(aps), "n_queries_without_relevant": len(q_labels) - len(aps)}


def _check(result, expected):
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


def test_evaluate_retrieval_equals_brute_force():
    gallery, g_labels, query, q_labels = _data(9)
    result = evaluate_retrieval(gallery, g_labels, query, q_labels, ks=(1, 5, 10), device="cpu")
    _check(result, _brute_force_metrics(gallery, g_labels, query, q_labels, (1, 5, 10)))
    assert result["n_queries"] == len(query)


def test_evaluate_leave_one_out_equals_brute_force():
    gallery, g_labels, _, _ = _data(10, n_labels=20)  # 20 labels over 120 rows: some are singletons
    result = evaluate_retrieval(gallery, g_labels, gallery, g_labels, leave_one_out(len(gallery)), ks=(1, 5),
                                device="cpu")
    expected = _brute_force_metrics(gallery, g_labels, gallery, g_labels, (1, 5), exclude_self=True)
    _check(result, expected)


def test_queries_without_relevant_items_are_counted_left_out_of_map_and_missed_in_recall():
    gallery, g_labels, query, q_labels = _data(11)
    q_labels[:4] = "never_seen"
    result = evaluate_retrieval(gallery, g_labels, query, q_labels, ks=(1, 5), device="cpu")
    known_only = evaluate_retrieval(gallery, g_labels, query[4:], q_labels[4:], ks=(1, 5), device="cpu")
    assert result["n_queries_without_relevant"] == 4 and known_only["n_queries_without_relevant"] == 0
    assert result["mAP"] == pytest.approx(known_only["mAP"])
    assert result["recall@5"] == pytest.approx(known_only["recall@5"] * (len(query) - 4) / len(query))


def test_max_rank_penalises_relevant_items_beyond_the_cut():
    gallery, g_labels, query, q_labels = _data(12)
    m = 10
    result = evaluate_retrieval(gallery, g_labels, query, q_labels, ks=(1, 5), max_rank=m, device="cpu")
    full = evaluate_retrieval(gallery, g_labels, query, q_labels, ks=(1, 5), device="cpu")
    _, order = _brute_force(gallery, query, m)
    aps = []
    for q_label, row in zip(q_labels, order):
        relevant = g_labels[row] == q_label
        precision_at_hits = [relevant[: r + 1].mean() for r in np.flatnonzero(relevant)]
        aps.append(sum(precision_at_hits) / np.sum(g_labels == q_label))
    assert result["mAP"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert result["mAP"] < full["mAP"]
    assert result["recall@5"] == full["recall@5"]


def test_evaluate_refuses_inconsistent_requests():
    gallery, g_labels, query, q_labels = _data(13)
    with pytest.raises(ValueError, match="exclusion holds keys for"):  # leave-one-out needs the gallery as queries
        evaluate_retrieval(gallery, g_labels, query, q_labels, leave_one_out(len(gallery)), device="cpu")
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_retrieval(gallery, g_labels, query, q_labels, ks=(1, 5), max_rank=3, device="cpu")
    with pytest.raises(ValueError, match="labels"):
        evaluate_retrieval(gallery, g_labels[:-1], query, q_labels, device="cpu")
    with pytest.raises(TypeError, match="numeric"):
        evaluate_retrieval(gallery, np.arange(len(gallery)), query, q_labels, device="cpu")


def test_int_labels_work_like_str_labels():
    gallery, g_labels, query, q_labels = _data(14)
    to_int = np.vectorize(lambda label: int(label[2:]))
    as_str = evaluate_retrieval(gallery, g_labels, query, q_labels, device="cpu")
    as_int = evaluate_retrieval(gallery, to_int(g_labels), query, to_int(q_labels), device="cpu")
    np.testing.assert_array_equal(as_int.pop("ap"), as_str.pop("ap"))
    assert as_int == as_str


def _metadata(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"path": [f"x/{i}.jpg" for i in range(n)], "label": rng.choice(["a", "b"], n),
                         "group": [f"g{i // 3}" for i in range(n)], "context": "site1"})


def test_index_save_load_round_trip(tmp_path):
    gallery, _, query, _ = _data(4)
    meta = _metadata(len(gallery))
    index = build_index(gallery, device="cpu")
    save_index(index, meta, tmp_path / "idx", {"checkpoint_sha256": "abc"})
    loaded, loaded_meta, info = load_index(tmp_path / "idx")
    assert info == {"checkpoint_sha256": "abc"}
    pd.testing.assert_frame_equal(loaded_meta, meta)
    for a, b in zip(search(index, query, k=9), search(loaded, query, k=9)):
        np.testing.assert_array_equal(a, b)


def test_save_refuses_metadata_of_another_length_and_load_a_mismatched_pair(tmp_path):
    gallery, *_ = _data(5, n_gallery=20)
    with pytest.raises(ValueError, match="20 vectors but the metadata 19 rows"):
        save_index(build_index(gallery, device="cpu"), _metadata(19), tmp_path)
    save_index(build_index(gallery, device="cpu"), _metadata(20), tmp_path)
    _metadata(19).to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(DataError, match="different saves"):
        load_index(tmp_path)


def test_search_table_rows_are_the_search_results_with_their_metadata():
    gallery, _, query, _ = _data(6)
    meta = _metadata(len(gallery))
    index = build_index(gallery, device="cpu")
    table = search_table(index, meta, query[:4], k=3)
    d, i = search(index, query[:4], k=3)
    assert list(table.columns) == ["query", "rank", "gallery_row", "path", "label", "group", "context", "distance"]
    assert table["query"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and table["rank"].tolist()[:3] == [1, 2, 3]
    np.testing.assert_array_equal(table["gallery_row"], i.ravel())
    np.testing.assert_array_equal(table["distance"], d.ravel())
    assert table["path"].tolist() == meta["path"].to_numpy()[i.ravel()].tolist()
    one = search_table(index, meta, query[2], k=3)  # a single (d,) vector
    assert one.drop(columns="query").equals(table[table["query"] == 2].drop(columns="query").reset_index(drop=True))


def test_search_within_never_leaves_the_query_context_and_ranks_like_brute_force():
    rng = np.random.default_rng(3)
    g, q = rng.normal(size=(30, 8)), rng.normal(size=(12, 8))
    g_ctx, q_ctx = np.array(["a", "b", "c"])[rng.integers(0, 3, 30)], np.array(["a", "b", "c"] * 4)
    distances, indices = search_within(g, g_ctx, q, q_ctx, k=4, device="cpu")
    assert (g_ctx[indices] == q_ctx[:, None]).all(), "a neighbour from another context"
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    d2 = ((unit(q)[:, None] - unit(g)[None]) ** 2).sum(-1)
    d2[g_ctx[None] != q_ctx[:, None]] = np.inf
    assert_neighbours_match(indices, np.argsort(d2, axis=1, kind="stable")[:, :4], d2, TOL)
    np.testing.assert_allclose(distances, np.sort(d2, axis=1)[:, :4], atol=1e-5)


def test_search_within_leave_one_out_and_a_context_the_gallery_lacks():
    rng = np.random.default_rng(4)
    e, ctx = rng.normal(size=(9, 4)), np.array(list("aaabbbbcc"))
    distances, indices = search_within(e, ctx, e, ctx, k=5, exclude=leave_one_out(9), device="cpu")
    assert indices.shape == (9, 3), "k is clipped to the largest context ('b': 4 photos, 3 besides the query)"
    real = indices != NO_NEIGHBOUR
    # every query gets all the other photos of its context; a smaller context's row ends in padding
    assert real.sum(axis=1).tolist() == [2, 2, 2, 3, 3, 3, 3, 1, 1]
    assert (ctx[indices[real]] == np.repeat(ctx, real.sum(axis=1))).all()
    assert not (indices == np.arange(9)[:, None]).any() and np.isinf(distances[~real]).all()
    assert np.isfinite(distances[real]).all() and (np.diff(distances[real[:, 1]][:, :2], axis=1) >= 0).all()
    filled = fill_padding(indices)
    assert (filled[real] == indices[real]).all() and (filled[~real] == np.broadcast_to(indices[:, :1], (9, 3))[~real]).all()
    with pytest.raises(DataError, match="'z' \\(1 queries\\)"):
        search_within(e, ctx, e[:2], ["a", "z"], k=1)


class _ThreadLoggingImages(torch.utils.data.Dataset):
    """Random images through the eval transform's to-tensor steps, noting the intra-op thread count each load ran at."""

    def __init__(self, n=10):
        self.images = torch.randint(0, 256, (n, 3, 24, 24), generator=torch.Generator().manual_seed(0)).byte()
        self.transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
        self.threads = []

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.threads.append(torch.get_num_threads())
        return self.transform(self.images[i]), 0


@pytest.mark.parametrize("workers", [0, 1])
def test_embeddings_equal_the_bare_forward_loading_at_one_thread_and_the_forward_at_the_callers(workers):
    dataset = _ThreadLoggingImages()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    forward_threads = []
    model.register_forward_hook(lambda *_: forward_threads.append(torch.get_num_threads()))
    with intra_op_threads(2):
        with torch.no_grad():
            expected = torch.cat([model(torch.stack([dataset[i][0] for i in range(j, min(j + 4, len(dataset)))]))
                                  for j in range(0, len(dataset), 4)]).numpy()
        dataset.threads, forward_threads[:] = [], []
        emb = extract_embeddings(model, dataset, DeviceSettings(num_workers=workers), batch_size=4)
        assert torch.get_num_threads() == 2
    # on the CPU the forward runs channels_last (lib.core.cpu_probe.RULE): the convolution sums in another order,
    # float32 rounding, ~1e-7 relative here
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-6)
    assert forward_threads == [2, 2, 2]
    assert dataset.threads == ([1] * len(dataset) if workers == 0 else [])  # a worker loads in its own process


def test_intra_op_threads_are_restored_after_an_error():
    saved = torch.get_num_threads()
    with pytest.raises(RuntimeError), intra_op_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == saved
