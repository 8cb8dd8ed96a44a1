"""The probe: its metrics against the evaluation code, every method end to end on the demo, the feature cache (a second
run computes nothing and gives the same numbers), masks in the cache key, and its refusals."""
import dataclasses

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

import lib.probe.features
import lib.probe.methods
import lib.retrieval.embed
from lib.core.errors import DataError
from lib.data.splits import load_split_index
from lib.probe.compare import run_probe, save_probe
from lib.probe.config import ProbeConfig, probe_config
from lib.probe.methods import PROBE_METHODS
from lib.probe.fusion import ScoreFusion
from lib.probe.probe_set import with_masks
from lib.retrieval.exclusion import leave_one_out
from lib.retrieval.ranking import evaluate_retrieval, ranking_metrics

METRICS = ["recall@1", "recall@5", "mAP", "identity_balanced_mAP"]


def config(demo, run_dir, cache, **kw) -> ProbeConfig:
    data, splits = demo
    return ProbeConfig(**{"data_dir": str(data), "splits_dir": str(splits), "identity_col": "group",
                          "backbones": [{"name": "run", "run_dir": str(run_dir)}], "cache_dir": str(cache),
                          "sift": {"max_side": 256, "n_features": 300}, "device": "cpu", **kw})


def brute_force_metrics(scores: np.ndarray, g_labels, q_labels, loo: bool, ks=(1, 5)) -> dict:
    """Recall@k, mAP and identity-balanced mAP computed apart from lib: scikit-learn's AP of each query's scores
    against same-label, a top-k scan for recall, pandas for the per-identity mean. loo: the query's own row is out."""
    g_labels, q_labels = np.asarray(g_labels), np.asarray(q_labels)
    hits, aps = {k: [] for k in ks}, []
    for i, (row, label) in enumerate(zip(scores, q_labels)):
        keep = np.arange(len(g_labels)) != i if loo else np.ones(len(g_labels), bool)
        same, row = g_labels[keep] == label, row[keep]
        for k in ks:
            hits[k].append(same[np.argsort(-row)[:k]].any())
        aps.append(average_precision_score(same, row) if same.any() else np.nan)
    per_identity = pd.Series(aps).groupby(q_labels).mean().dropna()
    return {**{f"recall@{k}": np.mean(hits[k]) for k in ks}, "mAP": np.nanmean(aps),
            "identity_balanced_mAP": per_identity.mean()}


@pytest.mark.parametrize("loo", [False, True])
def test_ranking_metrics_equal_an_independent_computation(loo):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(40, 8)).astype(np.float32)
    g_labels = rng.integers(0, 6, 40).astype(str)
    q, q_labels = (g, g_labels) if loo else (rng.normal(size=(15, 8)).astype(np.float32), rng.integers(0, 7, 15).astype(str))
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float64) @ \
        (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float64).T
    # no two gallery photos within 1e-5 of a query's score: float32 and float64 rank them alike, so exact metrics
    gaps = np.diff(np.sort(np.where(np.eye(*scores.shape, dtype=bool) & loo, 9, scores), axis=1), axis=1)
    assert gaps.min() > 1e-5
    want = brute_force_metrics(scores, g_labels, q_labels, loo)
    order = np.argsort(-np.where(np.eye(*scores.shape, dtype=bool) & loo, -np.inf, scores), axis=1)
    exclude = leave_one_out(len(g)) if loo else None
    probe = ranking_metrics(order, g_labels, q_labels, exclude)  # how the probe tallies its methods' rankings
    evaluation = evaluate_retrieval(g, g_labels, q, q_labels, exclude, device="cpu")
    for key in METRICS:
        assert probe[key] == pytest.approx(want[key], rel=1e-12), key
        assert evaluation[key] == pytest.approx(want[key], rel=1e-12), key


def test_every_method_runs_then_the_cache_serves_a_second_run(demo, run_dir, tmp_path, monkeypatch):
    cfg = config(demo, run_dir, tmp_path / "cache")
    with pytest.warns(UserWarning, match="ensemble left out"):  # one backbone; test_ensemble.py probes two
        first, rankings = run_probe(cfg)
    per_backbone = [m for m in PROBE_METHODS if m != "ensemble"]
    assert first["method"].tolist() == per_backbone and not first["features_cached"].any()
    assert (first["protocol"] == "loo").all(), "val individuals are not in train: leave-one-out"
    assert first[METRICS].apply(lambda c: c.between(0, 1)).all().all()
    top = rankings["run", "global"]
    assert len(top) == first["n_queries"].iloc[0] and all(len(p) == 5 for p in top["top_paths"])
    assert not any(q in p for q, p in zip(top["path"], top["top_paths"])), "a query never retrieves itself"

    def fail(*a, **k):
        raise AssertionError("recomputed a cached feature")
    monkeypatch.setattr(lib.retrieval.embed, "extract_embeddings", fail)
    monkeypatch.setattr(lib.probe.features, "extract_embeddings", fail)
    monkeypatch.setattr(lib.probe.features, "sift_features", fail)
    matched = []  # the inlier counts come from the cache too: no pair is matched again
    real_pair_inliers = lib.probe.features.pair_inliers
    monkeypatch.setattr(lib.probe.features, "pair_inliers",
                        lambda pairs, *a, **k: matched.extend(pairs) or real_pair_inliers(pairs, *a, **k))
    with pytest.warns(UserWarning, match="ensemble left out"):
        second, _ = run_probe(cfg)
    assert matched == []
    assert second["features_cached"].all()
    pd.testing.assert_frame_equal(second[METRICS], first[METRICS])

    snapshot = save_probe(first, cfg, tmp_path / "results", rankings)
    save_probe(second, cfg, tmp_path / "results")
    assert len(pd.read_csv(tmp_path / "results" / "probe.csv")) == 2 * len(per_backbone)
    assert snapshot.exists() and '"identity_col": "group"' in snapshot.read_text()
    queries = pd.read_csv(snapshot.with_name(f"{first['run_id'].iloc[0]}_queries.csv"), keep_default_na=False)
    assert len(queries) == len(per_backbone) * first["n_queries"].iloc[0]
    per_method = queries.groupby("method", sort=False)
    hits = per_method.apply(lambda t: (t["top1_identity"] == t["identity"]).mean(), include_groups=False)
    np.testing.assert_allclose(hits[per_backbone].to_numpy(), first["recall@1"].to_numpy())


def test_masks_change_the_features_and_the_cache_key(demo, run_dir, tmp_path):
    data, _ = demo
    plain, _ = run_probe(config(demo, run_dir, tmp_path / "cache", methods=["global", "local"]))
    masked, _ = run_probe(config(demo, run_dir, tmp_path / "cache", methods=["global", "local"],
                                 mask_col="mask", masks_csv=str(data / "metadata.csv")))
    assert not masked["features_cached"].any(), "masked photos are other features: not read from the plain cache"
    assert not np.allclose(masked[METRICS].to_numpy(), plain[METRICS].to_numpy())


def test_cmc_ranks_as_asked(demo, run_dir, tmp_path):
    table, _ = run_probe(config(demo, run_dir, tmp_path / "cache", methods=["global"], ranks=[1, 3, 10]))
    assert [c for c in table.columns if c.startswith("recall@")] == ["recall@1", "recall@3", "recall@10"]
    r = table.iloc[0]
    assert r["recall@1"] <= r["recall@3"] <= r["recall@10"]
    with pytest.raises(ValueError, match="ranks"):
        ProbeConfig(ranks=[0, 5])


def pairs_fitted(monkeypatch, scorer) -> list[int]:
    """The number of pairs each call of scorer.fit (ScoreFusion's, HybridScorer's) learns from, as the probe runs."""
    sizes, fit = [], scorer.fit
    monkeypatch.setattr(scorer, "fit", lambda self, scores, same: sizes.append(np.size(same)) or fit(self, scores, same))
    return sizes


def assert_fitted_on_the_calibration_split(demo, run_dir, tmp_path, monkeypatch, scorer, methods) -> None:
    """Probing val with calibrate_on="test" fits `scorer` once, on the test split's pairs (shortlist_k a query);
    with calibrate_on="val" it is cross-fitted on val's own pairs, once per half of the identities."""
    cfg = config(demo, run_dir, tmp_path / "cache", methods=methods)
    n_test = run_probe(dataclasses.replace(cfg, split="test", methods=["global"]))[0]["n_queries"].iloc[0]
    sizes = pairs_fitted(monkeypatch, scorer)
    table, _ = run_probe(dataclasses.replace(cfg, calibrate_on="test"))
    assert table["method"].tolist() == methods and table["mAP"].between(0, 1).all()
    assert sizes == [n_test * cfg.shortlist_k], "fitted once, on every test query's shortlist"
    sizes.clear()
    crossfit, _ = run_probe(dataclasses.replace(cfg, calibrate_on="val"))
    assert len(sizes) == 2 and sum(sizes) == crossfit["n_queries"].iloc[0] * cfg.shortlist_k


def test_fusion_calibrated_on_another_split(demo, run_dir, tmp_path, monkeypatch):
    assert_fitted_on_the_calibration_split(demo, run_dir, tmp_path, monkeypatch, ScoreFusion, ["fusion"])


def test_refusals(demo, run_dir, tmp_path, monkeypatch):
    index = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["x", "y"]})
    with pytest.raises(DataError, match="'mask'"):
        with_masks(index, "", "mask")
    pd.DataFrame({"path": ["a.jpg"], "outline": ["[]"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match=r"\['mask'\]"):
        with_masks(index, str(tmp_path / "m.csv"), "mask")
    joined = with_masks(index, str(tmp_path / "m.csv"), "outline")
    assert joined["outline"].tolist() == ["[]", ""]
    with pytest.raises(ValueError, match="bogus"):
        probe_config(methods=["global", "bogus"])
    with pytest.raises(ValueError, match="unknown probe parameter"):
        probe_config(epochs=3)
    with pytest.raises(ValueError, match="ratio"):
        ProbeConfig(sift={"ratio": 2.0})
    with pytest.raises(DataError, match="identity_col 'animal'"):
        run_probe(config(demo, run_dir, tmp_path / "cache", identity_col="animal"))
    monkeypatch.setattr("lib.probe.methods.MAX_PAIRS", 10)
    with pytest.warns(UserWarning, match="kreciprocal left out"):
        table, _ = run_probe(config(demo, run_dir, tmp_path / "cache", methods=["global", "kreciprocal"]))
    assert table["method"].tolist() == ["global"]


def test_ranking_a_few_queries_at_a_time_changes_nothing(demo, run_dir, tmp_path, monkeypatch):
    """Large splits are ranked in query chunks to bound memory: chunks of 1-2 queries give the very same rows."""
    cfg = config(demo, run_dir, tmp_path / "cache", methods=["global", "qe", "local", "fusion", "hybrid"])
    whole, whole_rankings = run_probe(cfg)
    monkeypatch.setattr("lib.retrieval.ranking.RANK_PAIRS", 50)  # ~33 gallery photos: one or two queries per chunk
    chunked, chunked_rankings = run_probe(cfg)
    pd.testing.assert_frame_equal(chunked[METRICS], whole[METRICS])
    for key, table in whole_rankings.items():
        assert chunked_rankings[key]["top_paths"].map(list).tolist() == table["top_paths"].map(list).tolist()


def test_a_run_trained_on_other_data_is_refused(demo, run_dir, tmp_path, monkeypatch):
    real = lib.probe.features.load_trained

    def other_data(*a, **k):
        run = real(*a, **k)
        return dataclasses.replace(run, config={**run.config, "data_fingerprint": "0" * 64})
    monkeypatch.setattr(lib.probe.features, "load_trained", other_data)
    with pytest.raises(DataError, match="other data"):
        run_probe(config(demo, run_dir, tmp_path / "cache", methods=["global"]))


def test_shortlisted_sift_computes_only_matched_photos_and_ranks_as_all(demo, run_dir, tmp_path, monkeypatch):
    """sift_photos='shortlisted' extracts SIFT for the queries and their shortlisted gallery photos only, matches the
    same pairs to the same inliers as 'all', and a longer shortlist later extracts only the photos it adds."""
    def recording(module, name, keep=lambda args, out: out):
        seen, real = [], getattr(module, name)

        def wrapper(*args, **kw):
            out = real(*args, **kw)
            seen.append(keep(args, out))
            return out
        monkeypatch.setattr(module, name, wrapper)
        return seen

    def probe(**kw):
        """(table, rankings, paths given SIFT, paths shortlisted, inlier tables, photos SIFT was computed for)"""
        asked = recording(lib.probe.features, "sift_table", lambda args, out: set(args[0]["path"]))
        shortlists = recording(lib.probe.methods, "_shortlist",
                               lambda args, out: set(args[0].gallery["path"].to_numpy()[out[0]].ravel()))
        inliers = recording(lib.probe.methods, "inlier_table", lambda args, out: out[0])
        computed = recording(lib.probe.features, "sift_features")
        # identity = the demo's pattern, which train holds too: the val queries search the train photos
        table, rankings = run_probe(config(demo, run_dir, tmp_path / "cache", identity_col="label",
                                           methods=["global", "local", "fusion", "hybrid"], **kw))
        monkeypatch.undo()
        return table, rankings, set().union(*asked), set().union(*shortlists), inliers, len(computed)

    index, _ = load_split_index(demo[1])
    queries = set(index.loc[index["split"] == "val", "path"])
    every, every_rankings, _, _, every_inliers, _ = probe(sift_photos="all", cache_dir="", shortlist_k=5)
    table, rankings, asked, shortlisted, inliers, computed = probe(shortlist_k=5)
    assert (table["protocol"] == "gallery").all()
    assert asked == queries | shortlisted and computed == len(asked)
    assert len(shortlisted) < (index["split"] == "train").sum(), "some train photo is in no shortlist: left out"
    pd.testing.assert_frame_equal(table[METRICS], every[METRICS])
    for key, ranking in every_rankings.items():
        assert rankings[key]["top_paths"].map(list).tolist() == ranking["top_paths"].map(list).tolist()
    assert len(inliers) == len(every_inliers)
    for got, want in zip(inliers, every_inliers):
        np.testing.assert_array_equal(got, want)
    # A longer shortlist reads the photos the shorter one made from the per-photo cache and extracts only the rest.
    _, _, longer_asked, _, _, longer_computed = probe(shortlist_k=10)
    assert longer_asked > asked and longer_computed == len(longer_asked - asked)


def test_an_approximate_shortlist_says_what_it_costs_and_visiting_every_list_equals_exact(demo, run_dir, tmp_path,
                                                                                          capsys):
    def probe(**kw):
        return run_probe(config(demo, run_dir, tmp_path / "cache", identity_col="label", shortlist_k=5,
                                methods=["global", "local", "fusion"], **kw))

    exact, exact_rankings = probe()
    assert "shortlist index" not in capsys.readouterr().out, "auto is exact search on a gallery this size"
    every_list, rankings = probe(index="IVF4,Flat", nprobe=4)
    assert "shortlist index: IVF4,Flat" in capsys.readouterr().out
    pd.testing.assert_frame_equal(every_list[METRICS], exact[METRICS])
    for key, ranking in exact_rankings.items():
        assert rankings[key]["top_paths"].map(list).tolist() == ranking["top_paths"].map(list).tolist()
    probe(index="IVF4,Flat", nprobe=1)
    out = capsys.readouterr().out
    recall = float(out.split("shortlist index: IVF4,Flat")[1].split("recall@5 ")[1].split()[0])
    assert 0 < recall < 1, "one list of four misses some of the exact nearest"


def test_a_probe_method_is_one_record(demo, run_dir, tmp_path, monkeypatch):
    """A method registered in PROBE_METHODS alone is a valid `methods` name, runs after the global ones with the
    cost its MethodRun states, and, being learned, makes the probe prepare the calibrate_on split."""
    from lib.probe.methods import MethodRun, ProbeMethod
    from lib.probe.scores import cosine, order

    built = []

    def farthest_first(b):
        built.append(b.calibration_set)
        return MethodRun(b.q_ms + 1.0, lambda rows, _: order(-cosine(b.q[rows], b.g, b.s.exclusion_for(rows))))

    monkeypatch.setitem(PROBE_METHODS, "farthest", ProbeMethod("farthest", "embeddings", True, farthest_first))
    table, _ = run_probe(config(demo, run_dir, tmp_path / "cache", identity_col="label", split="val",
                                calibrate_on="train", methods=["farthest", "global"]))
    assert table["method"].tolist() == ["global", "farthest"]  # registry order
    rows = table.set_index("method")
    assert rows.loc["farthest", "feature_ms_per_image"] == pytest.approx(rows.loc["global", "feature_ms_per_image"] + 1)
    assert rows.loc["farthest", "recall@1"] < rows.loc["global", "recall@1"]
    assert built[0] is not None, "a learned method gets the calibrate_on split"
    with pytest.raises(ValueError, match="choose from global, qe"):
        ProbeConfig(methods=["farthset"])
