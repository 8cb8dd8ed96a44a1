import json

import numpy as np
import pandas as pd
import pytest

from lib.core.errors import DataError
from lib.data.splits import (
    SPLITS,
    SplitConfig,
    assign_splits,
    data_fingerprint,
    load_split_index,
    prepare_splits,
    split_groups,
)


def synthetic_index(n_classes=12, seed=0, rare=True) -> pd.DataFrame:
    """Classes of uneven size whose groups hold 1-8 images; plus classes with 1, 2 and 3 groups."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_classes):
        for g in range(int(rng.integers(10, 40))):
            for s in range(int(rng.integers(1, 9))):
                rows.append((f"c{c}/c{c}g{g}_{s}.jpg", f"class{c:02d}", f"c{c}g{g}"))
    if rare:
        for name, n_groups in (("solo", 1), ("pair", 2), ("trio", 3)):
            for g in range(n_groups):
                rows += [(f"{name}/{name}{g}_{s}.jpg", name, f"{name}{g}") for s in range(3)]
    index = pd.DataFrame(rows, columns=["path", "label", "group"])
    return index.assign(width=256, height=256)


def test_no_group_in_two_splits_and_every_class_in_train():
    index = synthetic_index()
    groups = split_groups(index, SplitConfig())
    sets = [set(groups[s]) for s in SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(index["group"])
    labelled = assign_splits(index, groups)
    assert set(labelled.query("split == 'train'")["label"]) == set(index["label"])


def test_ratios_and_class_distribution_close_to_target():
    index = synthetic_index(n_classes=20, rare=False)
    labelled = assign_splits(index, split_groups(index, SplitConfig(ratios=(0.7, 0.15, 0.15), seed=3)))
    share = labelled["split"].value_counts(normalize=True)
    for s, target in zip(SPLITS, (0.7, 0.15, 0.15)):
        assert abs(share[s] - target) < 0.03, (s, share[s])
    overall = labelled["label"].value_counts(normalize=True)
    for s in SPLITS:
        in_split = labelled.query("split == @s")["label"].value_counts(normalize=True).reindex(overall.index, fill_value=0)
        total_variation = 0.5 * (in_split - overall).abs().sum()
        assert total_variation < 0.06, (s, total_variation)


def test_classes_with_few_groups_follow_the_documented_rule():
    labelled = assign_splits(idx := synthetic_index(), split_groups(idx, SplitConfig()))
    where = labelled.groupby("label")["split"].unique().map(sorted)
    assert where["solo"] == ["train"]
    assert where["pair"] == ["train", "val"]
    assert where["trio"] == ["test", "train", "val"]


def test_same_seed_same_files_and_reuse(tmp_path):
    index = synthetic_index()
    prepare_splits(index, tmp_path / "a", SplitConfig(seed=7))
    prepare_splits(index.sample(frac=1, random_state=1), tmp_path / "b", SplitConfig(seed=7))   # row order must not matter
    for name in ("train_ids.json", "val_ids.json", "test_ids.json", "class_to_idx.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    prepare_splits(index, tmp_path / "c", SplitConfig(seed=8))
    assert (tmp_path / "c" / "val_ids.json").read_bytes() != (
        tmp_path / "a" / "val_ids.json").read_bytes()
    c2i = json.loads((tmp_path / "a" / "class_to_idx.json").read_text())
    assert list(c2i) == sorted(c2i) and list(c2i.values()) == list(range(len(c2i)))

    mtime = (tmp_path / "a" / "train_ids.json").stat().st_mtime_ns
    again = prepare_splits(index, tmp_path / "a", SplitConfig(seed=7))
    assert (tmp_path / "a" / "train_ids.json").stat().st_mtime_ns == mtime
    assert again.groups["train"] == json.loads((tmp_path / "a" / "train_ids.json").read_text())


def test_changed_data_or_settings_are_errors_unless_fresh(tmp_path):
    index = synthetic_index()
    first = prepare_splits(index, tmp_path, SplitConfig())
    grown = pd.concat([index, pd.DataFrame([{"path": "new/n_1.jpg", "label": "class00", "group": "newgroup",
                                             "width": 256, "height": 256}])])
    with pytest.raises(DataError, match="other data.*1 group\\(s\\) not in any split.*newgroup"):
        prepare_splits(grown, tmp_path, SplitConfig())
    with pytest.raises(DataError, match="seed"):
        prepare_splits(index, tmp_path, SplitConfig(seed=1))
    second = prepare_splits(grown, tmp_path, SplitConfig(), fresh=True)
    assert "newgroup" in {g for gs in second.groups.values() for g in gs}
    backups = list(tmp_path.glob("replaced-*"))
    assert len(backups) == 1
    assert json.loads((backups[0] / "train_ids.json").read_text()) == first.groups["train"]


def test_files_from_before_a_setting_existed_are_reused_with_its_default(tmp_path):
    index = synthetic_index()
    prepare_splits(index, tmp_path, SplitConfig())
    report = json.loads((tmp_path / "split_report.json").read_text())
    del report["config"]["mode"], report["config"]["time_col"]
    (tmp_path / "split_report.json").write_text(json.dumps(report))
    prepare_splits(index, tmp_path, SplitConfig())
    with pytest.raises(DataError, match="'mode': 'group'"):
        prepare_splits(index, tmp_path, SplitConfig(mode="open"))


def test_kfold_around_fixed_test(tmp_path):
    index = synthetic_index(rare=False)
    splits = prepare_splits(index, tmp_path, SplitConfig(n_folds=4))
    test = set(splits.groups["test"])
    pool = set(index["group"]) - test
    assert len(splits.folds) == 4
    vals = [set(f["val"]) for f in splits.folds]
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)
    for f in splits.folds:
        assert not (set(f["train"]) & set(f["val"])) and not (set(f["train"]) | set(f["val"])) & test
    labelled, _ = load_split_index(tmp_path, fold=2)
    assert set(labelled.query("split == 'val'")["group"]) == vals[2]
    with pytest.raises(DataError, match="fold 9"):
        load_split_index(tmp_path, fold=9)


def test_split_index_round_trip_and_tamper_detection(tmp_path):
    index = synthetic_index()
    splits = prepare_splits(index, tmp_path, SplitConfig(), min_size=96)
    loaded, again = load_split_index(tmp_path)
    assert data_fingerprint(loaded) == data_fingerprint(index)
    assert again.report["min_size"] == 96  # prediction flags photos below it
    assert set(loaded.query("split == 'test'")["group"]) == set(splits.groups["test"])
    assert "| solo | " in (tmp_path / "split_report.md").read_text()
    assert again.report["train_only_classes"] == ["solo"] and again.report["no_test_classes"] == ["pair"]

    val = json.loads((tmp_path / "val_ids.json").read_text())
    (tmp_path / "test_ids.json").write_text(json.dumps(splits.groups["test"] + val[:1]))
    with pytest.raises(DataError, match=f"group '{val[0]}' is listed in both val and test"):
        load_split_index(tmp_path)
    edited = pd.read_csv(tmp_path / "index.csv")
    edited.loc[0, "label"] = "class99"
    edited.to_csv(tmp_path / "index.csv", index=False)
    with pytest.raises(DataError, match="edited"):
        load_split_index(tmp_path)


def test_bad_ratios_rejected():
    with pytest.raises(ValueError, match="ratios"):
        SplitConfig(ratios=(0.8, 0.3, 0.1))


def reid_index() -> pd.DataFrame:
    """Individuals photographed in dated encounters; encounter e-x holds two individuals (a pair seen together)."""
    rows = []
    for animal in range(10):
        for enc in range(6):
            rows += [(f"a{animal}/e{enc}_{s}.jpg", f"ind{animal}", f"a{animal}e{enc}", f"2024-0{enc + 1}-1{animal % 9}")
                     for s in range(2)]
    rows += [("x/shared_1.jpg", "ind0", "e-x", "2024-01-01"), ("x/shared_2.jpg", "ind1", "e-x", "2024-01-01")]
    return pd.DataFrame(rows, columns=["path", "label", "group", "date"]).assign(width=300, height=300)


def test_identity_disjoint_open_mode_keeps_individuals_apart_and_pairs_together():
    index = reid_index()
    labelled = assign_splits(index, split_groups(index, SplitConfig(mode="open", seed=1, unknown_share=1)))
    per_label = labelled.groupby("label")["split"].nunique()
    assert (per_label == 1).all()                      # no individual in two splits
    where = labelled.groupby("label")["split"].first()
    assert where["ind0"] == where["ind1"]              # seen together in e-x, so they move together
    assert set(where) == set(SPLITS)


def test_open_mode_report_does_not_apply_the_few_groups_rule_and_one_group_each_is_disjoint(tmp_path):
    index = reid_index().drop(columns="date")
    index["group"] = index["label"]  # a folder layout whose ID is the individual: one group per label
    disjoint = split_groups(index, SplitConfig(mode="open", unknown_share=1))
    assert split_groups(index, SplitConfig(mode="open")) == disjoint  # no individual could be known in val/test
    report = prepare_splits(index, tmp_path, SplitConfig(mode="open", unknown_share=1)).report
    assert report["train_only_classes"] == [] and report["no_test_classes"] == []
    assert "identity-disjoint" in (tmp_path / "split_report.md").read_text()
    n_unknown = sum(map(len, report["unknown_individuals"].values()))  # in a disjoint split, every val/test one
    assert n_unknown == report["n_labels"]["val"] + report["n_labels"]["test"]


def test_time_mode_puts_the_latest_encounters_last():
    index = reid_index()
    labelled = assign_splits(index, split_groups(index, SplitConfig(mode="time", time_col="date")))
    for _, rows in labelled.groupby("label"):
        first = rows.groupby("split")["date"].min()
        last = rows.groupby("split")["date"].max()
        assert last["train"] < first["val"] <= last["val"] < first["test"]
    with pytest.raises(ValueError, match="time_col"):
        SplitConfig(mode="time")


def test_given_mode_uses_the_csv_column_and_carves_val():
    index = reid_index()
    index["given_split"] = np.where(index["group"].str.endswith(("e4", "e5")), "Test", "train")
    index.loc[index["group"] == "e-x", "given_split"] = "train"
    groups = split_groups(index, SplitConfig(mode="given"))
    assert set(groups["test"]) == set(index.loc[index["given_split"] == "Test", "group"])
    assert groups["val"] and not set(groups["val"]) & set(groups["test"])
    index.loc[0, "given_split"] = "holdout"
    with pytest.raises(DataError, match="holdout"):
        split_groups(index, SplitConfig(mode="given"))


def long_tailed_index(seed=0, n_classes=400, p_small=0.7) -> pd.DataFrame:
    """Individuals with 1-16 dated encounters (groups) of 1-6 photos; most (p_small) seen in only 1-3 encounters."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_classes):
        n = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4])) if rng.random() < p_small else int(rng.integers(4, 17))
        for g in range(n):
            rows += [(f"c{c}/g{g}_{s}.jpg", f"ind{c:03d}", f"c{c}g{g}", f"2024-{g + 1:02d}-01")
                     for s in range(int(rng.integers(1, 7)))]
    return pd.DataFrame(rows, columns=["path", "label", "group", "date"]).assign(width=256, height=256)


def _evaluated(labelled: pd.DataFrame, n_groups: int) -> tuple[float, float, float]:
    """Among classes with n_groups groups: share in val or test, share in test, share in both."""
    per_class = labelled.groupby("group")["label"].first().value_counts()
    where = labelled.groupby("label")["split"].unique().map(set)[per_class[per_class == n_groups].index]
    return (where.map(lambda w: bool(w & {"val", "test"})).mean(), where.map(lambda w: "test" in w).mean(),
            where.map(lambda w: {"val", "test"} <= w).mean())


@pytest.mark.parametrize("p_small, both_3", [(0.7, 1.0), (0.92, 0.85)])
def test_long_tailed_ratios_held_and_small_classes_still_evaluated(p_small, both_3):
    index = long_tailed_index(p_small=p_small)
    asked = (0.7, 0.15, 0.15)
    old = assign_splits(index, split_groups(index, SplitConfig(ratios=asked, ratio_tol=0.99)))  # the bare rule
    assert old["split"].value_counts(normalize=True)["train"] < 0.67  # what the issue saw (measured 0.654 / 0.610)
    groups = split_groups(index, SplitConfig(ratios=asked))
    sets = [set(groups[s]) for s in SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(index["group"])
    labelled = assign_splits(index, groups)
    assert set(labelled.query("split == 'train'")["label"]) == set(index["label"])
    share = labelled["split"].value_counts(normalize=True)
    for s, target in zip(SPLITS, asked):
        assert abs(share[s] - target) <= 0.03 + 1e-9, (s, share[s])
    # larger classes make the room: every class of 2+ groups is still in val or test; 3-group classes stay in test
    for k in range(2, 17):
        if (index.groupby("group")["label"].first().value_counts() == k).any():
            assert _evaluated(labelled, k)[0] == 1.0, k
    assert _evaluated(labelled, 2)[0] == 1.0 and _evaluated(labelled, 3)[1] == 1.0
    assert _evaluated(labelled, 3)[2] >= both_3  # measured 1.0 and 0.92 (a few lose val, keeping test)
    assert groups == split_groups(index.sample(frac=1, random_state=2), SplitConfig(ratios=asked))  # deterministic


def test_long_tailed_time_mode_holds_ratios_and_time_order():
    index = long_tailed_index(seed=1, p_small=0.92)
    labelled = assign_splits(index, split_groups(index, SplitConfig(mode="time", time_col="date")))
    share = labelled["split"].value_counts(normalize=True)
    for s, target in zip(SPLITS, (0.7, 0.15, 0.15)):
        assert abs(share[s] - target) <= 0.03 + 1e-9, (s, share[s])
    order = {"train": 0, "val": 1, "test": 2}
    for _, rows in labelled.sort_values(["date", "group"]).groupby("label"):
        steps = rows["split"].map(order).to_numpy()
        assert steps[0] == 0 and (np.diff(steps) >= 0).all()


def test_report_gives_asked_and_achieved_ratios(tmp_path):
    index = long_tailed_index(n_classes=150, p_small=0.92)
    splits = prepare_splits(index, tmp_path, SplitConfig())
    report = splits.report
    assert report["ratios_asked"] == {"train": 0.7, "val": 0.15, "test": 0.15}
    achieved = report["ratios_achieved"]
    assert sum(achieved.values()) == pytest.approx(1, abs=1e-3)
    assert all(abs(achieved[s] - report["ratios_asked"][s]) <= 0.03 + 1e-4 for s in SPLITS)
    assert achieved["train"] == pytest.approx(report["n_images"]["train"] / len(index), abs=1e-4)
    # the lists say where classes landed, including any whose val/test group went to train to hold the ratios
    unevaluated = {c for c, v in report["per_class"].items() if v["val"] == v["test"] == 0}
    assert set(report["train_only_classes"]) == unevaluated
    markdown = (tmp_path / "split_report.md").read_text()
    assert f"train 0.70 -> {achieved['train']:.3f}" in markdown and "asked -> achieved" in markdown
    with pytest.raises(ValueError, match="ratio_tol"):
        SplitConfig(ratio_tol=1.5)


def _check_open_set(index: pd.DataFrame, groups: dict, unknown: dict, whole: bool = True) -> None:
    """The open-set invariants, recomputed from the index: no group in two splits; an unknown individual has no
    train photo (so none in the gallery) and (whole) lies in one split; a known val/test individual has one."""
    sets = [set(groups[s]) for s in SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(index["group"])
    labelled = assign_splits(index, groups)
    train_labels = set(labelled.loc[labelled["split"] == "train", "label"])
    for s in ("val", "test"):
        in_split = set(labelled.loc[labelled["split"] == s, "label"])
        assert set(unknown[s]) <= in_split and not set(unknown[s]) & train_labels, s
        assert in_split - set(unknown[s]) <= train_labels, s
        assert unknown[s] and in_split - set(unknown[s]), f"{s} mixes known and unknown individuals"
    where = labelled[labelled["label"].isin(unknown["val"] + unknown["test"])].groupby("label")["split"].nunique()
    assert (where == 1).all() or not whole


@pytest.mark.parametrize("make, seed", [(reid_index, 1), (reid_index, 5), (long_tailed_index, 0),
                                        (long_tailed_index, 3)])
def test_open_set_holds_a_share_of_individuals_out_whole(make, seed, tmp_path):
    index = make()
    splits = prepare_splits(index, tmp_path, SplitConfig(mode="open", seed=seed))
    on_disk = json.loads((tmp_path / "unknown_individuals.json").read_text())
    assert on_disk == splits.unknown == splits.report["unknown_individuals"]
    loaded, again = load_split_index(tmp_path)
    assert again.unknown == on_disk
    _check_open_set(index, splits.groups, on_disk)
    n_unknown = len(on_disk["val"]) + len(on_disk["test"])
    n_evaluated = loaded.loc[loaded["split"] != "train", "label"].nunique()
    # a pair seen together (reid_index's e-x) is held out as one unit: the share may be off by one unit of two
    assert abs(n_unknown / n_evaluated - 0.2) <= 2 / n_evaluated, (n_unknown, n_evaluated)
    assert "## Unknown individuals" in (tmp_path / "split_report.md").read_text()
    if make is long_tailed_index:
        share = loaded["split"].value_counts(normalize=True)
        assert abs(share["train"] - 0.7) < 0.05, share  # measured 0.675 at seeds 0, 3


def test_open_set_keeps_a_pair_seen_together_in_one_place():
    index = reid_index()
    for seed in range(8):
        labelled = assign_splits(index, split_groups(index, SplitConfig(mode="open", seed=seed)))
        shared = labelled.loc[labelled["group"] == "e-x", "split"].iloc[0]
        unknown = {label for label, rows in labelled.groupby("label") if not (rows["split"] == "train").any()}
        assert ({"ind0", "ind1"} <= unknown) == ({"ind0", "ind1"} & unknown != set()), seed  # both or neither
        assert shared != "train" or not {"ind0", "ind1"} & unknown


def test_unknown_share_only_for_open_set_modes_and_old_files_still_load(tmp_path):
    with pytest.raises(ValueError, match="unknown_share applies"):
        SplitConfig(mode="group", unknown_share=0.2)
    with pytest.raises(ValueError, match="unknown_share must be"):
        SplitConfig(mode="open", unknown_share=1.5)
    assert SplitConfig().unknown_share == 0 and SplitConfig(mode="open").unknown_share == 0.2
    index = reid_index()
    prepare_splits(index, tmp_path, SplitConfig(mode="open", unknown_share=1))
    # files from before the holdout: no unknown list, no unknown_share (open mode was identity-disjoint then)
    (tmp_path / "unknown_individuals.json").unlink()
    report = json.loads((tmp_path / "split_report.json").read_text())
    del report["config"]["unknown_share"], report["unknown_individuals"]
    (tmp_path / "split_report.json").write_text(json.dumps(report))
    loaded, splits = load_split_index(tmp_path)
    assert splits.unknown == {} and len(loaded) == len(index)
    assert prepare_splits(index, tmp_path, SplitConfig(mode="open", unknown_share=1)).unknown == {}
    with pytest.raises(DataError, match="'unknown_share': 1.0"):
        prepare_splits(index, tmp_path, SplitConfig(mode="open"))


def test_given_mode_carves_an_open_set_val_and_reports_the_csv_unknowns(tmp_path):
    index = long_tailed_index(n_classes=120)
    # the CSV's own open-set test: the last encounters of every individual, plus every photo of ten of them
    last = index.groupby("label")["group"].transform("max") == index["group"]
    whole = index["label"].isin(sorted(index["label"].unique())[:10])
    index["given_split"] = np.where(last | whole, "test", "train")
    splits = prepare_splits(index, tmp_path, SplitConfig(mode="given"))
    assert set(splits.groups["test"]) == set(index.loc[index["given_split"] == "test", "group"])
    # a carved-out individual keeps its CSV test photos: unknown in val and in test
    _check_open_set(index, splits.groups, splits.unknown, whole=False)
    assert set(sorted(index["label"].unique())[:10]) <= set(splits.unknown["test"])
    n_val = assign_splits(index, splits.groups).query("split == 'val'")["label"].nunique()
    assert abs(len(splits.unknown["val"]) / n_val - 0.2) <= 2 / n_val  # measured 15 of 68


def test_a_split_mode_is_one_record(monkeypatch, tmp_path):
    """A mode registered in lib.data.split_modes.MODES alone is accepted by SplitConfig, places the groups, and says
    in the report what it is; its open_set flag decides whether it takes unknown_share."""
    from lib.data import split_modes

    def everything_in_train(index, table, cfg, rng):
        return {g: "train" for g in table["group"]}

    mode = split_modes.SplitMode("all-train", everything_in_train, per_class=False, open_set=False,
                                 describe=lambda report: ["Every group in train."])
    monkeypatch.setitem(split_modes.MODES, mode.name, mode)
    index = synthetic_index(n_classes=3, rare=False)
    splits = prepare_splits(index, tmp_path, SplitConfig(mode="all-train"))
    assert splits.groups["train"] == sorted(index["group"].unique()) and not splits.groups["val"]
    assert "Every group in train." in (tmp_path / "split_report.md").read_text()
    assert splits.report["train_only_classes"] == []  # not a per-class mode: no few-groups report
    with pytest.raises(ValueError, match="unknown_share applies to split modes"):
        SplitConfig(mode="all-train", unknown_share=0.3)
    with pytest.raises(ValueError, match="valid: group, time, open, given, all-train"):
        SplitConfig(mode="al-train")
