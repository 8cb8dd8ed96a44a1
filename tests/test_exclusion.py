"""The one leave-one-out rule (lib.retrieval.exclusion): a query's own photo and, under the group rule, its whole group
are junk in every ranking; metrics checked against scikit-learn and brute force with the junk removed by hand."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from lib.probe.rerank import query_expansion
from lib.retrieval.exclusion import NO_NEIGHBOUR, leave_one_out, resolve_loo_rule, same_group
from lib.retrieval.faiss_index import build_index, search, search_within
from lib.retrieval.pairwise import pairwise_scores
from lib.retrieval.ranking import evaluate_retrieval, ranking_metrics


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _encounters(seed, n_labels=6, dim=12):
    """Each label has 1-3 groups (encounters; id0 one, id1 three) of 1-4 photos; a group's photos lie close together,
    as a burst does."""
    rng = np.random.default_rng(seed)
    emb, labels, groups = [], [], []
    for label in range(n_labels):
        centre = rng.normal(size=dim)
        for g in range({0: 1, 1: 3}.get(label, rng.integers(1, 4))):
            burst = centre + 0.8 * rng.normal(size=dim)
            for _ in range(rng.integers(1, 5)):
                emb.append(burst + 0.1 * rng.normal(size=dim))
                labels.append(f"id{label}")
                groups.append(f"id{label}-e{g}")
    return np.array(emb, dtype=np.float32), np.array(labels), np.array(groups)


def _brute_force(emb, labels, groups, ks):
    """Recall@k by a loop and AP by scikit-learn over each query's ranking with its whole group deleted."""
    scores = _unit(emb.astype(np.float64)) @ _unit(emb.astype(np.float64)).T
    hits, aps = {k: [] for k in ks}, []
    for i in range(len(emb)):
        keep = groups != groups[i]
        row, others = scores[i, keep], labels[keep]
        ranked = others[np.argsort(-row, kind="stable")]
        for k in ks:
            hits[k].append(labels[i] in ranked[:k])
        relevant = others == labels[i]
        aps.append(average_precision_score(relevant, row) if relevant.any() else np.nan)
    return {**{f"recall@{k}": np.mean(hits[k]) for k in ks}, "ap": np.array(aps)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_rule_metrics_equal_scikit_learn_with_the_junk_removed(seed):
    emb, labels, groups = _encounters(seed)
    got = evaluate_retrieval(emb, labels, emb, labels, leave_one_out(len(emb), groups), ks=(1, 3), device="cpu")
    want = _brute_force(emb, labels, groups, (1, 3))
    # float32 faiss distances against float64 cosines: equal rankings (no near-ties in this data), AP to rounding
    np.testing.assert_allclose(got["ap"], want["ap"], atol=1e-9)
    assert got["recall@1"] == pytest.approx(want["recall@1"]) and got["recall@3"] == pytest.approx(want["recall@3"])
    single = sum(len(set(groups[labels == label])) == 1 for label in labels)
    assert got["n_queries_without_relevant"] == single > 0, "a one-encounter individual has nothing to be found by"
    # the same from full rankings handed over at once (the probe's path)
    order = np.argsort(-(_unit(emb) @ _unit(emb).T), axis=1, kind="stable")
    np.testing.assert_allclose(ranking_metrics(order, labels, labels, leave_one_out(len(order), groups), ks=(1, 3))["ap"],
                               want["ap"], atol=1e-6)


def test_a_planted_burst_sibling_no_longer_counts_as_a_match():
    # query 0 and its burst sibling 1 (same group, same individual) are near-copies; the individual's other
    # encounter (2) is farther than another individual's photo (3)
    emb = np.array([[1, 0, 0], [1, 0.01, 0], [0.3, 1, 0], [1, 0.4, 0], [0, 0, 1]], dtype=np.float32)
    labels = np.array(["a", "a", "a", "b", "c"])
    groups = np.array(["a-burst", "a-burst", "a-later", "b-1", "c-1"])
    old = evaluate_retrieval(emb, labels, emb, labels, leave_one_out(len(emb)), ks=(1,), device="cpu")
    new = evaluate_retrieval(emb, labels, emb, labels, leave_one_out(len(emb), groups), ks=(1,), device="cpu")
    # photo rule: the sibling answers first (rank 1), the other encounter comes third: AP (1 + 2/3) / 2
    assert old["ap"][0] == pytest.approx(5 / 6)
    # group rule: query 0 ranks b (3), then its other encounter (2), c: AP 1/2 over its one relevant photo
    assert new["ap"][0] == pytest.approx(average_precision_score([False, True, False], [0.93, 0.29, 0.0]))
    assert new["ap"][0] == pytest.approx(0.5)
    _, neighbours = search(build_index(emb, "cpu"), emb, k=3, exclude=leave_one_out(len(emb), groups))
    assert neighbours[0].tolist() == [3, 2, 4] and neighbours[1].tolist() == [3, 2, 4], "top-1 is b: a miss"
    assert search(build_index(emb, "cpu"), emb, k=1, exclude=leave_one_out(len(emb)))[1][0, 0] == 1, "the photo rule's hit"
    assert not (groups[np.where(neighbours >= 0, neighbours, 0)] == groups[:, None])[neighbours >= 0].any()
    pairs = pairwise_scores(emb, list("vwxyz"), emb, list("vwxyz"), leave_one_out(len(emb), groups))
    assert not ((pairs["query"] == "v") & (pairs["gallery"] == "w")).any()
    assert len(pairs) == 5 * 5 - sum(np.sum(groups == g) for g in groups)


def test_search_with_groups_is_brute_force_and_a_large_group_ends_in_padding():
    emb, labels, groups = _encounters(3)
    groups[:12] = "one big encounter"  # more rows than k once its own photos are out, for the others fewer
    distances, indices = search(build_index(emb, "cpu"), emb, k=len(emb) - 5, batch_size=7,
                                exclude=leave_one_out(len(emb), groups))
    d2 = ((_unit(emb)[:, None] - _unit(emb)[None]) ** 2).sum(-1)
    for i in range(len(emb)):
        allowed = np.flatnonzero(groups != groups[i])
        want = allowed[np.argsort(d2[i, allowed], kind="stable")][:indices.shape[1]]
        real = indices[i] != NO_NEIGHBOUR
        np.testing.assert_array_equal(indices[i, real], want)
        assert np.isinf(distances[i, ~real]).all() and real.sum() == min(len(allowed), indices.shape[1])
    assert (indices[:12] == NO_NEIGHBOUR).any(), "the big encounter's queries have fewer photos left than k"


def test_search_within_a_context_leaves_the_group_out_too():
    emb, labels, groups = _encounters(4)
    ctx = np.where(np.arange(len(emb)) % 2 == 0, "north", "south")
    _, indices = search_within(emb, ctx, emb, ctx, k=4, exclude=leave_one_out(len(emb), groups), device="cpu")
    real = indices != NO_NEIGHBOUR
    rows = np.broadcast_to(np.arange(len(emb))[:, None], indices.shape)
    assert (ctx[indices[real]] == ctx[rows[real]]).all()
    assert not (groups[indices[real]] == groups[rows[real]]).any()


def test_query_expansion_never_expands_with_the_queries_group():
    emb, labels, groups = _encounters(5)
    got = query_expansion(emb, emb, n=2, alpha=3.0, exclude=leave_one_out(len(emb), groups))
    q = _unit(emb.astype(np.float64))
    want = []
    for i in range(len(q)):
        sims = np.where(groups == groups[i], -np.inf, q @ q[i])
        top = np.argsort(-sims, kind="stable")[:2]
        v = q[i] + (np.maximum(sims[top], 0) ** 3.0) @ q[top]
        want.append(v / np.linalg.norm(v))
    np.testing.assert_allclose(got, want, atol=1e-5)  # float32 products against float64


def test_counts_and_relevant_counts_are_set_counts():
    rng = np.random.default_rng(6)
    q_groups, g_groups = rng.integers(0, 5, 20).astype(str), rng.integers(0, 7, 40).astype(str)
    q_codes, g_codes = rng.integers(-1, 3, 20), rng.integers(0, 3, 40)
    rule = same_group(q_groups, g_groups)
    np.testing.assert_array_equal(rule.counts(), [(g_groups == g).sum() for g in q_groups])
    np.testing.assert_array_equal(rule.relevant_counts(g_codes, q_codes),
                                  [((g_groups == g) & (g_codes == c)).sum() for g, c in zip(q_groups, q_codes)])
    assert (rule.matrix() == (q_groups[:, None] == g_groups[None])).all()


def test_the_rule_is_named_and_auto_picks_group_only_where_groups_are_finer_than_individuals():
    labels = np.array(["a", "a", "b", "b"])
    assert resolve_loo_rule("auto", labels, ["e1", "e2", "e3", "e3"]) == "group"
    assert resolve_loo_rule("auto", labels, labels) == "photo", "a group column naming the individual"
    assert resolve_loo_rule("photo", labels, ["e1", "e2", "e3", "e4"]) == "photo"
    assert leave_one_out(4).rule == "photo" and leave_one_out(4, labels).rule == "group"
    with pytest.raises(ValueError, match="valid: auto, group, photo"):
        resolve_loo_rule("encounter", labels, labels)
    with pytest.raises(ValueError, match="one group per row"):
        leave_one_out(5, labels)


def test_the_probe_ranks_under_the_group_rule_by_default():
    import pandas as pd

    from lib.probe.config import ProbeConfig
    from lib.probe.methods import MethodRun, rank_method
    from lib.probe.probe_set import probe_set, ranking_table
    from lib.probe.scores import cosine, kreciprocal_scores, order

    emb, labels, groups = _encounters(7)
    index = pd.DataFrame({"path": [f"val/{i}.jpg" for i in range(len(emb))], "label": labels, "group": groups,
                          "split": "val"})
    index = pd.concat([index, pd.DataFrame([{"path": "train/0.jpg", "label": "other", "group": "t0",
                                             "split": "train"}])], ignore_index=True)
    s = probe_set(index, "val", "label", "auto")
    assert s.loo and s.loo_rule == "group"
    assert probe_set(index, "val", "label", "auto", loo_rule="photo").loo_rule == "photo"
    cfg = ProbeConfig(methods=["global"], k1=4, k2=2)
    q = _unit(emb).astype(np.float32)
    m, _, _, _ = rank_method(s, cfg, len(q), MethodRun(0.0, lambda rows, _: order(cosine(q[rows], q, s.exclusion_for(rows)))))
    want = _brute_force(emb, labels, groups, (1, 5))
    np.testing.assert_allclose(m["ap"], want["ap"], atol=1e-6)
    assert m["recall@1"] == pytest.approx(want["recall@1"])
    top = ranking_table(s, m["top"], m["ap"])["top_paths"]
    own = [set(index.loc[index["group"] == g, "path"]) for g in groups]
    assert all(not (set(paths) & mine) for paths, mine in zip(top, own)), "no query's top-5 holds its group"
    scores = kreciprocal_scores(q, q, s, cfg)
    assert np.isneginf(scores[s.exclude.matrix()]).all() and np.isfinite(scores[~s.exclude.matrix()]).all()


def test_an_approximate_index_recall_leaves_each_querys_group_out_of_both_rankings():
    from lib.retrieval.ann_index import IndexSpec, approximation_recall, build_search_index, sample_rows

    emb, labels, groups = _encounters(8, n_labels=30, dim=16)
    index, _ = build_search_index(emb, IndexSpec(index="ivf", nprobe=1), device="cpu")
    k, sample = 5, 40
    report = approximation_recall(index, emb, emb, k, sample=sample, seed=1, exclude=leave_one_out(len(emb), groups))
    rows = sample_rows(len(emb), sample, seed=1)
    d2 = ((_unit(emb)[:, None] - _unit(emb)[None]) ** 2).sum(-1)
    d2[groups[:, None] == groups[None]] = np.inf  # the group rule, by hand
    _, found = index.search(_unit(emb)[rows].astype(np.float32), len(emb))  # every row the index finds, in order
    hits = 0
    for row, ranked in zip(rows, found):
        exact = set(np.argsort(d2[row], kind="stable")[:k].tolist())
        approx = [g for g in ranked if g >= 0 and groups[g] != groups[row]][:k]
        hits += len(exact & set(approx))
    assert report["recall"] == pytest.approx(hits / (len(rows) * k), abs=1e-12)
    assert report["recall"] < 1, "an index this coarse must lose something, or the test shows nothing"
