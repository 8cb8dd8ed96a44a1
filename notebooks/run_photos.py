"""Your photos in one command: notebooks 01-05 headless, with the notebooks' own defaults (the real-photo recipe).

    make run DATA=path/to/photos [RUN=name] [ARGS="-p epochs 3 -p task reid"]
    python notebooks/run_photos.py DATA [--run NAME] [-p NAME VALUE ...]

DATA is a photo folder (data/{label}/{ID}_{seq}.jpg) or a metadata CSV (its paths relative to the CSV's folder).
Everything goes to runs/NAME (checkpoints, evaluation, figures/, results/, the executed notebooks in notebooks/) and
splits/NAME; NAME is DATA's folder name unless --run names it. A second call carries on: notebooks that finished
with the same parameters are skipped, training resumes from its latest checkpoint. `-p` values go to every notebook
that declares the parameter; nothing is ever written into the demo's runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import papermill
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import HEADLESS, KERNEL, notebooks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib.core.errors import DataError  # noqa: E402
from lib.core.notebook_params import RENAMED  # noqa: E402
from lib.core.state_io import read_manifest, write_json  # noqa: E402

STAGES = ("01_", "02_", "03_", "04_", "05_")
RESERVED = ("demo", "demo-open")  # the demo pipeline's runs (notebooks/run_all.py)
PROGRESS = "progress.json"        # in runs/NAME/notebooks: which notebook finished with which parameters


def run_name(data: Path) -> str:
    """runs/NAME from DATA: the folder itself, or the folder a CSV lies in."""
    return (data.parent if data.is_file() else data).resolve().name


def pipeline_parameters(data: Path, name: str, root: Path) -> dict:
    """Where each notebook reads and writes for this run (absolute paths: the notebooks work from the repository
    root, the caller may not); a notebook gets those it declares."""
    run_dir = root / "runs" / name
    csv = data.is_file()
    return {"data_dir": str(data.parent if csv else data), "metadata_csv": str(data) if csv else "",
            "splits_dir": str(root / "splits" / name), "run_dir": str(run_dir), "figures_dir": str(run_dir / "figures"),
            "results_dir": str(run_dir / "results"), **HEADLESS}


def declared_parameters(notebook: Path, values: dict) -> dict:
    """The values `notebook` takes: its parameters cell's names, and the old names it still accepts."""
    declared = set(papermill.inspect_notebook(str(notebook))) | set(RENAMED.get(notebook.stem, {}))
    return {k: v for k, v in values.items() if k in declared}


def parameters_key(parameters: dict) -> str:
    return hashlib.sha256(json.dumps(parameters, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_data(data: Path) -> None:
    if not data.exists():
        raise DataError(f"{data} does not exist: give a photo folder or a metadata CSV (make run DATA=...)")
    if data.is_file() and data.suffix.lower() != ".csv":
        raise DataError(f"{data} is a file but not a .csv: give a photo folder or a metadata CSV")


def check_name(name: str) -> None:
    if name in RESERVED:
        raise DataError(f"runs/{name} belongs to the demo pipeline (make demo); choose another name with RUN=...")
    if not name or "/" in name or name.startswith("."):
        raise DataError(f"{name!r} cannot name a run folder; choose another with RUN=...")


def execute(notebook: Path, out: Path, parameters: dict) -> None:
    """Run one notebook; a DataError (or any error) raised in it comes back as one DataError line, not the
    notebook's traceback (the executed copy keeps the traceback for whoever wants it)."""
    try:
        papermill.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name=KERNEL,
                                   cwd=str(ROOT), progress_bar=False)
    except papermill.PapermillExecutionError as e:
        raise DataError(f"{notebook.stem} stopped: {e.ename}: {e.evalue} (the executed notebook, with its "
                        f"traceback: {out})") from None


def run(data: Path, name: str, extra: dict, root: Path = ROOT) -> Path:
    """Notebooks 01-05 on DATA into root/runs/NAME and root/splits/NAME; returns the run folder."""
    check_data(data)
    check_name(name)
    base = pipeline_parameters(data, name, root)
    run_dir = Path(base["run_dir"])
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = read_manifest(out_dir, PROGRESS) or {}
    stages = [nb for nb in notebooks() if nb.name.startswith(STAGES)]
    start, carry_on = time.time(), True
    for i, nb in enumerate(stages, 1):
        parameters = declared_parameters(nb, {**base, **extra})
        key = parameters_key(parameters)
        tag = f"[{i}/{len(stages)}] {nb.stem}"
        if carry_on and done.get(nb.stem, {}).get("parameters") == key:
            print(f"{tag}: finished before with these parameters, skipped", flush=True)
            continue
        carry_on = False  # a notebook run again: every later one reads what it writes, so they run again too
        print(f"{tag}: running ({time.time() - start:.0f} s so far)", flush=True)
        t0 = time.time()
        execute(nb, out_dir / nb.name, parameters)
        done[nb.stem] = {"parameters": key, "seconds": round(time.time() - t0, 1),
                         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(out_dir / PROGRESS, done)
        print(f"{tag}: done in {time.time() - t0:.0f} s ({time.time() - start:.0f} s so far) -> {out_dir / nb.name}",
              flush=True)
    print(f"{run_dir}: evaluated; figures in {run_dir / 'figures'}, the evaluation in {run_dir / 'eval'} "
          f"(browse it: make browse RUN={run_dir})")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="a photo folder or a metadata CSV")
    ap.add_argument("--run", default="", help="run name: runs/NAME and splits/NAME (default: DATA's folder name)")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="parameter for every notebook that declares it (papermill -p style; VALUE parsed as YAML)")
    args = ap.parse_args(argv)
    extra = {name: yaml.safe_load(value) for name, value in args.p}
    try:
        run(args.data.resolve(), args.run or run_name(args.data), extra)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
