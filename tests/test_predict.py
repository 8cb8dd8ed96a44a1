import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import write_image

from lib.core.errors import DataError
from lib.data.splits import prepare_splits
from lib.evaluate.calibrate import Calibration, calibrate, thresholds_info
from lib.evaluate.photos import list_photos
from lib.evaluate.predict import THRESHOLDS_FILE, predict_photos
from lib.evaluate.run_eval import evaluate_run
from lib.retrieval.decide import Thresholds, save_thresholds
from lib.train.trained_run import trained_min_size

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = Path(sys.executable).with_name("photo-predict")  # installed by `pip install -e .` (make setup)


def predict_cli(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    """The command line as a user runs it: the photo-predict console script, or `python -m` with module=True."""
    assert CONSOLE.exists(), f"{CONSOLE} missing: install the project with `pip install --no-deps -e .` (make setup)"
    cmd = [sys.executable, "-m", "lib.evaluate.predict_cli"] if module else [str(CONSOLE)]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, encoding="utf-8", errors="backslashreplace")


def test_predictions_equal_the_evaluation_of_the_same_photos(run_dir, demo):
    ev = evaluate_run(run_dir, k=7, weighting="uniform", device="cpu")
    photos = [str(demo[0] / p) for p in ev.queries["path"]]
    table = predict_photos(run_dir, photos, k=7, weighting="uniform", device="cpu")
    assert table["pred"].tolist() == ev.queries["pred"].tolist()
    np.testing.assert_allclose(table["score"], ev.queries["score"], atol=1e-5)
    labels = table["neighbour_labels"].map(json.loads)
    assert labels.map(len).eq(7).all()
    assert labels.tolist() == ev.gallery["label"].to_numpy()[ev.neighbours].tolist()
    assert (table["error"] == "").all() and (table["verdict"] == "").all()  # no thresholds saved yet


def test_cli_reports_bad_photos_and_keeps_an_existing_output(run_dir, demo, tmp_path):
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))  # thresholds are saved into it below
    photos = tmp_path / "new"
    for i, src in enumerate(sorted((demo[0] / "checks").glob("*.jpg"))[:3]):
        (photos / f"sub{i}").mkdir(parents=True)
        shutil.copy(src, photos / f"sub{i}" / f"p{i}.jpg")
    write_image(photos / "no_extension", size=(40, 40), fmt="PNG")  # an image by content
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not a photo")
    os.symlink(tmp_path / "moved_away.jpg", photos / "link.jpg")
    shutil.copy(photos / "sub0" / "p0.jpg", os.fsdecode(os.fsencode(photos) + b"/caf\xe9.jpg"))  # not UTF-8
    assert sorted(p.split("/")[-1][:3] for p in list_photos(photos)) == ["bro", "caf", "lin", "no_", "p0.", "p1.",
                                                                        "p2."]
    out = tmp_path / "pred.csv"
    done = predict_cli(str(run_dir), str(photos), "--out", str(out), "--k", "5", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "7 photos -> " in done.stdout and "2 could not be read" in done.stdout
    assert "1 below the run's min_size" in done.stdout
    table = pd.read_csv(out, keep_default_na=False)
    small = table["path"].str.endswith("no_extension")
    floor = min(min(int(w), int(h)) for w, h in pd.read_csv(demo[1] / "index.csv").query("split == 'train'")
                [["width", "height"]].to_numpy())  # the demo's splits predate a recorded min_size
    assert table.loc[small, "note"].iloc[0] == f"40x40: below the run's min_size {floor}, smaller than any training photo"
    assert table.loc[small, "pred"].iloc[0] != "" and (table.loc[~small, "note"] == "").all()
    bad = table[table["path"].str.endswith("broken.jpg")]
    assert len(table) == 7 and len(bad) == 1 and "corrupt" in bad["error"].iloc[0] and bad["pred"].iloc[0] == ""
    assert "cannot read" in table.loc[table["path"].str.endswith("link.jpg"), "error"].iloc[0]
    good = table[table["error"] == ""]
    assert len(good) == 5 and good["pred"].ne("").all() and good["path"].str.contains("/caf").any()
    assert good["neighbour_paths"].map(json.loads).map(len).eq(5).all()

    refused = predict_cli(str(run_dir), str(photos / "no_extension"), "--out", str(tmp_path / "small.csv"),
                          "--refuse-small", "--device", "cpu")
    assert refused.returncode == 0, refused.stderr
    small_row = pd.read_csv(tmp_path / "small.csv", keep_default_na=False).iloc[0]
    assert small_row["error"].startswith("too small: 40x40 < the run's min_size") and small_row["pred"] == ""

    before = out.read_text()
    refused = predict_cli(str(run_dir), str(photos), "--out", str(out), module=True)
    assert refused.returncode == 2
    assert out.read_text() == before and "--overwrite" in refused.stderr

    save_thresholds(run_dir / "eval" / "val" / "thresholds.json", Thresholds(max_distance=-1.0, min_margin=0.0),
                    {"k": 5, "weighting": "inverse"})
    listing = tmp_path / "list.txt"
    listing.write_text("# photos\nnew/sub0/p0.jpg\n\nnew/missing.jpg\n")
    done = predict_cli(str(run_dir), str(listing), "--out", str(out), "--overwrite", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert table["verdict"].tolist() == ["unclassifiable", ""]  # max_distance < 0: nothing is close enough
    assert "cannot read file" in table["error"].iloc[1]


def test_the_min_size_a_run_trained_with_comes_from_its_split_report(demo, tmp_path):
    data, splits = demo
    index = pd.read_csv(splits / "index.csv", keep_default_na=False, dtype={"group": str})
    run = SimpleNamespace(settings=SimpleNamespace(data=SimpleNamespace(splits_dir=str(tmp_path / "recorded"))))
    prepare_splits(index.drop(columns="split"), tmp_path / "recorded", min_size=123)
    assert trained_min_size(run) == 123
    run.settings.data.splits_dir = str(tmp_path / "gone")
    assert trained_min_size(run) is None


def test_thresholds_chosen_under_other_settings_are_refused_and_a_stale_gallery_index_rebuilt(run_dir, demo, tmp_path,
                                                                                               capsys):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    ev = evaluate_run(run, k=5, device="cpu")  # saves the gallery index
    settings = Calibration(min_support=1)
    thresholds, chosen = calibrate(ev, settings)
    save_thresholds(run / THRESHOLDS_FILE, thresholds, thresholds_info(ev, chosen, settings))
    photo = [str(demo[0] / ev.queries["path"].iloc[0])]
    assert predict_photos(run, photo, device="cpu")["verdict"].iloc[0] != ""  # k=5 as chosen: it all fits
    with pytest.raises(DataError, match="thresholds.json does not fit .*tta: chosen with False, used with True"):
        predict_photos(run, photo, device="cpu", tta=True)
    with pytest.warns(UserWarning, match="applied although k: chosen with 5, used with 3"):
        assert predict_photos(run, photo, device="cpu", k=3, allow_mismatch=True)["verdict"].iloc[0] != ""
    meta = json.loads((run / "index" / "index.json").read_text())
    (run / "index" / "index.json").write_text(json.dumps({**meta, "data_fingerprint": "of photos since changed"}))
    capsys.readouterr()
    predict_photos(run, photo, device="cpu")
    said = capsys.readouterr().out
    assert f"rebuilding the gallery index in {run / 'index'}: a gallery photo changed on disk" in said
    assert json.loads((run / "index" / "index.json").read_text())["data_fingerprint"] == meta["data_fingerprint"]
