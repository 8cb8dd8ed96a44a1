"""Enrolment without retraining (lib.evaluate.enroll_cli, lib.evaluate.enrolled_store): photos added to a run's gallery
are found by prediction, refused when they duplicate or contradict the gallery, and taken out again."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, write_image

import lib.evaluate.enrolled_store
from lib.core.errors import DataError
from lib.core.device import auto_settings
from lib.evaluate.enroll_cli import enroll_photos, labelled_photos, main
from lib.evaluate.enrolled_store import Enrolled, enrolled_gallery, key_text, load_enrolled, save_enrolled
from lib.evaluate.photos import embed_photos
from lib.evaluate.predict import predict_photos
from lib.train.trained_run import load_trained


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

    monkeypatch.setattr(lib.evaluate.enrolled_store.np, "savez", killed)
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


CHILD = """
import sys, time
from pathlib import Path
import lib.evaluate.enroll_cli as enroll

real_embed, real_save = enroll.embed_photos, enroll.save_enrolled

def slow_embed(*args, **kwargs):
    time.sleep(2)  # both children embed at once: a read-modify-write without a lock loses one of them
    return real_embed(*args, **kwargs)

def slow_save(*args, **kwargs):
    time.sleep(1)  # long enough that the other child finds the lock held
    return real_save(*args, **kwargs)

enroll.embed_photos, enroll.save_enrolled = slow_embed, slow_save
Path(sys.argv[2]).touch()  # imported: ready
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
sys.exit(enroll.main(sys.argv[3:]))
"""


def test_two_enrolments_in_two_processes_both_land(run, tmp_path, capsys):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = []
    for label, n, seed in (("alpha", 3, 200), ("beta", 2, 300)):
        for i in range(n):
            write_image(tmp_path / label / f"{i}.jpg", seed=seed + i)
        children.append(subprocess.Popen(
            [sys.executable, str(script), str(go), str(tmp_path / f"{label}.ready"), str(run),
             str(tmp_path / label), "--label", label, "--device", "cpu"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    while not all((tmp_path / f"{label}.ready").exists() for label in ("alpha", "beta")):
        assert all(c.poll() is None for c in children), [c.communicate()[0] for c in children]
        time.sleep(0.05)
    go.touch()  # both start enrolling together
    said = [c.communicate(timeout=300)[0] for c in children]
    assert [c.returncode for c in children] == [0, 0], said
    assert "enrolled 3 photos" in said[0] and "enrolled 2 photos" in said[1]
    enrolled = load_enrolled(run)
    assert enrolled.table["label"].value_counts().to_dict() == {"alpha": 3, "beta": 2}
    assert sum(map(len, enrolled.stored.values())) == 5
    assert any("waiting for" in out and "photo-enroll of" in out for out in said), said  # queued, naming the holder
    assert main([str(run), "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(str((tmp_path / f).resolve()) in listed for f in ("alpha/0.jpg", "alpha/2.jpg", "beta/1.jpg"))


def test_a_torn_enrolment_file_is_named_with_what_to_do(run, tmp_path, capsys):
    first = write_image(tmp_path / "a.jpg", seed=31)
    enroll_photos(run, [str(first)], ["newcomer"], device="cpu")
    enroll_photos(run, [str(write_image(tmp_path / "b.jpg", seed=32))], ["newcomer"], device="cpu")
    path = run / "index" / "enrolled.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as a copy cut short
    said = rf"{path}: the enrolment file cannot be read .*mv {path}\.bak {path}.* remove it to drop every enrolment"
    with pytest.raises(DataError, match=said):
        predict_photos(run, [str(first)], k=3, device="cpu")
    assert main([str(run), str(tmp_path / "a.jpg"), "--label", "x", "--device", "cpu"]) == 1
    assert main([str(run), "--list"]) == 1
    assert main([str(run), "--remove", "abc"]) == 1
    err = capsys.readouterr().err
    assert err.count(f"error: {path}: the enrolment file cannot be read") == 3 and "Traceback" not in err
    os.replace(f"{path}.bak", path)  # the way out it names: the enrolment before the last change
    assert load_enrolled(run).table["path"].tolist() == [str(first.resolve())]


def count_embeddings(monkeypatch) -> list[str]:
    """The photo paths lib.evaluate.enrolled_store embeds (again) from now on."""
    seen = []
    real = lib.evaluate.enrolled_store.embed_photos

    def counting(run, paths, *args, **kwargs):
        seen.extend(paths)
        return real(run, paths, *args, **kwargs)

    monkeypatch.setattr(lib.evaluate.enrolled_store, "embed_photos", counting)
    return seen


def test_enrolled_photos_embedded_again_for_tta_are_stored_and_read_next_time(run, tmp_path, monkeypatch):
    photos = [str(write_image(tmp_path / "in" / f"{i}.jpg", seed=40 + i).resolve()) for i in range(2)]
    enroll_photos(run, photos, ["newcomer", "newcomer"], device="cpu")  # embedded without TTA
    query = shutil.copy(photos[0], tmp_path / "query.jpg")  # the same content, elsewhere
    seen = count_embeddings(monkeypatch)
    pred, paths, d0 = nearest(predict_photos(run, [query], k=3, device="cpu", tta=True))
    assert sorted(seen) == photos and pred == "newcomer" and paths[0] == photos[0] and d0 < 1e-5
    tta = embed_photos(load_trained(run), photos, auto_settings(device="cpu"), tta=True)
    rows, stored = enrolled_gallery(load_trained(run), auto_settings(device="cpu"), tta=True)
    assert rows["path"].tolist() == photos and len(seen) == 2, "the second call reads what the first stored"
    np.testing.assert_allclose(stored, tta, atol=1e-5)
    shutil.move(tmp_path / "in", tmp_path / "moved")  # not needed any more
    pred, paths, d0 = nearest(predict_photos(run, [query], k=3, device="cpu", tta=True))
    assert len(seen) == 2 and pred == "newcomer" and paths[0] == photos[0] and d0 < 1e-5


def test_an_enrolled_photo_gone_when_needed_again_is_named_once_and_left_out(run, tmp_path, capsys):
    gone = write_image(tmp_path / "in" / "gone.jpg", seed=50).resolve()
    stays = write_image(tmp_path / "in" / "stays.jpg", seed=51).resolve()
    enroll_photos(run, [str(gone)], ["leaver"], device="cpu")
    enroll_photos(run, [str(stays)], ["stayer"], device="cpu")
    entry = load_enrolled(run).table.iloc[0]
    shutil.move(gone, tmp_path / "elsewhere.jpg")
    capsys.readouterr()
    # TTA needs every enrolled photo embedded again; an IVF index looks at the gallery twice (its recall is measured)
    table = predict_photos(run, [str(tmp_path / "elsewhere.jpg"), str(stays)], k=3, device="cpu", tta=True,
                           index="ivf", nprobe=1)
    out = capsys.readouterr().out
    assert out.count(f"enrolled photo {gone} (id {entry['id']}) is gone or changed") == 1, out
    assert f"photo-enroll {run} --remove {entry['id']}" in out
    assert not table["neighbour_paths"].str.contains(str(gone)).any()
    assert json.loads(table["neighbour_paths"].iloc[1])[0] == str(stays) and table["pred"].iloc[1] == "stayer"


def test_a_photo_below_the_min_size_is_refused(run, tmp_path):
    tiny = write_image(tmp_path / "tiny.jpg", size=(1, 1))
    with pytest.raises(DataError, match=r"tiny\.jpg: too small: 1x1 < 224x224"):
        enroll_photos(run, [str(tiny)], ["newcomer"], device="cpu")
    assert not len(load_enrolled(run))


def test_a_label_in_another_unicode_form_is_the_same_individual(run, tmp_path):
    composed, decomposed = "Zo\u00e9", "Zoe\u0301"
    enroll_photos(run, [str(write_image(tmp_path / "1.jpg", seed=61))], [decomposed], device="cpu")
    enroll_photos(run, [str(write_image(tmp_path / "2.jpg", seed=62))], [composed], device="cpu")
    assert load_enrolled(run).table["label"].tolist() == [composed, composed]


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"path,label\nlion1/a.jpg,lion1\nlion2/b.jpg,lion2\n"],
                         ids=["binary", "csv"])
def test_a_photos_argument_that_is_no_image_and_no_list_is_named(run, tmp_path, content, capsys):
    source = tmp_path / "photos.dat"
    source.write_bytes(content)
    assert main([str(run), str(source), "--label", "x", "--device", "cpu"]) == 1
    assert f"error: {source}: not an image, and not a list of photos" in capsys.readouterr().err


def test_an_enrolment_file_of_the_previous_format_still_loads(tmp_path):
    rows = [{"id": "abc", "path": "/x.jpg", "label": "a", "group": "g", "sha256": "abc1", "enrolled_at": "t"}]
    (tmp_path / "index").mkdir()
    key = {"checkpoint_sha256": "c", "tta": False, "transform": "T"}
    np.savez(tmp_path / "index" / "enrolled.npz", table=json.dumps(rows), emb=np.full((1, 4), 0.5, np.float32),
             key=json.dumps(key))
    np.testing.assert_array_equal(load_enrolled(tmp_path).embeddings(key)["abc1"], np.full(4, 0.5))
