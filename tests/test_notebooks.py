"""Each numbered notebook runs headless through papermill on the demo data, and its .py/.ipynb pair is in sync."""
import ast
import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import papermill
import pytest
from test_analysis import assert_real_png

from lib.analysis.tables import confused_pairs
from lib.data.splits import load_split_index
from lib.evaluate.record import load_evaluation
from lib.retrieval.ranking import evaluate_retrieval
from lib.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))

_spec = importlib.util.spec_from_file_location("run_all", ROOT / "notebooks" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_in_sync_with_a_parameters_cell(py):
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    text = jupytext.read(py)
    assert [c.source for c in nb.cells] == [c.source for c in text.cells], f"sync {py.name}: jupytext --sync {py}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "first code cell must be tagged 'parameters'"
    assert all(not c.get("outputs") for c in code), "commit notebooks without outputs"
    assert nb.metadata["kernelspec"]["name"] == "photo-retrieval"


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_pair_matches_by_run_all_comparison(py):
    """The comparison run_all.py rebuilds by (cell types, sources, tags) finds nothing to rebuild."""
    ipynb, text = jupytext.read(py.with_suffix(".ipynb")), jupytext.read(py)
    assert run_all.cells(ipynb) == run_all.cells(text), f"out of sync: jupytext --sync {py}"


def test_rebuild_leaves_in_sync_notebooks_byte_for_byte(tmp_path, monkeypatch):
    """As on a fresh clone, where every .py may be newer than its .ipynb: nothing in step is rewritten."""
    (tmp_path / "notebooks").mkdir()
    for py in NOTEBOOKS:
        for f in (py, py.with_suffix(".ipynb")):
            shutil.copy(f, tmp_path / "notebooks" / f.name)
    copies = sorted((tmp_path / "notebooks").glob("*.py"))
    for py in copies:
        run_all.sync_ipynb(py)  # in step first (a committed pair out of step fails the test above, not this one)
        os.utime(py.with_suffix(".ipynb"), (1_000_000, 1_000_000))
        os.utime(py, (2_000_000, 2_000_000))
    before = {py: py.with_suffix(".ipynb").read_bytes() for py in copies}
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    assert run_all.notebooks() == [py.with_suffix(".ipynb") for py in copies]
    assert {py: py.with_suffix(".ipynb").read_bytes() for py in copies} == before

    edited = copies[0]  # a real change to the source is still carried over
    edited.write_text(edited.read_text() + "\n# %%\nprint('added')\n")
    assert run_all.sync_ipynb(edited) and not run_all.sync_ipynb(edited)
    assert run_all.cells(jupytext.read(edited.with_suffix(".ipynb"))) == run_all.cells(jupytext.read(edited))
    assert all(py.with_suffix(".ipynb").read_bytes() == before[py] for py in copies[1:])


def parameter_cell_values(py: Path) -> dict:
    """The literal each name in the .py's parameters cell is set to (the last assignment wins, as when it runs)."""
    cell = next(c for c in jupytext.read(py).cells if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(py, caplog):
    """papermill's parameter parser (papermill --help-notebook, inspect_notebook) parses every line, no warning."""
    with caplog.at_level(logging.DEBUG, logger="papermill"):
        found = papermill.inspect_notebook(str(py.with_suffix(".ipynb")))
    unparsed = [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert not unparsed, "\n".join(unparsed)
    expected = parameter_cell_values(py)
    assert list(found) == list(expected)
    for name, p in found.items():
        default = ast.literal_eval(p["default"])  # a plain literal, so its type is known from the default
        assert default == expected[name] and type(default) is type(expected[name]), name


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
    index, _ = load_split_index(splits)
    assert (index.groupby("group")["split"].nunique() == 1).all(), "no group in two splits"
    for split in ("train", "val", "test"):
        groups = set(json.loads((splits / f"{split}_ids.json").read_text()))
        assert groups == set(index.loc[index["split"] == split, "group"]), split

    run("02_train", tmp_path, **{**run_all.DEMO_TRAIN, "epochs": 2, "img_size": 32, "embed_dim": 32},
        data_dir=str(data), splits_dir=str(splits), run_dir=str(run_dir), batches_per_epoch=2,
        figures_dir=str(figures), mlflow_uri=(tmp_path / "mlruns").as_uri())
    assert (run_dir / "latest_model.pt").exists() and (run_dir / "best_model.pt").exists()
    assert (figures / "02_training_curves_run.png").stat().st_size > 10_000
    assert list((tmp_path / "mlruns").rglob("val_recall_at_1")), "per-epoch metrics reach MLflow"
    history, best = pd.read_csv(run_dir / "metrics.csv"), load_checkpoint(run_dir / "best_model.pt")
    selected = "ema_val_recall@1" if "ema_val_recall@1" in history else "val_recall@1"
    assert best["best_metric"] == pytest.approx(history.set_index("epoch").loc[best["epoch"], selected])
    assert best["best_metric"] == pytest.approx(history[selected].max())
    results = tmp_path / "results" / "benchmarks.csv"
    run("03_evaluate", tmp_path, run_dir=str(run_dir), results_csv=str(results), figures_dir=str(figures), neighbours=10)
    for name in ("queries.csv", "arrays.npz", "metrics.json", "thresholds.json"):
        assert (run_dir / "eval" / "val" / name).exists(), name
    assert not (run_dir / "eval" / "test").exists(), "the test split only when asked for"
    assert (figures / "03_risk_coverage_run.png").stat().st_size > 10_000
    row = pd.read_csv(results)
    assert row["split"].tolist() == ["val"] and row["version"].tolist() == ["run"]
    # the figures the notebook reports, again from the embeddings it saved, by lib
    ev = load_evaluation(run_dir / "eval" / "val")
    again = evaluate_retrieval(ev.gallery_emb, ev.gallery["label"], ev.query_emb, ev.queries["label"], ks=(1,),
                               device="cpu")
    for key in ("recall@1", "mAP"):
        assert ev.metrics[key] == pytest.approx(again[key], abs=1e-9) == row[key].iloc[0], key
    assert ev.metrics["vote_accuracy"] == pytest.approx((ev.queries["pred"] == ev.queries["label"]).mean())

    run("04_confusion_analysis", tmp_path, run_dir=str(run_dir), figures_dir=str(figures),
        results_dir=str(tmp_path / "results"))
    for name in ("confusion", "confused_pairs", "margins", "accuracy_by_candidates", "error_shares", "per_class_ap",
                 "per_class_heatmap", "tsne", "worst_queries"):
        assert_real_png(figures / f"04_{name}_run_val.png")
    pairs = pd.read_csv(tmp_path / "results" / "04_confused_pairs_run_val.csv", keep_default_na=False)
    cols = ["class_a", "class_b", "a_as_b", "b_as_a", "errors"]
    pd.testing.assert_frame_equal(pairs[cols], confused_pairs(ev, top=len(pairs))[cols], check_dtype=False)
    nb = run("05_retrieval_gallery", tmp_path, run_dir=str(run_dir), figures_dir=str(figures), browser=False)
    assert_real_png(figures / "05_gallery_run_val.png")
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    cosine = re.search(r"upload path vs notebook 03, cosine on .*: ([-0-9.]+)", printed)
    assert cosine and float(cosine.group(1)) > 0.999, "a photo embedded as photo-predict does matches notebook 03"

    backbones = [{"name": "lite0", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 64}]
    run("06_probe", tmp_path, data_dir=str(data), splits_dir=str(splits), backbones=backbones, run_dir=str(run_dir),
        sift={"max_side": 256, "n_features": 300}, cache_dir=str(tmp_path / "probe_cache"),
        figures_dir=str(figures), results_dir=str(tmp_path / "results"), mlflow_uri=(tmp_path / "mlruns").as_uri())
    probe = pd.read_csv(tmp_path / "results" / "probe.csv")
    assert len(probe) == 13 and set(probe["backbone"]) == {"lite0", "run", "lite0 and run"}  # 6 methods + ensemble
    assert (probe["protocol"] == "loo").all()
    assert len(list((tmp_path / "results" / "probe").glob("*.json"))) == 1
    per_query = pd.read_csv(next((tmp_path / "results" / "probe").glob("*_queries.csv")), keep_default_na=False)
    hits = per_query.assign(hit=per_query["top1_identity"] == per_query["identity"]).groupby(["backbone", "method"])
    reported = probe.set_index(["backbone", "method"])["recall@1"]
    pd.testing.assert_series_equal(hits["hit"].mean().loc[reported.index], reported, check_names=False)
    assert_real_png(figures / "06_probe_splits_val.png")
    assert_real_png(figures / "06_probe_importance_splits_val.png")
    assert list((tmp_path / "mlruns").rglob("lite0/fusion/identity_balanced_mAP")) or \
        list((tmp_path / "mlruns").rglob("*identity_balanced_mAP*")), "probe metrics reach MLflow"
