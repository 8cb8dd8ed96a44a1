"""Notebook parameters renamed for clarity keep working for one release: papermill's `-p OLD VALUE` (or `make run
ARGS="-p OLD VALUE"`) still lands, with one line saying the new name."""
from __future__ import annotations

import sys

# notebook (file stem) -> {old name: new name}; read by the notebooks and by notebooks/run_photos.py, which passes an
# old name on to the notebook that still takes it
RENAMED = {"02_train": {"k": "images_per_class"}, "03_evaluate": {"k": "neighbours"},
           "04_confusion_analysis": {"k_show": "shown", "k_candidates": "candidates"},
           "05_retrieval_gallery": {"k": "shown"}}


def renamed_parameters(namespace: dict, notebook: str) -> None:
    """For each old name of `notebook` that papermill set in its `namespace` (its globals()), move the value to the
    new name and say so in one line on stderr."""
    for old, new in RENAMED[notebook].items():
        if old in namespace:
            namespace[new] = namespace.pop(old)
            print(f"deprecated: parameter {old!r} is now {new!r} ({new}={namespace[new]!r} taken); "
                  f"the old name goes in the next release", file=sys.stderr)
