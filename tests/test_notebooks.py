"""Each numbered notebook runs headless through papermill on the demo data, and its .py/.ipynb pair is in sync."""
import json
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import papermill
import pytest
from test_analysis import assert_real_png

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync_with_a_parameters_cell(py):
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    text = jupytext.read(py)
    assert [c.source for c in nb.cells] == [c.source for c in text.cells], f"sync {py.name}: jupytext --sync {py}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    assert all(not c.get("outputs") for c in code), "commit notebooks without outputs"
    assert nb.metadata["kernelspec"]["name"] == "photo-retrieval"


def run(name: str, out: Path, **params) -> nbformat.NotebookNode:
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out / f"{name}.ipynb"),
                               parameters=params, kernel_name="photo-retrieval", cwd=str(ROOT), progress_bar=False)
    return nbformat.read(out / f"{name}.ipynb", as_version=4)


def test_notebooks_01_to_06_on_the_demo(demo, tmp_path):
    """The demo pipeline, each notebook reading what the one before wrote."""
    data, _ = demo
    splits, figures, run_dir = tmp_path / "splits", tmp_path / "figures", tmp_path / "run"
    run("01_split", tmp_path, data_dir=str(data), splits_dir=str(splits), figures_dir=str(figures))
    for name in ("train_ids.json", "val_ids.json", "test_ids.json", "class_to_idx.json", "split_report.md"):
        assert (splits / name).exists(), name
    assert len(json.loads((splits / "class_to_idx.json").read_text())) == 6
    assert (figures / "01_split_distribution.png").stat().st_size > 10_000

    run("02_train", tmp_path, data_dir=str(data), splits_dir=str(splits), run_dir=str(run_dir), epochs=2,
        img_size=32, embed_dim=32, batches_per_epoch=2, figures_dir=str(figures),
        mlflow_uri=(tmp_path / "mlruns").as_uri())
    assert (run_dir / "latest_model.pt").exists() and (run_dir / "best_model.pt").exists()
    assert (figures / "02_training_curves_run.png").stat().st_size > 10_000
    assert list((tmp_path / "mlruns").rglob("val_recall_at_1")), "per-epoch metrics reach MLflow"
    results = tmp_path / "results" / "benchmarks.csv"
    run("03_evaluate", tmp_path, run_dir=str(run_dir), results_csv=str(results), figures_dir=str(figures), k=10)
    for name in ("queries.csv", "arrays.npz", "metrics.json", "thresholds.json"):
        assert (run_dir / "eval" / "val" / name).exists(), name
    assert not (run_dir / "eval" / "test").exists(), "the test split only when asked for"
    assert (figures / "03_risk_coverage_run.png").stat().st_size > 10_000
    row = pd.read_csv(results)
    assert row["split"].tolist() == ["val"] and row["version"].tolist() == ["run"]

    run("04_confusion_analysis", tmp_path, run_dir=str(run_dir), figures_dir=str(figures),
        results_dir=str(tmp_path / "results"))
    for name in ("confusion", "confused_pairs", "margins", "accuracy_by_candidates", "error_shares", "per_class_ap",
                 "tsne", "worst_queries"):
        assert_real_png(figures / f"04_{name}_run_val.png")
    assert (tmp_path / "results" / "04_confused_pairs_run_val.csv").exists()
    nb = run("05_retrieval_gallery", tmp_path, run_dir=str(run_dir), figures_dir=str(figures), browser=False)
    assert_real_png(figures / "05_gallery_run_val.png")
    assert any("upload path vs notebook 03, cosine" in o.get("text", "") for c in nb.cells for o in c.get("outputs", []))

    backbones = [{"name": "lite0", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 64}]
    run("06_probe", tmp_path, data_dir=str(data), splits_dir=str(splits), backbones=backbones, run_dir=str(run_dir),
        sift={"max_side": 256, "n_features": 300}, cache_dir=str(tmp_path / "probe_cache"),
        figures_dir=str(figures), results_dir=str(tmp_path / "results"), mlflow_uri=(tmp_path / "mlruns").as_uri())
    probe = pd.read_csv(tmp_path / "results" / "probe.csv")
    assert len(probe) == 10 and set(probe["backbone"]) == {"lite0", "run"} and (probe["protocol"] == "loo").all()
    assert len(list((tmp_path / "results" / "probe").glob("*.json"))) == 1
    assert_real_png(figures / "06_probe_splits_val.png")
    assert list((tmp_path / "mlruns").rglob("lite0/fusion/identity_balanced_mAP")) or \
        list((tmp_path / "mlruns").rglob("*identity_balanced_mAP*")), "probe metrics reach MLflow"
