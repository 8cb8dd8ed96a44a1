"""Renamed notebook parameters still accepted for one release, and one task -> columns table for notebooks 01 and 06."""
import pytest

from lib.core.notebook_params import RENAMED, renamed_parameters
from lib.data.tasks import task_columns


def test_an_old_parameter_name_lands_on_the_new_one_with_one_line(capsys):
    namespace = {"shown": 5, "k": 8}  # the parameters cell's default, then papermill's injected `-p k 8`
    renamed_parameters(namespace, "05_retrieval_gallery")
    assert namespace == {"shown": 8}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'k' is now 'shown'" in err
    renamed_parameters(namespace, "05_retrieval_gallery")  # not given: silent, nothing changes
    assert namespace == {"shown": 8} and capsys.readouterr().err == ""


def test_task_columns_for_notebooks_01_and_06():
    assert task_columns("classification") == ("label", "group")
    assert task_columns("reid").label_col == "individual" and task_columns("reid").identity_col == "label"
    with pytest.raises(ValueError, match="valid: classification, reid"):
        task_columns("re-id")


def test_make_run_passes_an_old_name_to_the_notebook_that_still_takes_it():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "notebooks"))
    from run_photos import declared_parameters

    for stem, renames in RENAMED.items():
        got = declared_parameters(root / "notebooks" / f"{stem}.ipynb", {**{old: 1 for old in renames}, "nonsense": 2})
        assert set(got) == set(renames), stem
