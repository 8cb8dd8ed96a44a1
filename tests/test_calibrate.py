"""Thresholds out of sample (lib.evaluate.calibrate): a calibration part of val by group, the thresholds chosen on it
alone and measured on the rest, and the provenance check prediction makes before applying them."""
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lib.core.errors import DataError
from lib.evaluate.calibrate import Calibration, calibrate, calibration_mask, check_provenance
from lib.retrieval.decide import choose_thresholds


def queries(n_groups=120, per_group=3, seed=0) -> pd.DataFrame:
    """Queries in groups of 3 whose correctness gets likelier with a larger margin and a smaller distance."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    margin, dist = rng.uniform(0, 1, n), rng.uniform(0, 2, n)
    return pd.DataFrame({"group": np.repeat([f"g{i}" for i in range(n_groups)], per_group), "margin": margin,
                         "top1_distance": dist,
                         "correct": rng.uniform(0, 1, n) < 0.3 + 0.5 * margin + 0.2 * (1 - dist / 2)})


def test_the_calibration_part_takes_whole_groups_by_seed():
    groups = queries()["group"]
    mask = calibration_mask(groups, 0.5, seed=3)
    assert pd.Series(mask).groupby(groups.to_numpy()).nunique().eq(1).all(), "a group never straddles the parts"
    assert groups[mask].nunique() == 60
    np.testing.assert_array_equal(mask, calibration_mask(groups, 0.5, seed=3))
    assert not np.array_equal(mask, calibration_mask(groups, 0.5, seed=4))
    assert calibration_mask(["a", "a", "b"], 0.9).sum() in (1, 2), "both parts keep a group"
    with pytest.raises(ValueError, match="between 0 and 1"):
        calibration_mask(groups, 1.0)


def test_thresholds_come_from_the_calibration_part_and_are_measured_on_the_rest():
    q = queries()
    settings = Calibration(target_accuracy=0.8, min_support=30, seed=1)
    thresholds, info = calibrate(SimpleNamespace(queries=q, split="val"), settings)
    part, rest = q[q["calibration"]], q[~q["calibration"]]
    expected, _ = choose_thresholds(part["correct"], part["top1_distance"], part["margin"], target_accuracy=0.8,
                                    min_support=30)
    assert thresholds == expected and info["n"] == len(part) and info["calibration"]["n"] == len(part)
    accepted = (rest["top1_distance"] <= thresholds.max_distance) & (rest["margin"] >= thresholds.min_margin)
    held = info["held_out"]
    assert held["n"] == len(rest) and held["coverage"] == pytest.approx(accepted.mean())
    assert held["accuracy"] == pytest.approx(rest.loc[accepted, "correct"].mean())


SAVED = {"protocol": "gallery", "restrict_to_context": False, "tta": False, "k": 20, "weighting": "inverse",
         "checkpoint_sha256": "abc", "gallery_fingerprint": "fff"}


def test_a_mismatch_is_refused_or_with_the_flag_warned_and_an_old_file_warns():
    assert check_provenance(SAVED, dict(SAVED), "t.json") == []
    used = {**SAVED, "checkpoint_sha256": "new", "k": 5}
    with pytest.raises(DataError, match=r"t\.json does not fit .*k: chosen with 20, used with 5; "
                                        r"checkpoint_sha256: chosen with 'abc', used with 'new'.*--allow-mismatch"):
        check_provenance(SAVED, used, "t.json")
    with pytest.warns(UserWarning, match="applied although k: chosen with 20"):
        assert len(check_provenance(SAVED, used, "t.json", allow_mismatch=True)) == 2
    old = {"k": 20, "weighting": "inverse", "tta": False}  # what notebook 03 wrote before provenance
    with pytest.warns(UserWarning, match="predates recorded provenance: cannot check protocol, restrict_to_context, "
                                         "checkpoint_sha256, gallery_fingerprint"):
        assert check_provenance(old, dict(SAVED), "t.json") == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_provenance(SAVED, dict(SAVED), "t.json")  # a full match says nothing
