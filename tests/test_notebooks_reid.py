"""Re-identification mode end to end: the demo's individuals as labels, an open-set split, its context column."""
import json

import numpy as np
import pandas as pd
import pytest
from test_notebooks import run, run_all

from lib.evaluate.record import load_evaluation
from lib.retrieval.faiss_index import NO_NEIGHBOUR


def test_reid_notebooks_01_to_06_on_the_demo_context_column(demo, tmp_path):
    data, _ = demo
    splits, figures, run_dir, results = (tmp_path / n for n in ("splits", "figures", "run", "results"))
    run("01_split", tmp_path, task="reid", data_dir=str(data), metadata_csv=str(data / "metadata.csv"),
        group_col="group", context_col="context", split_mode="open", unknown_share=1, splits_dir=str(splits),
        figures_dir=str(figures))
    index = pd.read_csv(splits / "index.csv", dtype=str, keep_default_na=False)
    assert (index.groupby("label")["split"].nunique() == 1).all(), "open set: an individual lies in one split"
    assert index["label"].str.match(r"^[a-z]+\d\d$").all(), "labels are the individuals, not the pattern classes"

    run("02_train", tmp_path, **{**run_all.DEMO_TRAIN, "epochs": 1, "img_size": 32, "embed_dim": 16},
        data_dir=str(data), splits_dir=str(splits), run_dir=str(run_dir), batches_per_epoch=2,
        figures_dir=str(figures), mlflow_uri="")
    run("03_evaluate", tmp_path, task="reid", run_dir=str(run_dir), results_csv=str(results / "benchmarks.csv"),
        figures_dir=str(figures), neighbours=5, restrict_to_context=True, evaluate_test=True)
    metrics = json.loads((run_dir / "eval" / "val" / "metrics.json").read_text())["metrics"]
    ev = load_evaluation(run_dir / "eval" / "val")
    real = ev.neighbours != NO_NEIGHBOUR
    q_context = ev.queries["context"].to_numpy()
    assert (ev.gallery["context"].to_numpy()[ev.neighbours][real] == np.broadcast_to(q_context[:, None], real.shape)[real]).all()
    # each query gets every other photo of its site up to k: a small site's row is shorter, not cut for all
    others = pd.Series(q_context).map(pd.Series(q_context).value_counts()).to_numpy() - 1
    np.testing.assert_array_equal(real.sum(axis=1), np.minimum(others, 5))
    assert (~real).any() and real.sum(axis=1).max() == 5, "the demo has sites both smaller and larger than k"
    assert metrics["protocol"] == "loo" and 0 < metrics["identity_balanced_mAP"] <= 1
    # leave-one-out: no query is unknown to its gallery, so all of them are grouped, measured off the calibration part
    clustering = metrics["clustering"]
    assert "unknown" not in clustering and clustering["chosen_on"]["queries"] == "all"
    held_out = int((~ev.queries["calibration"]).sum())
    assert clustering["all"]["n_photos"] == held_out == (ev.queries["cluster_all"] >= 0).sum()
    saved = json.loads((run_dir / "eval" / "val" / "clustering.json").read_text())
    assert saved["threshold"] == clustering["threshold"]
    assert (figures / "03_clusters_run_val.png").stat().st_size > 0 and (figures / "03_clusters_run_test.png").exists()
    row = pd.read_csv(results / "benchmarks.csv").set_index("split")
    assert row.loc["val", "cluster_all_ari"] == pytest.approx(clustering["all"]["ari"])
    test_metrics = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())["metrics"]
    # the demo's val individuals all have several photos: no new ones, no threshold (NaN), and test reuses that
    np.testing.assert_equal(test_metrics["new_individual"]["threshold"], metrics["new_individual"]["threshold"])
    n_val = int((index["split"] == "val").sum())
    pairs = pd.read_csv(results / "03_pairs_run_val.csv")
    assert len(pairs) == n_val * (n_val - 1) and not (pairs["query"] == pairs["gallery"]).any()
    per_identity = pd.read_csv(results / "03_per_identity_ap_run_val.csv")
    assert set(per_identity["identity"]) == set(index.loc[index["split"] == "val", "label"])
    # the per-identity table and identity-balanced mAP the notebook reports, from the queries' own APs by pandas
    by_identity = ev.queries.groupby("label")["ap"].mean()
    np.testing.assert_allclose(per_identity.set_index("identity")["ap"].loc[by_identity.index], by_identity)
    assert metrics["identity_balanced_mAP"] == pytest.approx(by_identity.dropna().mean())
    assert metrics["mAP"] == pytest.approx(ev.queries["ap"].dropna().mean())

    run("04_confusion_analysis", tmp_path, task="reid", run_dir=str(run_dir), figures_dir=str(figures),
        results_dir=str(results))
    contexts = pd.read_csv(results / "04_per_context_run_val.csv")
    assert contexts["queries"].sum() == n_val and contexts["context"].str.startswith("site").all()
    assert (figures / "04_margins_by_context_run_val.png").stat().st_size > 0
    by_candidates = pd.read_csv(results / "04_accuracy_by_context_candidates_run_val.csv")
    assert by_candidates["queries"].sum() == n_val

    # the probe in re-ID mode, backgrounds painted out from the mask column the metadata CSV brought into the index
    run("06_probe", tmp_path, task="reid", data_dir=str(data), splits_dir=str(splits), run_dir=str(run_dir),
        backbones=[], methods=["global", "local", "fusion"], mask_col="mask", sift={"max_side": 256, "n_features": 300},
        cache_dir=str(tmp_path / "probe_cache"), figures_dir=str(figures), results_dir=str(results), mlflow_uri="")
    probe = pd.read_csv(results / "probe.csv", keep_default_na=False)
    assert probe["method"].tolist() == ["global", "local", "fusion"]
    assert (probe["identity_col"] == "label").all() and (probe["mask_col"] == "mask").all()
    assert (probe["n_queries"] == n_val).all() and (probe["protocol"] == "loo").all()
    assert (figures / "06_probe_splits_val_masked-mask.png").stat().st_size > 0
