"""Enrolment without retraining (lib.evaluate.enroll, lib.evaluate.enrolled): photos added to a run's gallery are
found by prediction, refused when they duplicate or contradict the gallery, and taken out again."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_image

import lib.evaluate.enrolled
from lib.core.errors import DataError
from lib.evaluate.enroll import enroll_photos, labelled_photos, main
from lib.evaluate.enrolled import Enrolled, key_text, load_enrolled, save_enrolled
from lib.evaluate.predict import predict_photos


@pytest.fixture
def run(run_dir, tmp_path):
    return Path(shutil.copytree(run_dir, tmp_path / "run"))  # enrolment writes into the run


def nearest(table: pd.DataFrame) -> tuple[str, list[str], float]:
    row = table.iloc[0]
    return row["pred"], json.loads(row["neighbour_paths"]), json.loads(row["neighbour_distances"])[0]


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_enrol_then_predict_finds_it_and_after_removal_does_not(run, tmp_path, index, capsys):
    photo = write_image(tmp_path / "new" / "stranger.jpg", seed=123)
    assert main([str(run), str(photo), "--label", "newcomer", "--device", "cpu"]) == 0
    assert "enrolled 1 photos" in capsys.readouterr().out
    table = predict_photos(run, [str(photo)], k=3, device="cpu", index=index, nprobe=1)
    assert table.attrs["index"]["factory"].startswith("IVF" if index == "ivf" else "Flat")
    pred, paths, d0 = nearest(table)
    # the photo itself is in the gallery now: nearest, at distance 0 up to float32 rounding of unit vectors
    assert pred == "newcomer" and paths[0] == str(photo.resolve()) and d0 < 1e-5
    entry = load_enrolled(run).table.iloc[0]
    assert main([str(run), "--list"]) == 0
    listed = capsys.readouterr().out
    assert entry["id"] in listed and "newcomer" in listed and str(photo.resolve()) in listed
    assert main([str(run), "--remove", entry["id"][:6]]) == 0
    assert f"removed {entry['id']} (newcomer)" in capsys.readouterr().out
    pred, paths, _ = nearest(predict_photos(run, [str(photo)], k=3, device="cpu", index=index, nprobe=1))
    assert pred != "newcomer" and str(photo.resolve()) not in paths
    assert main([str(run), "--list"]) == 0 and "nothing enrolled" in capsys.readouterr().out


def test_duplicates_and_label_conflicts_are_refused_naming_the_file(run, demo, tmp_path, capsys):
    photo = write_image(tmp_path / "p" / "first.jpg", seed=5)
    enroll_photos(run, [str(photo)], ["newcomer"], device="cpu")
    copy = shutil.copy(photo, tmp_path / "p" / "copy.jpg")
    with pytest.raises(DataError, match=r"copy\.jpg: the same file as enrolled photo .*first\.jpg .*duplicate"):
        enroll_photos(run, [copy], ["newcomer"], device="cpu")
    with pytest.raises(DataError, match=r"copy\.jpg: .*first\.jpg .*labelled 'newcomer': label conflict"):
        enroll_photos(run, [copy], ["someone else"], device="cpu")
    train = pd.read_csv(demo[1] / "index.csv", dtype=str, keep_default_na=False).query("split == 'train'").iloc[0]
    known = shutil.copy(demo[0] / train["path"], tmp_path / "p" / "known.jpg")
    with pytest.raises(DataError, match=rf"known\.jpg: the same file as train photo .*{train['path']}, which is "
                                        rf"labelled '{train['label']}': label conflict"):
        enroll_photos(run, [known], ["newcomer"], device="cpu")
    other = write_image(tmp_path / "p" / "other.jpg", seed=6)
    with pytest.raises(DataError, match=r"other\.jpg: label ' Newcomer' differs only by case or spaces"):
        enroll_photos(run, [other], [" Newcomer"], device="cpu")
    twice = shutil.copy(other, tmp_path / "p" / "twice.jpg")
    broken = tmp_path / "p" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main([str(run), str(tmp_path / "p"), "--label", "b", "--device", "cpu"]) == 1
    said = capsys.readouterr().err
    assert "broken.jpg: " in said and "twice.jpg: the same file as " in said and "(in this enrolment)" in said
    assert load_enrolled(run).table["path"].tolist() == [str(photo.resolve())], "a refused enrolment writes nothing"
    assert len(enroll_photos(run, [str(other)], ["newcomer"], device="cpu")) == 1  # a new encounter of a known one
    assert sum(map(len, load_enrolled(run).stored.values())) == 2


def test_photos_are_labelled_by_their_folder_without_a_label(tmp_path):
    for name in ("ann/1.jpg", "ann/more/2.jpg", "bob/3.jpg"):
        write_image(tmp_path / "in" / name, size=(32, 32))
    photos, labels = labelled_photos(tmp_path / "in")
    assert [Path(p).name for p in photos] == ["1.jpg", "2.jpg", "3.jpg"] and labels == ["ann", "ann", "bob"]
    assert labelled_photos(tmp_path / "in" / "bob" / "3.jpg", "zed")[1] == ["zed"]
    write_image(tmp_path / "in" / "loose.jpg", size=(32, 32))
    with pytest.raises(DataError, match=r"loose\.jpg: not in a label folder"):
        labelled_photos(tmp_path / "in")
    with pytest.raises(DataError, match="must be a folder"):
        labelled_photos(tmp_path / "in" / "loose.jpg")


def test_a_failed_write_leaves_the_previous_enrolment(tmp_path, monkeypatch):
    table = pd.DataFrame({"id": ["abc"], "path": ["/x.jpg"], "label": ["a"], "group": ["g"], "sha256": ["abc1"],
                          "enrolled_at": ["t"]})
    before = Enrolled(table, {key_text({"tta": False}): {"abc1": np.ones(4, np.float32)}})
    save_enrolled(tmp_path, before)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process died while writing

    monkeypatch.setattr(lib.evaluate.enrolled.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        save_enrolled(tmp_path, Enrolled(table.iloc[:0]))
    after = load_enrolled(tmp_path)
    pd.testing.assert_frame_equal(after.table, table)
    np.testing.assert_array_equal(after.embeddings({"tta": False})["abc1"], np.ones(4))


def test_the_command_refuses_a_folder_that_is_not_a_run_and_wants_one_action(tmp_path, capsys):
    assert main([str(tmp_path), "--list"]) == 1
    assert f"{tmp_path}: not a trained run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path), "--list"])
    assert "give PHOTOS, --list or --remove" in capsys.readouterr().err
