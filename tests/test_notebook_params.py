"""Renamed notebook parameters still accepted for one release, and one task -> columns table for notebooks 01 and 06."""
from pathlib import Path

import papermill
import pytest

from lib.core.notebook_params import RENAMED, renamed_parameters
from lib.data.tasks import task_columns
from lib.evaluate.chain import chain_parameters
from lib.train.config import build_config, config_parameters

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


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
    from test_run_photos import run_photos  # notebooks/run_photos.py, loaded there from its file

    for stem, renames in RENAMED.items():
        got = run_photos.declared_parameters(NOTEBOOKS / f"{stem}.ipynb", {**{old: 1 for old in renames},
                                                                             "nonsense": 2})
        assert set(got) == set(renames), stem


def test_each_k_has_its_name_and_the_old_one_still_lands():
    """`k` meant four things: photos per class (02), voting neighbours (03), candidate classes and photos shown (04,
    05). Each notebook declares the new name only and moves the old one onto it right after its start."""
    assert RENAMED["02_train"] == {"k": "images_per_class"} and RENAMED["03_evaluate"] == {"k": "neighbours"}
    for stem, renames in RENAMED.items():
        declared = set(papermill.inspect_notebook(str(NOTEBOOKS / f"{stem}.ipynb")))
        assert set(renames.values()) <= declared and not set(renames) & declared, stem
        assert f'renamed_parameters(globals(), "{stem}")' in (NOTEBOOKS / f"{stem}.py").read_text(), stem


def test_notebook_02_old_k_sets_images_per_class(capsys):
    namespace = {"p": 16, "images_per_class": 4, "k": 8}  # papermill's `-p k 8` after the cell's defaults
    renamed_parameters(namespace, "02_train")
    assert build_config(**config_parameters(namespace)).sampler.k == 8
    assert "'k' is now 'images_per_class'" in capsys.readouterr().err


def test_notebook_03_neighbours_vote_and_tune_the_index(capsys):
    settings, _ = chain_parameters({"neighbours": 7})
    assert settings.k == settings.index.k == 7
    assert chain_parameters({})[0].k == 20  # the project's default
    namespace = {"neighbours": 20, "k": 5}  # old `-p k 5`
    renamed_parameters(namespace, "03_evaluate")
    settings, _ = chain_parameters(namespace)
    assert settings.k == settings.index.k == 5 and "'k' is now 'neighbours'" in capsys.readouterr().err
