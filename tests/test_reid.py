import numpy as np
import pytest

from lib.retrieval.exclusion import leave_one_out
from lib.retrieval.pairwise import pairwise_scores


def test_pairwise_scores_are_every_pair_by_cosine_best_first():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(3, 4)), rng.normal(size=(5, 4)) * 7  # scale must not matter: cosine
    table = pairwise_scores(q, ["a", "b", "c"], g, list("vwxyz"))
    assert len(table) == 15
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    for i, name in enumerate("abc"):
        rows = table[table["query"] == name]
        assert rows["score"].is_monotonic_decreasing
        np.testing.assert_allclose(sorted(rows["score"], reverse=True), np.sort(cos[i])[::-1], rtol=1e-5)
        assert rows["gallery"].iloc[0] == "vwxyz"[cos[i].argmax()]
    assert len(pairwise_scores(q, ["a", "b", "c"], g, list("vwxyz"), top=2)) == 6


def test_leave_one_out_pairs_never_pair_a_photo_with_itself():
    e = np.random.default_rng(1).normal(size=(4, 3))
    table = pairwise_scores(e, list("abcd"), e, list("abcd"), leave_one_out(4))
    assert len(table) == 12 and not (table["query"] == table["gallery"]).any()
    with pytest.raises(ValueError, match="gallery"):
        pairwise_scores(e, list("abcd"), e[:3], list("abc"), leave_one_out(4))
