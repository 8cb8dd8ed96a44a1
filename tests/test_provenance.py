"""What a run folder checks before it trusts what it holds: the split assignment a checkpoint trained on, the hash of
the checkpoint bytes actually loaded, a saved index that serves without the training photos, the enrolment the
thresholds were calibrated with, and resize-cache copies checked against their sources."""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_image

import lib.train.trained_run
from lib.core.device import auto_settings
from lib.core.errors import DataError
from lib.data.dataset import IndexDataset
from lib.data.images import open_image
from lib.data.resize_cache import build_cache
from lib.data.splits import SplitConfig, load_split_index, prepare_splits, read_splits
from lib.data.transforms import build_transforms
from lib.evaluate.calibrate import Calibration, calibrate, thresholds_info
from lib.evaluate.enroll_cli import enroll_photos
from lib.evaluate.enrolled_store import COLUMNS, Enrolled, embedding_key, save_enrolled
from lib.evaluate.gallery_index import gallery_index
from lib.evaluate.photos import embed_photos
from lib.evaluate.predict import THRESHOLDS_FILE, predict_photos
from lib.evaluate.predict_cli import main as predict_main
from lib.evaluate.run_eval import evaluate_run
from lib.retrieval.decide import save_thresholds
from lib.retrieval.embed import files_fingerprint
from lib.train.checkpoint import load_checkpoint, save_checkpoint
from lib.train.trained_run import load_trained, rows_in_split, split_rows


def moved_run(run_dir: Path, dest: Path, **data) -> Path:
    """A copy of a trained run whose checkpoint names other data folders (data_dir=..., splits_dir=...)."""
    dest.mkdir(parents=True)
    ckpt = load_checkpoint(run_dir / "best_model.pt")
    ckpt["config"]["data"].update({k: str(v) for k, v in data.items()})
    save_checkpoint(dest / "best_model.pt", ckpt)
    return dest


def resplit(splits: Path, seed: int) -> str:
    """The split in `splits` made again from its own index with another seed (fresh=True); its split fingerprint."""
    index = pd.read_csv(splits / "index.csv", keep_default_na=False, dtype={"path": str, "label": str, "group": str})
    while any(splits.glob(f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")):  # backups are named by the second
        time.sleep(0.1)
    return prepare_splits(index.drop(columns="split"), splits, SplitConfig(seed=seed), fresh=True).report[
        "split_fingerprint"]


def test_a_resplit_is_refused_by_evaluation_and_predict_and_the_same_split_again_is_accepted(run_dir, demo, tmp_path,
                                                                                            capsys):
    splits = Path(shutil.copytree(demo[1], tmp_path / "splits"))
    run = moved_run(run_dir, tmp_path / "run", splits_dir=splits)
    trained = load_trained(run).config["split_fingerprint"]
    assert trained == read_splits(splits).report["split_fingerprint"]
    photo = [str(demo[0] / rows_in_split(split_rows(load_trained(run)), "val")["path"].iloc[0])]

    other = resplit(splits, seed=43)
    assert other != trained
    moved = load_split_index(splits)[0].merge(load_split_index(next(splits.glob("replaced-*")))[0], on="path")
    assert (moved["split_x"] != moved["split_y"]).any(), "seed 43 places some photos elsewhere on the demo"
    fix = f"{trained[:12]} at training, {other[:12]} now.*Retrain on the new split.*replaced-"
    with pytest.raises(DataError, match=fix):
        evaluate_run(run, device="cpu")
    with pytest.raises(DataError, match=fix):
        predict_photos(run, photo, device="cpu")

    assert resplit(splits, seed=42) == trained  # notebook 01 again with the run's seed: no false alarm
    assert evaluate_run(run, device="cpu").metrics["recall@1"] >= 0
    capsys.readouterr()
    legacy = load_checkpoint(run / "best_model.pt")
    del legacy["config"]["split_fingerprint"]
    save_checkpoint(run / "legacy.pt", legacy)
    resplit(splits, seed=43)
    assert len(split_rows(load_trained(run, "legacy.pt")))  # cannot be checked: accepted, said in one line
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "legacy.pt predates recorded split assignments" in said


def test_the_checkpoint_hash_names_the_bytes_whose_weights_were_loaded(run_dir, tmp_path, monkeypatch):
    run = Path(shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("embeddings", "index")))
    path = run / "best_model.pt"
    loaded_bytes = path.read_bytes()
    other = load_checkpoint(path)
    other["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["model"].items()}
    save_checkpoint(tmp_path / "other.pt", other)
    real = lib.train.trained_run.load_checkpoint

    def training_replaces_it_right_after(*args, **kwargs):  # a training run saving its new best meanwhile
        ckpt = real(*args, **kwargs)
        os.replace(tmp_path / "other.pt", path)
        return ckpt

    monkeypatch.setattr(lib.train.trained_run, "load_checkpoint", training_replaces_it_right_after)
    loaded = load_trained(run)
    assert loaded.checkpoint_sha256 == hashlib.sha256(loaded_bytes).hexdigest()
    assert hashlib.sha256(path.read_bytes()).hexdigest() != loaded.checkpoint_sha256  # the file is the other one now
    first = next(iter(other["model"]))
    torch.testing.assert_close(loaded.model.state_dict()[first], other["model"][first] - 1)


def test_predict_from_the_run_folder_alone_when_the_training_photos_are_moved_away(run_dir, demo, tmp_path, capsys):
    data = Path(shutil.copytree(demo[0], tmp_path / "data"))
    run = moved_run(run_dir, tmp_path / "run", data_dir=data)
    ev = evaluate_run(run, k=5, device="cpu")  # saves the gallery index
    photos = [str(demo[0] / p) for p in ev.queries["path"][:6]]
    before = predict_photos(run, photos, k=5, device="cpu")
    os.rename(data, tmp_path / "elsewhere")
    capsys.readouterr()
    after = predict_photos(run, photos, k=5, device="cpu")
    pd.testing.assert_frame_equal(after, before)
    said = capsys.readouterr().out
    assert f"{len(ev.gallery)} training photos are not on disk (first: {data / ev.gallery['path'].iloc[0]}); " \
           "predicting from the saved index" in said
    with pytest.raises(DataError, match=f"must be built .*TTA.* are not on disk \\(first: {data}/"):
        predict_photos(run, photos, k=5, device="cpu", tta=True)  # a rebuild needs them: named, no traceback


def _calibrated_copy(run_dir: Path, dest: Path) -> Path:
    run = Path(shutil.copytree(run_dir, dest))
    ev = evaluate_run(run, k=5, device="cpu")
    settings = Calibration(min_support=1)
    thresholds, chosen = calibrate(ev, settings)
    save_thresholds(run / THRESHOLDS_FILE, thresholds, thresholds_info(ev, chosen, settings))
    return run


def test_thresholds_record_the_enrolment_and_predict_says_when_the_gallery_grew(run_dir, demo, tmp_path, capsys):
    run = _calibrated_copy(run_dir, tmp_path / "run")
    recorded = json.loads((run / THRESHOLDS_FILE).read_text())["enrolment"]
    assert recorded["n_enrolled"] == 0
    photo = [str(demo[0] / pd.read_csv(demo[1] / "index.csv").query("split == 'val'")["path"].iloc[0])]
    predict_photos(run, photo, device="cpu")  # the gallery it was calibrated on: nothing to say
    new = [str(write_image(tmp_path / "new" / f"{i}.jpg", seed=50 + i)) for i in range(2)]
    enroll_photos(run, new, ["newcomer"] * 2, device="cpu")
    with pytest.warns(UserWarning, match="the gallery grew since .*thresholds.json was calibrated: 0 enrolled "
                                         "photos then, 2 now"):
        assert predict_photos(run, photo, device="cpu")["verdict"].iloc[0] != ""
    with pytest.raises(DataError, match="0 enrolled photos then, 2 now; choose the thresholds again"):
        predict_photos(run, photo, device="cpu", strict_thresholds=True)
    capsys.readouterr()
    assert predict_main([str(run), photo[0], "--out", str(tmp_path / "p.csv"), "--device", "cpu",
                         "--strict-thresholds"]) == 1
    assert "2 now" in capsys.readouterr().err and not (tmp_path / "p.csv").exists()
    info = gallery_index(load_trained(run), auto_settings(device="cpu")).info
    assert info["n_enrolled"] == 2 and info["enrolment"]["n_enrolled"] == 2 and info["enrolment"] != recorded


def test_a_photo_enrolled_and_later_in_the_training_gallery_counts_once(run_dir, demo, tmp_path, capsys):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    trained = load_trained(run)
    train = rows_in_split(split_rows(trained), "train")
    same_path = str((demo[0] / train["path"].iloc[0]).resolve())
    same_content = str(shutil.copy(demo[0] / train["path"].iloc[1], tmp_path / "copied.jpg"))
    new = str(write_image(tmp_path / "new.jpg", seed=7))
    photos = [same_path, same_content, new]
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in photos]
    table = pd.DataFrame({"id": [d[:12] for d in digests], "path": photos, "label": ["a", "b", "newcomer"],
                          "group": "enrolled:x", "sha256": digests, "enrolled_at": "now"})[list(COLUMNS)]
    settings = auto_settings(device="cpu")
    save_enrolled(run, Enrolled().added(table, embedding_key(trained, False), embed_photos(trained, photos, settings)))
    capsys.readouterr()
    found = gallery_index(trained, settings)
    assert found.index.ntotal == len(train) + 1 == len(found.metadata)
    assert found.metadata["path"].tolist()[-1] == new and found.info["n_enrolled"] == 1
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "2 enrolled photo(s) are also in the train split" in said


def test_a_replaced_source_photo_is_read_instead_of_its_stale_cache_copy(tmp_path):
    rels = [f"{i}.jpg" for i in range(3)]
    for i, rel in enumerate(rels):
        write_image(tmp_path / "data" / rel, size=(60, 40), seed=i)
    build_cache(tmp_path / "data", rels, tmp_path / "cache", size=32, workers=1)
    rows = pd.DataFrame({"path": rels, "label": "a"})
    _, tf = build_transforms(32, (0.5,) * 3, (0.25,) * 3, preset="none")

    def dataset():
        return IndexDataset(rows, tmp_path / "data", tf, {"a": 0}, tmp_path / "cache")

    cached = dataset()
    assert all(str(p).startswith(str(tmp_path / "cache")) for p in cached.paths)
    write_image(tmp_path / "data" / "1.jpg", size=(50, 44), seed=99)  # same name, another photo
    now = dataset()
    assert now.paths[1] == tmp_path / "data" / "1.jpg" and now.paths[0] == cached.paths[0]
    torch.testing.assert_close(now[1][0], tf(open_image(tmp_path / "data" / "1.jpg")))
    assert not np.allclose(now[1][0].numpy(), cached[1][0].numpy())
    assert files_fingerprint(now.paths) != files_fingerprint(cached.paths)
    build_cache(tmp_path / "data", rels, tmp_path / "cache", size=32, workers=1)  # brought up to date: used again
    assert dataset().paths[1] == tmp_path / "cache" / "1.jpg"
