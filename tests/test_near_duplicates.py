"""Near-duplicate leakage: planted copies (resized, re-compressed, cropped) in other groups are found and merged;
photos that merely look alike are not paired."""
import io
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import write_image
from PIL import Image

from lib.data import near_duplicates as nd
from lib.data.images import open_image
from lib.data.splits import SplitConfig, assign_splits, prepare_splits
from lib.data.table import check_images, index_from_folder

THRESHOLD = 6  # the notebook's default near_duplicate_distance


def reference_phash(gray32: np.ndarray) -> int:
    """pHash from the textbook DCT-II written out as a cosine matrix (no scipy): X_k = sum_n x_n cos(pi k (2n+1) / 2N)."""
    n = np.arange(32)
    c = np.cos(np.pi * np.outer(n, 2 * n + 1) / 64)
    low = (c @ gray32.astype(np.float64) @ c.T)[:8, :8]
    bits = "".join("1" if v else "0" for v in (low > np.median(low)).ravel())
    return int(bits, 2)


def test_phash_matches_a_reference_dct_and_simple_properties():
    rng = np.random.default_rng(3)
    for _ in range(5):
        gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        assert nd.phash(Image.fromarray(gray)) == reference_phash(gray)
    photo = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).resize((480, 360))
    assert nd.hamming(nd.phash(photo), nd.phash(photo.copy())) == 0
    inverted = Image.fromarray(255 - np.asarray(photo))
    assert nd.hamming(nd.phash(photo), nd.phash(inverted)) >= 48  # every AC coefficient changes sign


def brute_force_pairs(hashes: np.ndarray, groups: np.ndarray, max_distance: int) -> set:
    d = nd.hamming(hashes[:, None], hashes[None, :])
    i, j = np.nonzero((d <= max_distance) & (groups[:, None] != groups[None, :]))
    return {(a, b) for a, b in zip(i, j) if a < b}


@pytest.mark.parametrize("max_distance", [0, 3, 6, 7, 10, 15])
def test_bucketed_search_finds_exactly_what_all_pairs_finds(max_distance):
    rng = np.random.default_rng(max_distance)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300, dtype=np.uint64)
    # near copies at every distance 0..max_distance + 2, bits flipped anywhere in the 64
    near = []
    for k, h in enumerate(base[:120]):
        flips = rng.choice(64, size=k % (max_distance + 3), replace=False)
        near.append(h ^ np.uint64(sum(1 << int(b) for b in flips)))
    hashes = np.concatenate([base, np.array(near, dtype=np.uint64)])
    groups = np.array([f"g{i % 250}" for i in range(len(hashes))])  # some pairs share a group and must not count
    index = pd.DataFrame({"path": [f"p{i}.jpg" for i in range(len(hashes))], "group": groups, "label": "x"})
    pairs = nd.near_duplicate_pairs(index, hashes, max_distance)
    found = {(int(a[1:-4]), int(b[1:-4])) for a, b in zip(pairs["path_a"], pairs["path_b"])}
    expected = brute_force_pairs(hashes, groups, max_distance)
    assert found == {tuple(sorted(p)) for p in expected}
    assert len(expected) >= 40
    assert (pairs["hamming"] <= max_distance).all() and (pairs["group_a"] != pairs["group_b"]).all()


def planted_copy(image: Image.Image, kind: str) -> Image.Image:
    w, h = image.size
    if kind.startswith("resize"):
        s = int(kind[6:]) / 100
        return image.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    if kind.startswith("jpeg"):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(kind[4:]))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    c = int(kind[4:]) / 100  # crop: that share cut at each edge
    return image.crop((round(w * c), round(h * c), w - round(w * c), h - round(h * c)))


KINDS = ["resize60", "resize70", "resize80", "jpeg40", "jpeg50", "jpeg60", "crop3", "crop4", "crop5"]


@pytest.fixture(scope="module")
def planted(demo, tmp_path_factory):
    """The demo photos plus, for one photo of each of 9 individuals, a copy filed under a new ID (its own group).
    The demo's other photos of each class share its pattern family and colours: look-alikes that must not pair."""
    src, _ = demo
    data = tmp_path_factory.mktemp("planted") / "data"
    shutil.copytree(src, data)
    index, _ = index_from_folder(data)
    kept, _ = check_images(index, data)
    originals = kept.drop_duplicates("group").iloc[::5].head(len(KINDS))
    expected = set()
    for kind, (path, group) in zip(KINDS, originals[["path", "group"]].itertuples(index=False)):
        label = path.split("/")[0]
        copy = f"{label}/{group}copy{kind}_1.jpg"
        planted_copy(open_image(data / path), kind).save(data / copy, "JPEG", quality=95)
        expected.add(tuple(sorted((path, copy))))
    index, _ = index_from_folder(data)
    kept, _ = check_images(index, data, min_size=128)  # 60 % copies of the 256 px demo photos are 154 px
    assert {p for pair in expected for p in pair} <= set(kept["path"]) and len(expected) == len(KINDS)
    return data, kept, expected


def test_planted_copies_are_found_and_look_alikes_are_not(planted):
    data, kept, expected = planted
    hashes = nd.perceptual_hashes(kept, data)
    assert hashes.shape == (len(kept), 2) and hashes.dtype == np.uint64 and not hashes.mask.any()
    pairs = nd.near_duplicate_pairs(kept, hashes, THRESHOLD)
    found = set(zip(pairs["path_a"], pairs["path_b"]))
    assert found == expected, f"missed {expected - found}; look-alikes paired {found - expected}"
    assert (pairs["label_a"] == pairs["label_b"]).all()
    # the demo's own photos: 48 individuals in 6 pattern families, each family one colour scheme
    demo_only = kept[~kept["path"].str.contains("copy")]
    d = nd.hamming(hashes.data[demo_only.index][:, None, :, None], hashes.data[demo_only.index][None, :, None, :])
    d = d.min(axis=(2, 3))
    other = demo_only["group"].to_numpy()[:, None] != demo_only["group"].to_numpy()[None, :]
    same_class = demo_only["label"].to_numpy()[:, None] == demo_only["label"].to_numpy()[None, :]
    assert d[other & same_class].min() > THRESHOLD + 2  # a margin, not a near miss


def test_the_centre_hash_is_what_catches_crops(planted):
    """Whole-photo pHash alone misses some 5 % crops: the second (centre) hash is needed, not decoration."""
    data, kept, expected = planted
    hashes = nd.perceptual_hashes(kept, data)
    whole_only = nd.near_duplicate_pairs(kept, hashes.data[:, 0], THRESHOLD)
    missed = expected - set(zip(whole_only["path_a"], whole_only["path_b"]))
    assert missed and all("crop" in b for _, b in missed)


def test_look_alike_photos_of_one_colour_scheme_are_not_paired(tmp_path):
    """Two different stripe photos in the same colours, and two noise photos of the same palette."""
    y, x = np.mgrid[0:300, 0:300]
    a = np.where(np.sin(x / 9.0) > 0, 200, 40).astype(np.uint8)
    b = np.where(np.sin((x + 0.6 * y) / 9.0) > 0, 200, 40).astype(np.uint8)
    for name, img in {"stripes/a_1.png": a, "stripes/b_1.png": b}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([img, img // 2, img // 3], axis=-1)).save(tmp_path / name)
    write_image(tmp_path / "noise" / "c_1.jpg", (300, 300), seed=1)
    write_image(tmp_path / "noise" / "d_1.jpg", (300, 300), seed=2)
    index, _ = index_from_folder(tmp_path)
    hashes = nd.perceptual_hashes(index, tmp_path)
    assert nd.near_duplicate_pairs(index, hashes, nd.MAX_DISTANCE).empty


def test_merge_keeps_every_planted_copy_in_its_originals_split(planted, tmp_path):
    data, kept, expected = planted
    pairs = nd.near_duplicate_pairs(kept, nd.perceptual_hashes(kept, data), THRESHOLD)
    merged = nd.merge_near_duplicates(kept, pairs)
    group = dict(zip(merged["path"], merged["group"]))
    assert all(group[a] == group[b] for a, b in expected)
    assert merged["group"].nunique() == kept["group"].nunique() - len(expected)
    assert (merged.groupby("group")["label"].nunique() == 1).all()
    assert (merged["group_before_merge"] == kept["group"]).all() and (merged["path"] == kept["path"]).all()

    def split_of(index, splits_dir):
        s = assign_splits(index, prepare_splits(index, splits_dir, SplitConfig()).groups)
        return dict(zip(s["path"], s["split"]))

    where = split_of(merged, tmp_path / "merged")
    assert all(where[a] == where[b] for a, b in expected)
    unmerged = split_of(kept, tmp_path / "unmerged")
    assert any(unmerged[a] != unmerged[b] for a, b in expected), "the test needs a pair that leaks without merging"


def test_merge_joins_clusters_transitively_and_never_across_labels():
    index = pd.DataFrame({"path": [f"p{i}" for i in range(7)], "label": ["cat"] * 5 + ["dog"] * 2,
                          "group": ["c3", "c1", "c2", "c2", "c9", "d1", "d2"]})

    def pair(i, j, dist=2):
        a, b = index.iloc[i], index.iloc[j]
        return {"path_a": a.path, "path_b": b.path, "group_a": a.group, "group_b": b.group, "label_a": a.label,
                "label_b": b.label, "hamming": dist}

    pairs = pd.DataFrame([pair(0, 2), pair(3, 1), pair(4, 5), pair(5, 6)])
    merged = nd.merge_near_duplicates(index, pairs)
    # c3-c2 and c2-c1 make one cluster named by its smallest group; c9-d1 crosses labels: left apart; d1-d2 merged
    assert merged["group"].tolist() == ["c1", "c1", "c1", "c1", "c9", "d1", "d1"]
    assert nd.merge_near_duplicates(index, pairs.iloc[::-1])["group"].tolist() == merged["group"].tolist()
    actions = nd.pair_actions(pairs, merged=True)["action"].tolist()
    assert actions[2].startswith("different labels") and actions.count("groups merged") == 3


def test_unreadable_photos_are_masked_and_never_paired(tmp_path):
    write_image(tmp_path / "a" / "x_1.jpg", seed=5)
    shutil.copy(tmp_path / "a" / "x_1.jpg", tmp_path / "a" / "y_1.jpg")
    (tmp_path / "a" / "z_1.jpg").write_bytes((tmp_path / "a" / "x_1.jpg").read_bytes()[:300])  # truncated
    (tmp_path / "a" / "w_1.jpg").write_bytes((tmp_path / "a" / "x_1.jpg").read_bytes()[:300])
    index, _ = index_from_folder(tmp_path)
    hashes = nd.perceptual_hashes(index, tmp_path)
    assert hashes.mask.any(axis=1).tolist() == [True, False, False, True]  # w, x, y, z
    pairs = nd.near_duplicate_pairs(index, hashes)
    assert list(zip(pairs["path_a"], pairs["path_b"], pairs["hamming"])) == [("a/x_1.jpg", "a/y_1.jpg", 0)]


def test_an_embedding_check_drops_pairs_the_embeddings_disagree_on():
    index = pd.DataFrame({"path": ["a", "b", "c", "d"], "group": ["1", "2", "3", "4"], "label": "x"})
    hashes = np.array([7, 7, 2**40, 2**40], dtype=np.uint64)
    embeddings = np.array([[1.0, 0.0], [0.99, 0.05], [1.0, 0.0], [0.0, 1.0]])
    pairs = nd.near_duplicate_pairs(index, hashes, 0, embeddings=embeddings, min_cosine=0.9)
    assert pairs[["path_a", "path_b"]].values.tolist() == [["a", "b"]] and pairs["cosine"].iloc[0] > 0.99
    assert len(nd.near_duplicate_pairs(index, hashes, 0)) == 2


def test_written_to_the_split_folder_and_report_without_stacking(tmp_path):
    (tmp_path / "split_report.md").write_text("# Split report\n\n## Excluded groups (0)\n\nnone\n")
    pairs = pd.DataFrame([{"path_a": "a/x_1.jpg", "path_b": "a/y_1.jpg", "group_a": "x", "group_b": "y",
                           "label_a": "a", "label_b": "a", "hamming": 3}])
    nd.write_near_duplicates(tmp_path, pairs, 6, merged=False)
    nd.write_near_duplicates(tmp_path, pairs, 6, merged=True)
    text = (tmp_path / "split_report.md").read_text()
    assert text.count("## Near-duplicates across groups (1 pairs") == 1 and "## Excluded groups (0)" in text
    assert "groups merged: 1" in text and "a/x_1.jpg" in text
    csv = pd.read_csv(tmp_path / "near_duplicates.csv")
    assert csv.columns.tolist() == nd.PAIR_COLUMNS + ["action"] and csv["action"].tolist() == ["groups merged"]
