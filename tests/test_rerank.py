import math

import numpy as np
import pytest

from lib.probe.rerank import k_reciprocal_distances, query_expansion, rerank_shortlist
from lib.retrieval.exclusion import leave_one_out, same_group


def squared_l2(points) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return ((points[:, None] - points[None]) ** 2).sum(-1)


def reference_rerank(dist, query_rows, gallery_rows, k1, k2, lambda_value):
    """The paper's steps written a second, plain way: Python sets and dicts, one pair at a time."""
    n = len(dist)
    k1, k2 = min(k1, n - 1), min(k2, n)
    d = dist / dist.max(axis=1, keepdims=True)

    def nearest(p, count):  # p first, then by distance, ties by index
        return sorted(range(n), key=lambda j: (j != p, d[p, j], j))[:count]

    def reciprocal(p, k):
        return {g for g in nearest(p, k + 1) if p in nearest(g, k + 1)}

    v = []
    for p in range(n):
        r = reciprocal(p, k1)
        star = set(r)
        for q in r:
            half = reciprocal(q, math.ceil(k1 / 2))
            if len(half & r) > 2 / 3 * len(half):
                star |= half
        total = sum(math.exp(-d[p, g]) for g in star)
        v.append({g: math.exp(-d[p, g]) / total for g in star})
    expanded = []
    for p in range(n):
        mean = {}
        for q in nearest(p, k2):
            for g, w in v[q].items():
                mean[g] = mean.get(g, 0.0) + w / k2
        expanded.append(mean)
    out = np.zeros((len(query_rows), len(gallery_rows)))
    for i, q in enumerate(query_rows):
        for j, g in enumerate(gallery_rows):
            keys = expanded[q].keys() | expanded[g].keys()
            mins = sum(min(expanded[q].get(f, 0), expanded[g].get(f, 0)) for f in keys)
            maxs = sum(max(expanded[q].get(f, 0), expanded[g].get(f, 0)) for f in keys)
            out[i, j] = (1 - lambda_value) * (1 - mins / maxs) + lambda_value * d[q, g]
    return out


# q (identity A) between its own identity (a, a2, a3) and a tight cluster B (b1..b3) whose edge item h is q's
# plain nearest neighbour; h's own 3 nearest are b1..b3, so q is not among them
HUB = {"q": (0, 0), "h": (1, 0), "b1": (1.4, 0), "b2": (1.5, 0.1), "b3": (1.6, 0),
       "a": (-1.1, 0), "a2": (-1.5, 0.3), "a3": (-1.5, -0.3)}


def test_hub_that_is_not_k_reciprocal_loses_first_place_to_the_true_match():
    names = list(HUB)
    dist = squared_l2(list(HUB.values()))
    gallery = np.arange(1, len(names))
    assert names[gallery[np.argmin(dist[0, gallery])]] == "h"

    final = k_reciprocal_distances(dist, [0], gallery, k1=3, k2=1, lambda_value=0.3)[0]
    assert names[gallery[np.argmin(final)]] == "a"

    # by hand, with k1=3: N(q)={q,h,a,b1}, N(h)={h,b1,b2,b3}, N(a)={a,a2,a3,q}, so R*(q)={q,a} and R*(a)={a,a2,a3,q}
    # (R(a2, 2) = R(a3, 2) = {a,a2,a3} lie inside R(a, 3) and join it); R*(h) holds no item of R*(q)
    dq = dist[0] / dist[0].max()
    da = dist[5] / dist[5].max()
    vq = {"q": 1.0, "a": np.exp(-dq[5])}
    va = {"a": 1.0, "a2": np.exp(-da[6]), "a3": np.exp(-da[7]), "q": np.exp(-da[0])}
    vq = {k: w / sum(vq.values()) for k, w in vq.items()}
    va = {k: w / sum(va.values()) for k, w in va.items()}
    mins = min(vq["q"], va["q"]) + min(vq["a"], va["a"])
    jaccard_qa = 1 - mins / (2 - mins)  # both weight vectors sum to 1
    assert final[names.index("a") - 1] == pytest.approx(0.7 * jaccard_qa + 0.3 * dq[5], abs=1e-6)
    assert final[names.index("h") - 1] == pytest.approx(0.7 * 1 + 0.3 * dq[1], abs=1e-6)


# (5, 1) and (7, 3) on 24 points make the k1/2 expansion add items (checked: dropping it changes the result)
@pytest.mark.parametrize("k1,k2,lambda_value", [(3, 1, 0.3), (5, 1, 0.3), (7, 3, 0.3), (2, 2, 0.0), (30, 6, 0.5)])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_matches_a_plain_set_based_computation(k1, k2, lambda_value, leave_one_out):
    rng = np.random.default_rng(k1 * 10 + k2)
    centres = rng.normal(size=(3, 4))
    x = centres[rng.integers(0, 3, 24)] + 0.6 * rng.normal(size=(24, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = squared_l2(x)
    if leave_one_out:
        queries = gallery = np.arange(24)
    else:
        queries, gallery = np.arange(6), np.arange(6, 24)
    got = k_reciprocal_distances(dist, queries, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    assert got.shape == (len(queries), len(gallery))
    np.testing.assert_allclose(got, reference_rerank(dist, queries, gallery, k1, k2, lambda_value), atol=1e-5)


def test_lambda_one_gives_the_row_normalised_original_distances_and_ranking():
    dist = squared_l2(np.random.default_rng(0).normal(size=(9, 3)))
    got = k_reciprocal_distances(dist, [0, 1, 2], np.arange(3, 9), k1=3, k2=2, lambda_value=1.0)
    expected = dist[:3, 3:] / dist[:3].max(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_array_equal(np.argsort(got, axis=1), np.argsort(dist[:3, 3:], axis=1))


def test_leave_one_out_puts_each_item_at_distance_zero_from_itself():
    dist = squared_l2(np.random.default_rng(1).normal(size=(10, 3)))
    rows = np.arange(10)
    got = k_reciprocal_distances(dist, rows, rows, k1=4, k2=3)
    assert got.shape == (10, 10)
    np.testing.assert_allclose(np.diag(got), 0, atol=1e-6)
    assert (got[~np.eye(10, dtype=bool)] > 0).all()


def test_duplicates_do_not_push_an_item_out_of_its_own_neighbours():
    # three copies of one photo: with k1=1 a plain sort could give copy 2 the neighbours {0, 1}, not itself
    dist = squared_l2([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]])
    rows = np.arange(5)
    got = k_reciprocal_distances(dist, rows, rows, k1=1, k2=1)
    np.testing.assert_allclose(np.diag(got), 0, atol=1e-6)
    np.testing.assert_allclose(got, reference_rerank(dist, rows, rows, 1, 1, 0.3), atol=1e-6)


def test_k_larger_than_the_set_is_clipped():
    dist = squared_l2(np.random.default_rng(2).normal(size=(6, 2)))
    rows = np.arange(6)
    np.testing.assert_allclose(k_reciprocal_distances(dist, rows, rows, k1=100, k2=100),
                               k_reciprocal_distances(dist, rows, rows, k1=5, k2=6))


@pytest.mark.parametrize("change,message", [
    (dict(dist=np.zeros((3, 4))), "square"),
    (dict(dist=np.full((4, 4), np.nan)), "NaN"),
    (dict(dist=-np.ones((4, 4))), "negative"),
    (dict(k1=0), "k1 must be >= 1, got 0"),
    (dict(k2=0), "k2 must be >= 1, got 0"),
    (dict(lambda_value=1.5), "lambda_value must be in \\[0, 1\\], got 1.5"),
    (dict(query_rows=[0, 4]), "query_rows .* \\[4\\]"),
    (dict(gallery_rows=[-1]), "gallery_rows .* \\[-1\\]"),
    (dict(gallery_rows=[0.5]), "gallery_rows .* integer"),
])
def test_bad_inputs_raise_naming_the_value(change, message):
    args = dict(dist=squared_l2(np.eye(4)), query_rows=[0], gallery_rows=[1, 2, 3])
    with pytest.raises(ValueError, match=message):
        k_reciprocal_distances(**{**args, **change})


def test_query_expansion_with_nothing_to_add_returns_the_normalised_queries():
    rng = np.random.default_rng(3)
    q, g = rng.normal(size=(4, 5)), rng.normal(size=(7, 5))
    unit_q = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(query_expansion(q, g, n=0), unit_q, rtol=1e-6)
    # cos < 1 raised to a huge power weighs nothing
    np.testing.assert_allclose(query_expansion(q, g, n=3, alpha=1e6), unit_q, rtol=1e-6)


def test_query_expansion_pulls_the_query_toward_the_identity_of_its_near_neighbours():
    e1, e2, e3 = np.eye(3)
    q = np.array([e1 + 0.8 * e2])
    own = [e1 + 0.1 * e3, e1 - 0.1 * e3, e1 + 0.05 * e2]  # identity A, q's three nearest
    far_own = e1 + 0.9 * e3  # identity A seen from far
    wrong = e2 + 0.1 * e3  # identity B
    g = np.array(own + [far_own, wrong])
    g_unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    before = (q / np.linalg.norm(q)) @ g_unit.T
    assert before[0, 4] > before[0, 3]  # the wrong item outranks the far member at first
    after = query_expansion(q, g, n=3, alpha=3.0) @ g_unit.T
    assert after[0, 3] > after[0, 4]


def test_leave_one_out_matches_a_manual_expansion_without_the_own_row():
    x = np.random.default_rng(4).normal(size=(8, 5))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    got = query_expansion(x, x, n=2, alpha=3.0, exclude=leave_one_out(8))
    for i in range(8):
        sims = unit @ unit[i]
        others = [j for j in np.argsort(-sims) if j != i][:2]
        manual = unit[i] + sum(max(sims[j], 0) ** 3 * unit[j] for j in others)
        np.testing.assert_allclose(got[i], manual / np.linalg.norm(manual), rtol=1e-5, atol=1e-6)
    # without the exclusion the own row (cos 1) is the first neighbour, which changes every row
    assert not np.allclose(query_expansion(x, x, n=2, alpha=3.0), got)


def test_leave_one_out_with_alpha_zero_adds_every_other_row_once():
    # alpha=0 weighs each neighbour 1 whatever its cosine, so a too-large n must still stop at the other rows
    x = np.random.default_rng(6).normal(size=(4, 3))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    total = unit.sum(axis=0)
    np.testing.assert_allclose(query_expansion(x, x, n=100, alpha=0.0, exclude=leave_one_out(4)),
                               np.tile(total / np.linalg.norm(total), (4, 1)), rtol=1e-5)


def test_query_expansion_returns_float32_unit_rows_and_checks_shapes():
    rng = np.random.default_rng(5)
    out = query_expansion(rng.normal(size=(5, 6)) * 10, rng.normal(size=(9, 6)), n=4, alpha=1.0)
    assert out.shape == (5, 6) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        query_expansion(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="exclusion holds keys for 4 queries"):
        query_expansion(np.ones((2, 3)), np.ones((4, 3)), exclude=leave_one_out(4))
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        query_expansion(np.ones((2, 3)), np.ones((4, 3)), n=-1)
    with pytest.raises(ValueError, match="all zero"):
        query_expansion(np.zeros((2, 3)), np.ones((4, 3)))


def test_rerank_shortlist_hand_computed_with_stable_ties():
    order = np.array([[3, 1, 4, 0, 2],
                      [0, 1, 2, 3, 4]])
    scores = np.array([[0.2, 0.9, 0.2],
                       [5, 5, 7]])
    got = rerank_shortlist(order, scores)
    np.testing.assert_array_equal(got, [[1, 3, 4, 0, 2],
                                        [2, 0, 1, 3, 4]])
    np.testing.assert_array_equal(order, [[3, 1, 4, 0, 2], [0, 1, 2, 3, 4]])  # input untouched


def test_rerank_shortlist_keeps_ties_in_order_on_long_shortlists():
    # long enough that an unstable sort (introsort switches off insertion sort past 16 items) would shuffle ties
    rng = np.random.default_rng(7)
    order = rng.permutation(100)[None]
    scores = rng.integers(0, 3, (1, 60))
    expected = [g for _, g in sorted(zip(-scores[0], order[0, :60]), key=lambda pair: pair[0])]
    np.testing.assert_array_equal(rerank_shortlist(order, scores)[0], expected + order[0, 60:].tolist())


def test_rerank_shortlist_leaves_rows_beyond_k_and_reads_unsigned_counts():
    order = np.tile(np.arange(6), (2, 1))
    inliers = np.array([[0, 40], [12, 3]], dtype=np.uint16)
    np.testing.assert_array_equal(rerank_shortlist(order, inliers), [[1, 0, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])


@pytest.mark.parametrize("order,scores", [
    (np.arange(5), np.ones((1, 2))),
    (np.zeros((2, 5), int), np.ones((3, 2))),
    (np.zeros((2, 5), int), np.ones((2, 6))),
    (np.zeros((2, 5), int), np.ones(2)),
    (np.zeros((1, 5), int), np.array([[np.nan, 1.0]])),
])
def test_rerank_shortlist_rejects_mismatched_shapes(order, scores):
    with pytest.raises(ValueError):
        rerank_shortlist(order, scores)


def test_query_expansion_of_a_chunk_with_its_exclusion_equals_the_whole_leave_one_out():
    rng = np.random.default_rng(7)
    g = rng.normal(size=(12, 5))
    whole = query_expansion(g, g, n=3, alpha=2.0, exclude=leave_one_out(len(g)))
    rows = np.array([3, 4, 5, 9])
    chunk = leave_one_out(len(g)).for_queries(rows)
    np.testing.assert_allclose(query_expansion(g[rows], g, n=3, alpha=2.0, exclude=chunk), whole[rows], atol=1e-6)
    with pytest.raises(ValueError, match="exclusion holds keys for 2 queries"):
        query_expansion(g[rows], g, exclude=leave_one_out(len(g)).for_queries(rows[:2]))
