"""`make run DATA=...` (notebooks/run_photos.py): a user's photos through notebooks 01-05 into runs/<name>, resumable,
never into the demo's runs; the demo runner refuses other photos."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_image

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "notebooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_photos = _load("run_photos")
run_all = _load("run_all")

# the demo's tiny recipe, so a test trains in seconds; the runner itself adds nothing of the demo's
TINY = {"backbone": "resnet10t", "pretrained": "", "embed_dim": 16, "img_size": 32, "epochs": 1, "head_epochs": 0,
        "unfreeze": "all", "lr_decay": 1.0, "batches_per_epoch": 2, "p": 6, "images_per_class": 4, "neighbours": 4,
        "num_workers": 0, "device": "cpu", "embedding_maps": [], "upload": False, "near_duplicate_distance": 0}


def test_names_and_parameters_come_from_the_folder_or_the_csv(tmp_path):
    folder = tmp_path / "plants"
    folder.mkdir()
    csv = folder / "metadata.csv"
    csv.write_text("path,label\n")
    assert run_photos.run_name(folder) == run_photos.run_name(csv) == "plants"
    p = run_photos.pipeline_parameters(csv, "x", tmp_path)
    assert (p["data_dir"], p["metadata_csv"]) == (str(folder), str(csv))
    assert p["run_dir"] == str(tmp_path / "runs" / "x") and p["splits_dir"] == str(tmp_path / "splits" / "x")
    p = run_photos.pipeline_parameters(folder, "x", tmp_path)
    assert (p["data_dir"], p["metadata_csv"]) == (str(folder), "")


@pytest.mark.parametrize("name", ["demo", "demo-open"])
def test_the_demo_runs_are_never_written(tmp_path, name, capsys):
    data = tmp_path / name
    write_image(data / "a" / "1_1.jpg")
    assert run_photos.main([str(data)]) == 2
    assert "belongs to the demo pipeline" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_demo_runner_refuses_other_photos_and_points_to_make_run(capsys):
    assert run_all.main(["-p", "data_dir", "data/plants"]) == 2
    assert "make run DATA=" in capsys.readouterr().err


def test_every_photo_excluded_stops_after_notebook_01_with_one_message(tmp_path, capsys):
    data = tmp_path / "small"
    for i in range(4):
        write_image(data / f"c{i % 2}" / f"{i}_1.jpg", size=(40, 30), seed=i)
    with pytest.raises(run_photos.DataError, match=r"01_split stopped: DataError: every image group .* min_size"):
        run_photos.run(data, "small", {}, root=tmp_path)
    executed = sorted(p.name for p in (tmp_path / "runs" / "small" / "notebooks").glob("*.ipynb"))
    assert executed == ["01_split.ipynb"]


def test_a_folder_to_an_evaluated_run_and_a_second_call_carries_on(demo, tmp_path, capsys):
    data_src, _ = demo
    data = tmp_path / "photos"
    shutil.copytree(data_src, data)
    run_dir = run_photos.run(data, "photos", TINY, root=tmp_path)
    assert (run_dir / "best_model.pt").is_file() and (run_dir / "eval" / "val" / "metrics.json").is_file()
    assert sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb")) == [
        "01_split.ipynb", "02_train.ipynb", "03_evaluate.ipynb", "04_confusion_analysis.ipynb",
        "05_retrieval_gallery.ipynb"]
    assert any((run_dir / "figures").glob("*.png")) and (tmp_path / "splits" / "photos" / "train_ids.json").is_file()
    assert not (tmp_path / "runs" / "demo").exists()
    out = capsys.readouterr().out
    assert "[2/5] 02_train: running" in out and "so far" in out
    progress = json.loads((run_dir / "notebooks" / "progress.json").read_text())
    assert sorted(progress) == ["01_split", "02_train", "03_evaluate", "04_confusion_analysis",
                                "05_retrieval_gallery"]

    # the same call again: everything finished with these parameters, nothing runs
    run_photos.run(data, "photos", TINY, root=tmp_path)
    assert capsys.readouterr().out.count("skipped") == 5
    # a notebook's parameter changed: it and every later one run again, the earlier ones are kept
    run_photos.run(data, "photos", {**TINY, "shown": 3}, root=tmp_path)
    out = capsys.readouterr().out
    assert out.count("skipped") == 3 and "[4/5] 04_confusion_analysis: running" in out
