from pathlib import Path

import pytest
from conftest import write_image

from lib.core.errors import DataError
from lib.data.table import check_images, index_from_csv, index_from_folder


def make_folder(root: Path) -> Path:
    write_image(root / "cacti" / "c01_1.jpg", seed=1)
    write_image(root / "cacti" / "c01_2.jpg", seed=2)
    write_image(root / "cacti" / "c02_1.png", fmt="JPEG", seed=3)      # JPEG bytes, .png name
    write_image(root / "ferns" / "f01_1.jpg", seed=4)
    write_image(root / "ferns" / "nested" / "f02_1.jpg", seed=5)
    write_image(root / "ferns" / "lonely.jpg", seed=6)                # no underscore
    write_image(root / "ferns" / "f03_1.dat", seed=7)                 # image by content, odd extension
    (root / "ferns" / "notes.txt").write_text("field notes")
    (root / "ferns" / ".DS_Store").write_bytes(b"\0\1")
    (root / "empty_class").mkdir()
    return root


def test_folder_reader_reads_layout_and_reports_problems(tmp_path):
    index, problems = index_from_folder(make_folder(tmp_path / "data"))
    assert sorted(index["path"]) == sorted(["cacti/c01_1.jpg", "cacti/c01_2.jpg", "cacti/c02_1.png", "ferns/f01_1.jpg",
                                            "ferns/nested/f02_1.jpg", "ferns/lonely.jpg", "ferns/f03_1.dat"])
    row = index.set_index("path").loc["cacti/c01_2.jpg"]
    assert (row["label"], row["group"], row["seq"]) == ("cacti", "c01", "2")
    assert index.set_index("path").loc["ferns/lonely.jpg", "group"] == "lonely"
    by_path = problems.set_index("path")
    assert "not an image" in by_path.loc["ferns/notes.txt", "problem"]
    assert "no '_'" in by_path.loc["ferns/lonely.jpg", "problem"]
    assert "no images" in by_path.loc["empty_class/", "problem"]
    assert not any(".DS_Store" in p for p in problems["path"])


def test_folder_reader_skips_broken_links_and_undecodable_names_saying_so(tmp_path):
    import os
    root = tmp_path / "data"
    write_image(root / "oaks" / "o01_1.jpg")
    os.symlink(tmp_path / "gone.jpg", root / "oaks" / "o02_1.jpg")
    write_image(Path(os.fsdecode(os.fsencode(root / "oaks") + b"/caf\xe9_1.jpg")))  # Latin-1 name from an old camera
    index, problems = index_from_folder(root)
    assert index["path"].tolist() == ["oaks/o01_1.jpg"]
    assert problems.set_index("path").loc["oaks/o02_1.jpg", "problem"] == "link to a missing file"
    assert problems["path"].str.contains("caf").any() and problems["problem"].str.contains("UTF-8").any()
    problems.to_csv(tmp_path / "problems.csv")  # the report itself must be writable


def test_folder_reader_refuses_an_id_under_two_classes(tmp_path):
    write_image(tmp_path / "a" / "IMG_0001.jpg")
    write_image(tmp_path / "b" / "IMG_0002.jpg")
    with pytest.raises(DataError, match="ID 'IMG'.*group_by='file'"):
        index_from_folder(tmp_path)
    index, _ = index_from_folder(tmp_path, group_by="file")
    assert index["group"].nunique() == 2


@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (root / "a").mkdir(parents=True), "no images"),
])
def test_folder_reader_errors_name_the_folder(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message) as err:
        index_from_folder(root)
    assert str(root) in str(err.value)


def make_csv(tmp_path: Path, rows: str) -> Path:
    for i, name in enumerate(["x1.jpg", "x2.jpg", "y1.jpg"]):
        write_image(tmp_path / "img" / name, seed=i)
    csv = tmp_path / "meta.csv"
    csv.write_text("file,animal,encounter,site,fold,label,viewpoint\n" + rows)
    return csv


def test_csv_reader_maps_named_columns_and_keeps_extras(tmp_path):
    csv = make_csv(tmp_path, "img/x1.jpg,leo,e1,s1,train,cat,left\nimg/x2.jpg,leo,e1,s1,train,cat,right\n"
                             "img/y1.jpg,zara,e2,s2,test,cat,left\n")
    index, problems = index_from_csv(csv, path_col="file", label_col="animal", group_col="encounter",
                                     context_col="site", split_col="fold")
    assert list(index["label"]) == ["leo", "leo", "zara"]
    assert list(index["group"]) == ["e1", "e1", "e2"]
    assert list(index["context"]) == ["s1", "s1", "s2"]
    assert list(index["given_split"]) == ["train", "train", "test"]
    assert list(index["label_csv"]) == ["cat"] * 3        # the CSV's own 'label' column is not lost
    assert "viewpoint" in index.columns and problems.empty


def test_csv_reader_messages_name_column_and_line(tmp_path):
    csv = make_csv(tmp_path, "img/x1.jpg,leo,e1,s1,train,cat,left\nimg/x2.jpg,,e1,s1,train,cat,left\n")
    with pytest.raises(DataError, match="context column 'place'.*columns are"):
        index_from_csv(csv, path_col="file", label_col="animal", context_col="place")
    with pytest.raises(DataError, match=r"empty label column 'animal' on line\(s\) \[3\]"):
        index_from_csv(csv, path_col="file", label_col="animal")


def test_csv_duplicates_kept_once_or_refused_when_they_disagree(tmp_path):
    same = make_csv(tmp_path, "img/x1.jpg,leo,e1,s1,a,b,c\nimg/x1.jpg,leo,e1,s1,a,b,c\nimg/y1.jpg,zara,e2,s1,a,b,c\n")
    index, problems = index_from_csv(same, path_col="file", label_col="animal", group_col="encounter")
    assert len(index) == 2 and "lines [2, 3]" in problems["problem"].iloc[0]
    clash = make_csv(tmp_path, "img/x1.jpg,leo,e1,s1,a,b,c\nimg/x1.jpg,zara,e1,s1,a,b,c\n")
    with pytest.raises(DataError, match=r"img/x1.jpg' is listed on lines \[2, 3\]"):
        index_from_csv(clash, path_col="file", label_col="animal", group_col="encounter")


def test_csv_without_group_column_makes_each_image_a_group(tmp_path):
    csv = make_csv(tmp_path, "img/x1.jpg,leo,e1,s1,a,b,c\nimg/x2.jpg,leo,e1,s1,a,b,c\n")
    index, problems = index_from_csv(csv, path_col="file", label_col="animal")
    assert index["group"].nunique() == 2 and "own group" in problems["problem"].iloc[0]


def test_check_excludes_whole_groups_and_says_why(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a" / "g1_1.jpg")
    write_image(root / "a" / "g1_2.jpg", size=(300, 100))              # undersized
    write_image(root / "a" / "g2_1.jpg")
    write_image(root / "b" / "g3_1.jpg", seed=9)
    data = (root / "b" / "g3_1.jpg").read_bytes()
    (root / "b" / "g3_1.jpg").write_bytes(data[: len(data) // 2])      # truncated
    write_image(root / "b" / "g3_2.jpg")
    write_image(root / "b" / "g4_1.jpg")
    index, _ = index_from_folder(root)
    index.loc[len(index)] = {"path": "b/g5_1.jpg", "label": "b", "group": "g5", "seq": "1"}   # listed, not on disk
    kept, excl = check_images(index, root, min_size=224)
    assert sorted(kept["group"].unique()) == ["g2", "g4"]
    assert kept[["width", "height"]].eq(240).all().all()
    reasons = excl.set_index("path")["reason"]
    assert "100" in reasons["a/g1_2.jpg"] and "g1_2.jpg" in reasons["a/g1_1.jpg"]
    assert "trunc" in reasons["b/g3_1.jpg"].lower() or "corrupt" in reasons["b/g3_1.jpg"].lower()
    assert "g3_1.jpg" in reasons["b/g3_2.jpg"]
    assert set(excl["group"]) == {"g1", "g3", "g5"}


def test_check_all_excluded_suggests_min_size(tmp_path):
    write_image(tmp_path / "a" / "g1_1.jpg", size=(100, 80))
    index, _ = index_from_folder(tmp_path)
    with pytest.raises(DataError, match="min_size"):
        check_images(index, tmp_path, min_size=224)
    kept, excl = check_images(index, tmp_path, min_size=64)
    assert (kept["width"].iloc[0], kept["height"].iloc[0]) == (100, 80) and excl.empty


def test_real_lions_folder(lions):
    """740 real photos: every file is JPEG data named .png; images are small; prefix = individual."""
    index, problems = index_from_folder(lions / "train")
    assert len(index) == 594 and index["label"].nunique() == 75 and problems.empty
    assert (index.groupby("group")["label"].nunique() == 1).all()
    with pytest.raises(DataError, match="min_size"):
        check_images(index, lions / "train", min_size=224)
    kept, excl = check_images(index, lions / "train", min_size=64)
    assert 0 < len(excl) < len(index) // 4
    assert kept[["width", "height"]].min().min() >= 64
    assert excl["reason"].str.contains("small").any()
