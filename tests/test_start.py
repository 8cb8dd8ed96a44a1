"""A notebook's start: it finds the repository root from any folder below it, works from there, and imports `lib`
from that checkout even when the editable install points at another one."""
import subprocess
import sys
from pathlib import Path

import pytest

from lib.core.start import repo_root

ROOT = Path(__file__).resolve().parents[1]


def test_the_root_is_found_from_below_and_its_absence_is_said(tmp_path):
    assert repo_root(ROOT / "notebooks") == ROOT == repo_root(ROOT)
    with pytest.raises(FileNotFoundError, match="lib/__init__.py"):
        repo_root(tmp_path)


def test_a_notebook_in_another_checkout_imports_that_checkouts_lib(tmp_path):
    """This checkout's lib stands in for the installed one; the notebook sits in another clone's notebooks/."""
    clone = tmp_path / "clone"
    (clone / "lib" / "core").mkdir(parents=True)
    (clone / "notebooks").mkdir()
    (clone / "lib" / "__init__.py").write_text("")
    (clone / "lib" / "core" / "__init__.py").write_text("")
    (clone / "lib" / "core" / "where.py").write_text("WHERE = 'clone'\n")
    preamble = ("import os, lib\nfrom lib.core.start import work_from_repo_root\n"
                "root = work_from_repo_root()\nfrom lib.core.where import WHERE\n"
                "print(root, os.getcwd(), WHERE, lib.__file__ != __import__('lib').__file__, sep='|')")
    out = subprocess.run([sys.executable, "-c", preamble], cwd=clone / "notebooks", env={"PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out.split("|") == [str(clone), str(clone), "clone", "True"]
