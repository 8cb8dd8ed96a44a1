"""What a notebook's `task` means for the columns it reads when none is named: notebook 01's CSV label column and
notebook 06's identity column (who is the same individual) come from one table."""
from __future__ import annotations

from typing import NamedTuple


class TaskColumns(NamedTuple):
    label_col: str     # the metadata CSV column holding each photo's label (notebook 01)
    identity_col: str  # the split index column naming the individual a query must find (notebook 06's probe)


# classification: the label is the class, and an individual is one photographed object (its group); reid: the
# label is the individual
TASKS = {"classification": TaskColumns(label_col="label", identity_col="group"),
         "reid": TaskColumns(label_col="individual", identity_col="label")}


def task_columns(task: str) -> TaskColumns:
    """The default columns of `task`; an unknown task is an error listing the valid ones."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}; valid: {', '.join(TASKS)}")
    return TASKS[task]
