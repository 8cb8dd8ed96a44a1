"""The deployable export (lib.train.export -> model.onnx + preprocessing + gallery) and predicting from it
(lib.evaluate.exported, photo-predict --export): the same answers as the checkpoint, and a folder checked before it is
trusted."""
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_image

from lib.core.errors import DataError
from lib.core.state_io import write_json, write_manifest
from lib.evaluate import cluster_eval
from lib.evaluate.calibrate import Calibration, calibrate, thresholds_info
from lib.evaluate.enroll_cli import enroll_photos
from lib.evaluate.exported import load_export, predict_export
from lib.evaluate.predict import THRESHOLDS_FILE, predict_photos
from lib.evaluate.run_eval import evaluate_run
from lib.retrieval.decide import save_thresholds
from lib.retrieval.onnx_engine import onnx_bytes
from lib.train import export as export_module
from lib.train.export import CHOICES, CONFIG, MANIFEST, ONNX, export_run
from lib.train.trained_run import load_trained

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("onnxruntime")
# the fixture enrols a photo after calibrating: prediction says the gallery grew, as it should
pytestmark = pytest.mark.filterwarnings("ignore:the gallery grew since")


@pytest.fixture(scope="module")
def evaluated(run_dir, demo, tmp_path_factory):
    """A copy of the demo run as notebook 03 leaves it (gallery index and thresholds saved), with one photo enrolled
    since: (run folder, its val query photos)."""
    run = Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("evaluated") / "run"))
    ev = evaluate_run(run, k=5, device="cpu")
    settings = Calibration(min_support=1)
    thresholds, chosen = calibrate(ev, settings)
    save_thresholds(run / THRESHOLDS_FILE, thresholds, thresholds_info(ev, chosen, settings))
    enroll_photos(run, [str(write_image(run.parent / "enrolled" / "newcomer.jpg", seed=7))], ["newcomer"],
                  device="cpu")
    return run, [str(demo[0] / p) for p in ev.queries["path"]]


@pytest.fixture(scope="module")
def exported(evaluated, tmp_path_factory):
    return export_run(evaluated[0], tmp_path_factory.mktemp("exported") / "export")


def copy_of(export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export, tmp_path / "export"))


def test_the_paths_an_export_carries_are_those_prediction_reads():
    from lib.evaluate.gallery_index import INDEX_DIR
    from lib.evaluate.enrolled_store import ENROLLED_FILE

    assert set(CHOICES) == {str(THRESHOLDS_FILE), str(cluster_eval.CLUSTER_FILE)}
    assert export_module.INDEX_DIR == INDEX_DIR == ENROLLED_FILE.parts[0]


def test_an_export_predicts_as_its_checkpoint_without_checkpoint_or_pytorch_model(evaluated, exported, tmp_path,
                                                                                   monkeypatch):
    run, queries = evaluated
    config = json.loads((exported / CONFIG).read_text())
    prep = config["preprocessing"]
    assert prep["input_size"] == [3, 32, 32] and prep["embedding_dim"] == 16 and len(prep["mean"]) == 3
    assert prep["resize"] == config["aug"]["resize"] and prep["interpolation"] == "bicubic"
    check = config["onnx"]["check"]
    assert check["on"] == "8 of the run's photos" and 0 <= check["max_abs_diff"] <= check["tolerance"] == 1e-4
    photos = [*queries, str(write_image(tmp_path / "new.jpg", seed=3))]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    photos.append(str(tmp_path / "broken.jpg"))
    expected = predict_photos(run, photos, device="cpu")

    moved = copy_of(exported, tmp_path)  # the export alone, elsewhere; its run cannot be loaded or rebuilt
    for module in ("lib.train.trained_run", "lib.evaluate.predict"):
        monkeypatch.setattr(f"{module}.load_trained", lambda *a, **k: pytest.fail("loaded the checkpoint"))
    monkeypatch.setattr("lib.train.model.create_model", lambda *a, **k: pytest.fail("built the PyTorch model"))
    got = predict_export(moved, photos)

    assert got["path"].tolist() == expected["path"].tolist() and got["error"].tolist() == expected["error"].tolist()
    assert got["pred"].tolist() == expected["pred"].tolist()
    assert got["verdict"].tolist() == expected["verdict"].tolist() and (got["verdict"][:-1] != "").all()
    assert got["neighbour_paths"].tolist() == expected["neighbour_paths"].tolist()
    assert (got["neighbour_labels"].str.contains("newcomer")).any()  # the enrolled photo is in the export's gallery
    ok = got["error"] == ""
    for col in ("score", "margin", "top1_distance"):
        np.testing.assert_allclose(got.loc[ok, col].astype(float), expected.loc[ok, col].astype(float), atol=1e-4)
    dist = lambda t: np.array(t.loc[ok, "neighbour_distances"].map(json.loads).tolist())  # noqa: E731
    np.testing.assert_allclose(dist(got), dist(expected), atol=1e-4)
    np.testing.assert_allclose(got.attrs["embeddings"], expected.attrs["embeddings"], atol=1e-4)


def test_the_commands_export_and_predict_from_the_export(evaluated, tmp_path):
    run, queries = evaluated
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "lib.train.export", str(run), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "model.onnx: max |ONNX - PyTorch| " in done.stdout and f"gallery: {out / 'index'}" in done.stdout
    done = subprocess.run([sys.executable, "-m", "lib.evaluate.predict_cli", "--export", str(out), queries[0],
                           "--out", str(tmp_path / "p.csv")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    row = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).iloc[0]
    assert row["pred"] == predict_photos(run, queries[:1], device="cpu")["pred"].iloc[0] and row["verdict"] != ""
    (out / ONNX).unlink()
    done = subprocess.run([sys.executable, "-m", "lib.evaluate.predict_cli", "--export", str(out), queries[0],
                           "--out", str(tmp_path / "q.csv")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and not (tmp_path / "q.csv").exists()
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {out / ONNX}: is missing")


def test_a_tampered_or_foreign_export_is_refused_naming_the_file(exported, evaluated, tmp_path):
    photo = evaluated[1][:1]
    export = copy_of(exported, tmp_path)
    onnx = (export / ONNX).read_bytes()
    (export / ONNX).write_bytes(onnx[:-1] + bytes([onnx[-1] ^ 1]))
    with pytest.raises(DataError, match=rf"{export / ONNX}: does not match the sha256 its manifest records"):
        predict_export(export, photo)
    (export / ONNX).write_bytes(onnx[:100])
    with pytest.raises(DataError, match=rf"{export / ONNX}: is 100 bytes, its manifest says {len(onnx)}"):
        predict_export(export, photo)
    (export / ONNX).write_bytes(onnx)
    assert load_export(export).checkpoint_sha256 == load_trained(evaluated[0]).checkpoint_sha256

    # a file added to the gallery after the export was made
    shutil.copy(export / "index" / "index.json", export / "index" / "enrolled.npz.new")
    with pytest.raises(DataError, match=r"enrolled.npz.new: not part of the export"):
        predict_export(export, photo)
    (export / "index" / "enrolled.npz.new").unlink()

    # an index built by another model: its own manifest whole, the checkpoint it names not the export's
    other = Path(shutil.copytree(export / "index", tmp_path / "other_index"))
    meta = json.loads((other / "index.json").read_text())
    write_json(other / "index.json", {**meta, "checkpoint_sha256": "0" * 64})
    with pytest.raises(DataError, match=rf"{other / 'index.json'}: built by another model than {export / CONFIG}"):
        predict_export(export, photo, gallery=other)

    # a config without preprocessing, in an export whose manifest vouches for it (an older export's)
    config = json.loads((export / CONFIG).read_text())
    write_json(export / CONFIG, {k: v for k, v in config.items() if k != "preprocessing"})
    files = list(json.loads((export / MANIFEST).read_text())["files"])
    write_manifest(export, MANIFEST, files, {})
    with pytest.raises(DataError, match=rf"{export / CONFIG}: no preprocessing \(input_size, .* missing\)"):
        predict_export(export, photo)


def test_an_export_killed_half_way_is_refused_not_mixed_with_the_one_it_replaced(exported, evaluated, tmp_path):
    export = copy_of(exported, tmp_path)
    writer = (f"import os, signal, lib.train.export as e\nreal = e.write_bytes\n"
              "def killed_after_onnx(path, data):\n    real(path, data)\n"
              "    if str(path).endswith('model.onnx'):\n        os.kill(os.getpid(), signal.SIGKILL)\n"
              f"e.write_bytes = killed_after_onnx\ne.export_run({str(evaluated[0])!r}, {str(export)!r}, "
              "checkpoint='latest', overwrite=True)\n")
    done = subprocess.run([sys.executable, "-c", writer], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (export / ONNX).exists() and (export / CONFIG).exists()  # the new model beside the old config
    with pytest.raises(DataError, match=rf"{export / MANIFEST} is missing or unreadable: the export is incomplete"):
        predict_export(export, evaluated[1][:1])
    export_run(evaluated[0], export, overwrite=True)  # done again, whole
    assert load_export(export).config["checkpoint"] == "best_model.pt"


def test_an_onnx_graph_that_differs_from_pytorch_is_refused_and_nothing_written(evaluated, tmp_path, monkeypatch):
    def of_other_weights(model, shape):
        other = load_trained(evaluated[0]).model
        with torch.no_grad():
            other.head.fc.weight.mul_(1.01)
        return onnx_bytes(other, shape)

    monkeypatch.setattr(export_module, "onnx_bytes", of_other_weights)
    with pytest.raises(DataError, match=r"the ONNX export's embeddings differ from PyTorch's by up to .* \(> 0.0001\) "
                                        r"on 8 of the run's photos; nothing written"):
        export_run(evaluated[0], tmp_path / "export")
    assert not (tmp_path / "export").exists()
