"""Which runs have an evaluation on disk to browse: notebook 03 writes one per split to run_dir/eval/<split>/."""
from __future__ import annotations

import os
from pathlib import Path

EVAL_MARKER = "queries.csv"   # lib.evaluate.record writes it first; a folder without it holds no evaluation


def evaluated_runs(runs_root: str | os.PathLike) -> dict[str, list[str]]:
    """{run folder: its evaluated splits (val first)} for every run directly under `runs_root`, by name."""
    found: dict[str, list[str]] = {}
    for marker in sorted(Path(runs_root).glob(f"*/eval/*/{EVAL_MARKER}")):
        run, split = marker.parents[2], marker.parent.name
        found.setdefault(str(run), []).append(split)
    return {run: sorted(splits, key=lambda s: (s != "val", s)) for run, splits in found.items()}


def newest_run(runs_root: str | os.PathLike) -> str | None:
    """The run under `runs_root` whose evaluation was written last (what `make browse` opens); None if none."""
    markers = list(Path(runs_root).glob(f"*/eval/*/{EVAL_MARKER}"))
    return str(max(markers, key=lambda p: p.stat().st_mtime_ns).parents[2]) if markers else None
