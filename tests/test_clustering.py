"""Photos grouped into candidate individuals (lib.retrieval.clustering) and the scores of a grouping
(lib.retrieval.cluster_metrics), each checked against an independent computation."""
import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

from lib.retrieval.cluster_metrics import bcubed_prf, cluster_scores, pairwise_prf
from lib.retrieval.clustering import ClusterSettings, choose_threshold, cluster_photos, tightness

SETTINGS = [ClusterSettings("agglomerative", "average"), ClusterSettings("agglomerative", "complete"),
            ClusterSettings("hdbscan")]


def brute_pairs(true, pred) -> tuple[float, float, float]:
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(true)), 2):
        same_true, same_pred = true[i] == true[j], pred[i] == pred[j]
        tp += same_true and same_pred
        fp += same_pred and not same_true
        fn += same_true and not same_pred
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def brute_bcubed(true, pred) -> tuple[float, float, float]:
    n = len(true)
    p = sum(sum(pred[j] == pred[i] and true[j] == true[i] for j in range(n)) / sum(pred[j] == pred[i] for j in range(n))
            for i in range(n)) / n
    r = sum(sum(pred[j] == pred[i] and true[j] == true[i] for j in range(n)) / sum(true[j] == true[i] for j in range(n))
            for i in range(n)) / n
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


@pytest.mark.parametrize("seed", range(8))
def test_scores_match_sklearn_and_a_brute_force_pair_loop(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    true = [f"ind{v}" for v in rng.integers(0, rng.integers(1, 8), n)]
    pred = rng.integers(0, rng.integers(1, 10), n)
    got = cluster_scores(true, pred)
    assert got["ari"] == pytest.approx(adjusted_rand_score(true, pred), abs=1e-12)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(true, pred), abs=1e-12)
    np.testing.assert_allclose(pairwise_prf(true, pred), brute_pairs(true, pred), atol=1e-12)
    np.testing.assert_allclose(bcubed_prf(true, pred), brute_bcubed(true, pred), atol=1e-12)
    np.testing.assert_allclose([got[k] for k in ("pair_precision", "pair_recall", "pair_f1")], brute_pairs(true, pred))
    assert (got["n_clusters"], got["n_individuals"], got["n_photos"]) == (len(set(pred)), len(set(true)), n)


def test_edge_groupings_follow_the_stated_conventions():
    every_alone = cluster_scores(["a", "b", "c"], [0, 1, 2])
    assert every_alone["pair_precision"] == every_alone["pair_recall"] == every_alone["pair_f1"] == 1.0
    lumped = cluster_scores(["a", "a", "b", "b"], [0, 0, 0, 0])
    assert lumped["pair_recall"] == 1.0 and lumped["pair_precision"] == pytest.approx(2 / 6)
    assert lumped["bcubed_recall"] == 1.0 and lumped["bcubed_precision"] == pytest.approx(0.5)
    assert cluster_scores([], [])["n_photos"] == 0


def blobs(n_individuals: int, per: int, dim: int = 32, spread: float = 0.15, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_individuals, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_individuals), per)
    emb = centres[labels] + spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.method}-{s.linkage}")
@pytest.mark.parametrize("seed", range(5))
def test_a_group_never_splits_and_contexts_never_mix(settings, seed):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(60, 16))  # no structure: left alone, the clustering would cut groups anywhere
    groups = rng.integers(0, 15, 60).astype(str)
    contexts = np.array(["north", "south"])[rng.integers(0, 2, 15)][groups.astype(int)]  # a group in one context
    for t in (0.05, 0.4, 0.9):
        found = cluster_photos(emb, t, groups=groups, contexts=contexts, settings=settings)
        for g in np.unique(groups):
            assert len(set(found[groups == g])) == 1, f"group {g} split at threshold {t}"
        for c in np.unique(found):
            assert len(set(contexts[found == c])) == 1, f"cluster {c} mixes contexts at threshold {t}"
        sizes = np.bincount(found)
        assert (np.diff(sizes) <= 0).all() and set(found) == set(range(len(sizes))), "ids 0.. by size"


def test_without_groups_every_photo_is_clustered_on_its_own_merits():
    emb, labels = blobs(4, 5, seed=1)
    found = cluster_photos(emb, 0.3)
    assert cluster_scores(labels, found)["ari"] == pytest.approx(1.0)
    assert len(set(cluster_photos(emb, 1.99))) == 1 and len(set(cluster_photos(emb, 1e-9))) == len(emb)
    assert cluster_photos(emb[:1], 0.3).tolist() == [0] and cluster_photos(emb[:0], 0.3).tolist() == []


@pytest.mark.parametrize("settings", SETTINGS[:2], ids=lambda s: s.linkage)
def test_the_chosen_threshold_recovers_well_separated_individuals(settings):
    emb, labels = blobs(12, 6, seed=3)
    threshold, curve = choose_threshold(emb, labels, settings=settings)
    found = cluster_photos(emb, threshold, settings=settings)
    assert len(set(found)) == 12 and cluster_scores(labels, found)["ari"] == pytest.approx(1.0)
    assert curve["ari"].max() == pytest.approx(1.0) and curve["ari"].min() < 0.5, "the curve spans bad cuts too"
    # chosen on one half of the individuals, the threshold holds on the other
    half = labels < 6
    t_half, _ = choose_threshold(emb[half], labels[half], settings=settings)
    assert cluster_scores(labels[~half], cluster_photos(emb[~half], t_half, settings=settings))["ari"] > 0.95


def test_tightness_is_the_mean_cosine_between_distinct_members():
    emb, _ = blobs(3, 4, seed=2)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4])
    got = tightness(emb, labels)
    for i in range(len(labels)):
        others = [j for j in range(len(labels)) if labels[j] == labels[i]]
        pairs = [float(emb[a] @ emb[b]) for a in others for b in others if a != b]
        assert (np.isnan(got[i]) if not pairs else got[i] == pytest.approx(np.mean(pairs)))
