"""The demo pipeline, and only the demo's: make the demo data if it is missing, then run every numbered notebook
headless, in order. Your own photos go through notebooks/run_photos.py (`make run DATA=...`), which keeps the
notebooks' real-photo defaults and writes runs/<name>, never runs/demo.

Each notebook runs with the demo's values (DEMO, DEMO_TRAIN) for the parameters it declares, its own defaults for
the rest; executed copies, with outputs, go to runs/demo/notebooks/ so the committed notebooks stay clean. Extra
`-p name value` pairs go to every notebook and win over the demo's.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jupytext
import papermill
import yaml

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "photo-retrieval"
HEADLESS = {"browser": False}  # what a notebook that declares it gets when nobody is there to click
# The notebooks' own defaults are for the user's photos (data/photos, packaged ImageNet weights, the head phase);
# the demo points them at its synthetic photos and trains a tiny random-init model at 64 px in a minute on a CPU.
DEMO = {"data_dir": "data/demo", "run_dir": "runs/demo"}
DEMO_TRAIN = dict(backbone="resnet10t", pretrained="", embed_dim=128, img_size=64, epochs=6, lr_backbone=1e-3,
                  lr_head=3e-3, p=6, head_epochs=0, unfreeze="all", lr_decay=1.0)
# Then the open-set pass (notebooks 01-03 again): the demo's individuals (metadata.csv; each photo its own encounter)
# split with notebook 01's default unknown_share of them held out of train, so val and test mix known and unknown
# individuals and notebook 03 writes the open-set figures (BAKS, BAUS, new-vs-known AUROC).
DEMO_OPEN_SET = {"task": "reid", "metadata_csv": "data/demo/metadata.csv", "split_mode": "open",
                 "splits_dir": "splits/demo-open", "run_dir": "runs/demo-open", "evaluate_test": True}
OPEN_SET_NOTEBOOKS = ("01_", "02_", "03_")
USER_DATA = {"data_dir", "metadata_csv"}  # parameters that point the demo's recipe at other photos: refused


def demo_parameters(notebook: Path, open_set: bool = False) -> dict:
    """The demo's values for the parameters this notebook declares (training settings for 02 only: they are the
    demo's tiny model, whatever another notebook means by the same name); open_set: those of the open-set pass."""
    declared = papermill.inspect_notebook(str(notebook))
    demo = {**DEMO, **HEADLESS, **(DEMO_TRAIN if notebook.stem == "02_train" else {}),
            **(DEMO_OPEN_SET if open_set else {})}
    return {k: v for k, v in demo.items() if k in declared}


def cells(nb) -> list[tuple[str, str, list[str]]]:
    """What the pair must agree on: each cell's type, source and tags (papermill needs `parameters`), in order.

    Cell ids, outputs, execution counts and the order of metadata keys are left out: they differ between two
    equivalent files and say nothing about what a notebook runs."""
    return [(c.cell_type, c.source, sorted(c.metadata.get("tags", []))) for c in nb.cells]


def sync_ipynb(py: Path) -> bool:
    """Rebuild py's .ipynb twin from the .py (the source) when it is missing or its cells differ; True if written.

    Contents, not file times, decide: on a fresh clone mtimes are arbitrary, and rewriting an .ipynb that is already
    in step would give its cells new ids and leave a tracked file modified."""
    nb = py.with_suffix(".ipynb")
    text = jupytext.read(py)
    if nb.exists() and cells(jupytext.read(nb)) == cells(text):
        return False
    jupytext.write(text, nb)
    return True


def notebooks() -> list[Path]:
    """Numbered notebooks in order; the .py twin is the source, so a stale or missing .ipynb is rebuilt from it."""
    out = []
    for py in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        if sync_ipynb(py):
            print(f"   {py.with_suffix('.ipynb').name} rebuilt from {py.name}", flush=True)
        out.append(py.with_suffix(".ipynb"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="parameter for every notebook (papermill -p style; VALUE parsed as YAML)")
    ap.add_argument("--out", default="runs/demo/notebooks", help="folder for the executed notebooks")
    ap.add_argument("--only", default="", help="run only notebooks whose name starts with this (e.g. 01)")
    args = ap.parse_args(argv)

    demo = ROOT / "data" / "demo"
    if not demo.exists():
        subprocess.run([sys.executable, str(ROOT / "data_prep" / "make_demo.py"), "--out", str(demo)], check=True)
    params = {name: yaml.safe_load(value) for name, value in args.p}
    if params.keys() & USER_DATA:
        print("error: run_all.py runs the demo only (a tiny random-init model at 64 px, into runs/demo); for your "
              "photos use `make run DATA=<photo folder or metadata CSV>` (notebooks/run_photos.py)", file=sys.stderr)
        return 2
    out_dir = ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    numbered = notebooks()
    open_set = [(nb, True) for nb in numbered if nb.name.startswith(OPEN_SET_NOTEBOOKS)]
    passes = [(nb, False) for nb in numbered] + open_set
    for nb, open_set in passes:
        if args.only and not nb.name.startswith(args.only):
            continue
        t0 = time.time()
        out = out_dir / (f"open_set_{nb.name}" if open_set else nb.name)
        print(f"== {nb.name}{' (open-set pass)' if open_set else ''}", flush=True)
        papermill.execute_notebook(str(nb), str(out), parameters={**demo_parameters(nb, open_set), **params},
                                   kernel_name=KERNEL, cwd=str(ROOT), progress_bar=False)
        print(f"   done in {time.time() - t0:.0f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
