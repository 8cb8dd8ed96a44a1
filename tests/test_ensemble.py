"""Ensembles of scorers: on constructed scores, a useless member does not hurt the learned combination, averaging two
independent views beats either, score averaging ignores a member's scale; in the probe, an ensemble of a run with
itself ranks as the run does, and a missing second backbone leaves it out with a warning."""
import json

import numpy as np
import pytest
from test_probe import METRICS, config

from lib.probe.compare import run_probe
from lib.probe.config import ProbeConfig
from lib.probe.ensemble import combine, fit_weights, standardized, training_pairs
from lib.retrieval.ranking import ranking_metrics


def scored_set(seed: int, n_q: int = 80, n_g: int = 300, n_ids: int = 40):
    """(query labels, gallery labels, same (n_q, n_g)) of a constructed retrieval set."""
    rng = np.random.default_rng(seed)
    g_labels = rng.integers(0, n_ids, n_g)
    q_labels = rng.integers(0, n_ids, n_q)
    return q_labels, g_labels, q_labels[:, None] == g_labels[None]


def view(same: np.ndarray, seed: int, signal: float = 1.0, scale: float = 1.0) -> np.ndarray:
    """A scorer that sees `signal` of the answer through unit Gaussian noise, on its own scale."""
    return scale * (signal * same + np.random.default_rng(seed).normal(size=same.shape))


def mean_ap(scores, q_labels, g_labels) -> float:
    return ranking_metrics(np.argsort(-scores, axis=1, kind="stable"), g_labels, q_labels)["mAP"]


def test_a_useless_member_does_not_hurt_the_learned_ensemble():
    fit_q, fit_g, fit_same = scored_set(0)
    q, g, same = scored_set(1)
    # the useless member is pure noise on a scale 50 times larger: raw score averaging would follow it alone
    good, useless = view(same, 10, signal=2.0), view(same, 11, signal=0.0, scale=50.0)
    weights = fit_weights(*training_pairs([view(fit_same, 20, 2.0), view(fit_same, 21, 0.0, 50.0)], fit_same,
                                          np.arange(len(fit_same))))
    assert abs(weights[1]) < 0.1 * weights[0]
    alone = mean_ap(good, q, g)
    learned = mean_ap(combine([good, useless], "logistic", weights), q, g)
    assert learned >= alone - 0.005
    # rank averaging has no way to tell the members apart: why the probe learns the weights by default
    assert mean_ap(combine([good, useless], "rank"), q, g) < alone - 0.05


def test_averaging_two_independent_views_beats_either():
    q, g, same = scored_set(2)
    a, b = view(same, 30), view(same, 31, scale=0.01)  # equally informative, independent noise, other scales
    best_alone = max(mean_ap(a, q, g), mean_ap(b, q, g))
    for combiner in ("rank", "score"):
        assert mean_ap(combine([a, b], combiner), q, g) > best_alone + 0.02, combiner


def test_score_averaging_is_blind_to_a_members_scale_and_offset():
    q, g, same = scored_set(3, n_q=10, n_g=50)
    a, b = view(same, 40), view(same, 41)
    np.testing.assert_allclose(combine([a, b], "score"), combine([a, 100 * b + 7], "score"), atol=1e-9)
    z = standardized(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    np.testing.assert_allclose(z[0], [-1.2247449, 0, 1.2247449], atol=1e-6)
    np.testing.assert_array_equal(z[1], 0)  # a constant row says nothing: zeros, not NaN


def test_left_out_pairs_stay_last_and_out_of_the_training_pairs():
    scores = np.array([[-np.inf, 0.2, 0.9], [0.1, -np.inf, 0.3]])
    for combiner, weights in (("rank", None), ("score", None), ("logistic", [1.0, 0.5])):
        combined = combine([scores, scores * 2], combiner, weights)
        assert np.isneginf(combined[[0, 1], [0, 1]]).all() and np.isfinite(combined[[0, 0, 1, 1], [1, 2, 0, 2]]).all()
    same = np.array([[True, False, True], [False, True, False]])
    x, y = training_pairs([scores, scores], same, [0, 1])
    assert len(x) == 4 and np.isfinite(x).all() and y.sum() == 1


def test_training_pairs_keep_every_positive_and_draw_negatives_by_query():
    q, g, same = scored_set(4, n_q=6, n_g=1000, n_ids=5)
    members = [view(same, 50), view(same, 51)]
    x, y = training_pairs(members, same, np.arange(6))
    assert y.sum() == same.sum() and (~y).sum() == 6 * 200
    # a query draws the same pairs whichever chunk it comes in (pairs come out query by query)
    alone, _ = training_pairs([m[3:4] for m in members], same[3:4], [3])
    before = int(same[:3].sum()) + 3 * 200
    np.testing.assert_array_equal(alone, x[before:before + len(alone)])


def test_bad_input_gets_a_clear_message():
    a = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown combiner 'vote'"):
        combine([a, a], "vote")
    with pytest.raises(ValueError, match="one shape"):
        combine([a, np.zeros((2, 4))], "rank")
    with pytest.raises(ValueError, match="one weight per member"):
        combine([a, a], "logistic")
    with pytest.raises(ValueError, match="3 positive and 0 negative"):
        fit_weights(np.ones((3, 2)), np.ones(3, bool))
    with pytest.raises(ValueError, match="ensemble_combine 'vote'"):
        ProbeConfig(ensemble_combine="vote")
    with pytest.raises(ValueError, match="ensemble_members"):
        ProbeConfig(ensemble_members=["nobody", "imagenet"])


@pytest.mark.parametrize("combiner", ["rank", "score", "logistic"])
def test_an_ensemble_of_a_run_with_itself_ranks_as_the_run(demo, run_dir, tmp_path, combiner):
    twins = [{"name": "run", "run_dir": str(run_dir)}, {"name": "twin", "run_dir": str(run_dir)}]
    table, rankings = run_probe(config(demo, run_dir, tmp_path / "cache", backbones=twins,
                                       methods=["global", "ensemble"], ensemble_combine=combiner))
    assert table["backbone"].tolist() == ["run", "twin", "run and twin"]
    by = table.set_index(["backbone", "method"])
    np.testing.assert_allclose(by.loc[("run and twin", "ensemble"), METRICS].to_numpy(dtype=float),
                               by.loc[("run", "global"), METRICS].to_numpy(dtype=float))
    ensemble = by.loc[("run and twin", "ensemble")]
    assert ensemble["feature_ms_per_image"] == pytest.approx(2 * by.loc[("run", "global"), "feature_ms_per_image"])
    weights = json.loads(ensemble["importance"]) if combiner == "logistic" else {}
    assert combiner != "logistic" or (set(weights) == {"run", "twin"} and min(weights.values()) > 0)


def test_one_backbone_leaves_the_ensemble_out(demo, run_dir, tmp_path):
    with pytest.warns(UserWarning, match="ensemble left out"):
        table, _ = run_probe(config(demo, run_dir, tmp_path / "cache", methods=["global", "ensemble"]))
    assert table["method"].tolist() == ["global"]


def test_ensemble_weights_fitted_on_another_split(demo, run_dir, tmp_path):
    twins = [{"name": "run", "run_dir": str(run_dir)}, {"name": "twin", "run_dir": str(run_dir)}]
    table, _ = run_probe(config(demo, run_dir, tmp_path / "cache", backbones=twins, methods=["global", "ensemble"],
                                calibrate_on="test"))
    by = table.set_index(["backbone", "method"])
    np.testing.assert_allclose(by.loc[("run and twin", "ensemble"), METRICS].to_numpy(dtype=float),
                               by.loc[("run", "global"), METRICS].to_numpy(dtype=float))
    assert set(json.loads(by.loc[("run and twin", "ensemble"), "importance"])) == {"run", "twin"}
