"""New individuals grouped and enrolled in one step: photo-predict --group-new (lib.evaluate.new_groups), then
photo-enroll --from-predictions (lib.evaluate.enrol_clusters), then predict again."""
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.core.errors import DataError
from lib.evaluate.cluster_eval import CLUSTER_FILE, save_cluster_choice
from lib.evaluate.enroll_cli import main as enroll_main
from lib.evaluate.enrolled_store import load_enrolled
from lib.evaluate.predict import THRESHOLDS_FILE
from lib.evaluate.predict_cli import main as predict_main
from lib.retrieval.clustering import DEFAULT_THRESHOLD
from lib.retrieval.decide import Thresholds, save_thresholds


@pytest.fixture
def run(run_dir, tmp_path):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))  # thresholds, clustering.json and enrolment go into it
    # every photo not already in the gallery is called new: nothing lies within this distance of a train photo
    save_thresholds(run / THRESHOLDS_FILE, Thresholds(max_distance=1e-4, min_margin=0.0), {"k": 3})
    return run


@pytest.fixture
def season(demo, tmp_path) -> Path:
    """Two new individuals, two photos each (a val photo and its pixels again as PNG: other file, same picture), and
    one more photo of a third; none of them in the train gallery."""
    index = pd.read_csv(demo[1] / "index.csv", dtype=str, keep_default_na=False)
    val = index[index["split"] == "val"].drop_duplicates("label").head(3)
    folder = tmp_path / "season"
    folder.mkdir()
    for i, path in enumerate(val["path"]):
        shutil.copy(demo[0] / path, folder / f"ind{i}.jpg")
        if i < 2:
            Image.open(demo[0] / path).convert("RGB").save(folder / f"ind{i}_again.png")
    return folder


def predict(run, photos, out, *extra) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thresholds saved without provenance: said, not refused
        assert predict_main([str(run), str(photos), "--out", str(out), "--device", "cpu", "--k", "3", "--overwrite",
                             *extra]) == 0
    return pd.read_csv(out, keep_default_na=False)


def test_predict_group_enrol_predict_round_trip(run, season, tmp_path, capsys):
    out = tmp_path / "p.csv"
    table = predict(run, season, out, "--group-new", "--cluster-threshold", "1e-4")
    assert (table["verdict"] == "unclassifiable").all()
    by_photo = table.assign(name=table["path"].map(lambda p: Path(p).stem.removesuffix("_again")))
    clusters = by_photo.groupby("name")["new_cluster"].agg(set)
    assert clusters.map(len).eq(1).all() and len(set().union(*clusters)) == 3, "a picture and its copy together"
    sizes = by_photo.set_index("name")["new_cluster_size"]
    assert sizes.loc["ind0"].tolist() == [2, 2] and sizes.loc["ind2"] == 1
    pair = by_photo[by_photo["name"] == "ind1"]
    assert pair["new_cluster_tightness"].astype(float).gt(0.999).all()
    assert by_photo.loc[by_photo["name"] == "ind2", "new_cluster_tightness"].iloc[0] == ""  # alone: no pairs
    wanted = int(pair["new_cluster"].iloc[0])
    assert enroll_main([str(run), "--from-predictions", str(out), "--cluster", str(wanted), "--label", "kibo",
                        "--device", "cpu"]) == 0
    assert "enrolled 2 photos" in capsys.readouterr().out
    assert sorted(load_enrolled(run).table["path"]) == sorted(str(Path(p).resolve()) for p in pair["path"])
    again = predict(run, season, tmp_path / "again.csv", "--group-new", "--cluster-threshold", "1e-4")
    kibo = again["path"].isin(pair["path"])
    assert (again.loc[kibo, "pred"] == "kibo").all() and (again.loc[kibo, "verdict"] == "accepted").all()
    assert (again.loc[kibo, "new_cluster"] == -1).all(), "a known individual is no longer grouped as new"
    assert (again.loc[~kibo, "new_cluster"] >= 0).all()


def test_all_clusters_get_free_generated_names_and_can_be_renamed(run, season, tmp_path, capsys):
    out = tmp_path / "p.csv"
    table = predict(run, season, out, "--group-new", "--cluster-threshold", "1e-4")
    assert enroll_main([str(run), "--from-predictions", str(out), "--all-clusters", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "enrolled 5 photos" in said and "--rename new_001 NAME" in said
    enrolled = load_enrolled(run).table
    assert sorted(enrolled["label"].unique()) == ["new_001", "new_002", "new_003"]
    name_of = dict(zip(enrolled["path"], enrolled["label"]))
    for _, members in table.groupby("new_cluster"):
        assert len({name_of[str(Path(p).resolve())] for p in members["path"]}) == 1
    assert enroll_main([str(run), "--rename", "new_002", "Kibo"]) == 0
    assert "renamed " in capsys.readouterr().out
    assert sorted(load_enrolled(run).table["label"].unique()) == ["Kibo", "new_001", "new_003"]
    assert enroll_main([str(run), "--rename", "new_003", "kibo "]) == 1
    assert "differs only by case or spaces from the known 'Kibo'" in capsys.readouterr().err


def test_the_saved_threshold_is_used_checked_and_a_missing_one_falls_back(run, season, tmp_path, capsys):
    out = tmp_path / "p.csv"
    predict(run, season, out, "--group-new")
    assert f"default cosine distance {DEFAULT_THRESHOLD}" in capsys.readouterr().out
    chosen = {"threshold": 1e-4, "method": "agglomerative", "linkage": "average", "min_cluster_size": 2,
              "chosen_on": {"split": "val", "n_photos": 40}}
    from lib.train.trained_run import load_trained
    sha = load_trained(run).checkpoint_sha256
    save_cluster_choice(run / CLUSTER_FILE, chosen, {"checkpoint_sha256": sha, "tta": False})
    table = predict(run, season, out, "--group-new")
    assert "cluster threshold 0.0001 (agglomerative, average linkage)" in capsys.readouterr().out
    assert table["new_cluster"].nunique() == 3
    save_cluster_choice(run / CLUSTER_FILE, chosen, {"checkpoint_sha256": "another", "tta": False})
    assert predict_main([str(run), str(season), "--out", str(out), "--device", "cpu", "--k", "3", "--overwrite",
                         "--group-new"]) == 1
    assert "clustering.json does not fit" in capsys.readouterr().err


def test_enrolling_from_a_csv_without_clusters_is_a_clear_error(run, season, tmp_path, capsys):
    out = tmp_path / "p.csv"
    predict(run, season, out)
    assert enroll_main([str(run), "--from-predictions", str(out), "--cluster", "0", "--label", "x"]) == 1
    assert "no new_cluster column; make it with photo-predict ... --group-new" in capsys.readouterr().err
    grouped = tmp_path / "g.csv"
    predict(run, season, grouped, "--group-new", "--cluster-threshold", "1e-4")
    assert enroll_main([str(run), "--from-predictions", str(grouped), "--cluster", "7", "--label", "x"]) == 1
    assert "no cluster 7 (clusters: 0, 1, 2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        enroll_main([str(run), "--from-predictions", str(grouped)])
    assert load_enrolled(run).table.empty
