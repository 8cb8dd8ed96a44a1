import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from lib.metrics import average_precision, cmc, mean_average_precision, recall_at_k, relevance


@pytest.mark.parametrize(
    "to_labels",
    [np.array, lambda a: np.array(a, dtype=object), lambda a: np.vectorize(ord)(a)],
    ids=["str", "object", "int"],
)
def test_recall_at_k_hand_computed_for_str_object_and_int_labels(to_labels):
    queries = to_labels(["a", "b", "c"])
    neighbours = to_labels([["x", "a", "a"], ["b", "x", "x"], ["x", "x", "x"]])
    # a: first hit at rank 2; b: rank 1; c: never
    assert recall_at_k(queries, neighbours, ks=(1, 2, 3)) == pytest.approx(
        {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 2 / 3}
    )


def test_recall_counts_a_query_absent_from_the_gallery_as_a_miss():
    assert recall_at_k(np.array(["a", "new"]), np.array([["a"], ["a"]]), ks=(1,)) == {"recall@1": 0.5}


def test_int_labels_against_str_labels_are_refused_not_silently_all_wrong():
    with pytest.raises(TypeError, match="numeric"):
        recall_at_k(np.array([1, 2]), np.array([["1"], ["2"]]), ks=(1,))


def test_relevance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="n_q"):
        relevance(np.array(["a", "b"]), np.array([["a"]]))


def test_cmc_is_recall_at_every_rank_and_matches_a_per_query_loop():
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 4, 50)
    ranked = rng.integers(0, 4, (50, 8))
    curve = cmc(queries, ranked, max_rank=10)
    expected = [np.mean([q in row[:r] for q, row in zip(queries, ranked)]) for r in range(1, 11)]
    np.testing.assert_allclose(curve, expected)
    assert np.all(np.diff(curve) >= 0)
    assert recall_at_k(queries, ranked, ks=(1, 3, 8)) == pytest.approx({f"recall@{k}": curve[k - 1] for k in (1, 3, 8)})


def test_average_precision_hand_computed():
    # relevant at ranks 1 and 3 of 4: precision there is 1 and 2/3
    assert average_precision([True, False, True, False]) == pytest.approx((1 + 2 / 3) / 2)
    # a third relevant item exists in the gallery but the ranking was cut before it: it adds precision 0
    assert average_precision([True, False, True, False], n_relevant=3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision([False, False, True]) == pytest.approx(1 / 3)
    assert np.isnan(average_precision([False, False]))


def test_average_precision_rows_equal_one_ranking_at_a_time():
    rng = np.random.default_rng(1)
    relevant = rng.random((20, 7)) < 0.3
    n_relevant = relevant.sum(axis=1) + rng.integers(0, 3, 20)
    expected = [average_precision(r, n) for r, n in zip(relevant, n_relevant)]
    np.testing.assert_allclose(average_precision(relevant, n_relevant), expected)


def test_n_relevant_below_what_the_ranking_holds_is_an_error():
    with pytest.raises(ValueError, match="n_relevant"):
        average_precision([True, True], n_relevant=1)


def test_mean_average_precision_with_truncation_and_a_query_without_relevant_items():
    queries = np.array(["a", "b", "c"])
    ranked = np.array([["a", "x", "a"], ["x", "b", "x"], ["x", "x", "x"]])
    # gallery holds 3 a's, 1 b, 0 c: a's ranking is cut before its third a; c has nothing to find
    mean_ap, n_without = mean_average_precision(queries, ranked, n_relevant=[3, 1, 0])
    assert n_without == 1
    assert mean_ap == pytest.approx(((1 + 2 / 3) / 3 + 1 / 2) / 2)


def test_mean_average_precision_of_queries_without_relevant_items_only_is_nan():
    mean_ap, n_without = mean_average_precision(np.array(["c"]), np.array([["x", "y"]]))
    assert np.isnan(mean_ap) and n_without == 1


def test_mean_average_precision_equals_sklearn_on_random_scores():
    rng = np.random.default_rng(2)
    gallery = rng.integers(0, 5, 80)
    queries = rng.integers(0, 5, 25)
    scores = rng.random((25, 80))  # continuous: no ties, so the ranking is unique
    ranked = gallery[np.argsort(-scores, axis=1)]
    expected = np.mean([average_precision_score(gallery == q, s) for q, s in zip(queries, scores)])
    mean_ap, n_without = mean_average_precision(queries, ranked)
    assert n_without == 0
    assert mean_ap == pytest.approx(expected, abs=1e-12)
