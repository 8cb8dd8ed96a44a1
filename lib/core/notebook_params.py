"""Notebook parameters renamed for clarity keep working for one release: papermill's `-p OLD VALUE` still lands, with
one line saying the new name."""
from __future__ import annotations

import sys


def renamed_parameters(namespace: dict, renames: dict[str, str]) -> None:
    """For each old name papermill set in the notebook's `namespace` (its globals()), move its value to the new name
    and say so in one line on stderr."""
    for old, new in renames.items():
        if old in namespace:
            namespace[new] = namespace.pop(old)
            print(f"deprecated: parameter {old!r} is now {new!r} ({new}={namespace[new]!r} taken); "
                  f"the old name goes in the next release", file=sys.stderr)
