"""`make browse`: notebook 05's query browser served alone as a web page by Voilà, on 127.0.0.1 only.

The page is notebook 05 itself, given the page's parameters by papermill (not run) and served with
- the `browse` template (voila_template/ beside this file): Voilà's lab template less its CDN stylesheet links
  (Voilà's own bundle holds the same Font Awesome, and the page must work offline) and less the notebook's prose;
- only the widget manager among the JupyterLab front-end extensions: the others in the venv (jupytext's) are built
  for the pinned JupyterLab, newer than the one inside Voilà, and break its page (RUNTIME-012, "The getter for the
  shared module is not a function").

    .venv/bin/python -m lib.analysis.browse_server [--run runs/NAME] [--split val] [--port 8866]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "05_retrieval_gallery.ipynb"
TEMPLATES = Path(__file__).resolve().parent / "voila_template"
KERNEL = "photo-retrieval"
HOST = "127.0.0.1"
DEFAULT_PORT = 8866
# Voilà's ipywidgets 8 manager, and ipywidgets' own front end, which registers the widget classes it loads
# (without it: "No version of module @jupyter-widgets/base is registered")
WIDGET_EXTENSIONS = ["@voila-dashboards/widgets-manager8", "@jupyter-widgets/jupyterlab-manager"]


def free_port(start: int = DEFAULT_PORT, tries: int = 50) -> int:
    """The first port from `start` on that nothing listens on at HOST."""
    for port in range(start, start + tries):
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + tries - 1} on {HOST}")


def prepare_page(folder: Path, run_dir: str, split: str, runs_root: str, k: int, thumbs_dir: str) -> Path:
    """Notebook 05 with the page's parameters injected (papermill's prepare-only: nothing runs), in `folder`."""
    import nbformat
    import papermill

    params = dict(run_dir=run_dir, split=split, runs_root=runs_root, k=k, thumbs_dir=thumbs_dir, report=False,
                  browser=True)
    nb = papermill.execute_notebook(str(NOTEBOOK), None, parameters=params, prepare_only=True, kernel_name=KERNEL,
                                    progress_bar=False, cwd=str(ROOT))
    nb.metadata["title"] = f"Query browser - {Path(run_dir).name}"
    path = folder / "query_browser.ipynb"
    nbformat.write(nb, path)
    return path


def voila_command(notebook: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "voila", str(notebook), "--no-browser", f"--Voila.ip={HOST}", f"--port={port}",
            "--Voila.port_retries=0", "--template=browse", "--theme=light", "--strip_sources=True",
            # a kernel that has run the page before anyone asks for it: the first render takes about half as long
            # (docs/benchmarks.md, "The browse page"); Voilà starts the next one as each page opens (so a page shows
            # the runs on disk as they were when the previous page opened; the run and split pickers read the disk)
            "--VoilaConfiguration.preheat_kernel=True",
            *(f"--VoilaConfiguration.extension_allowlist={name}" for name in WIDGET_EXTENSIONS)]


def serve(workdir: Path, run_dir: str, split: str = "val", port: int | None = None, runs_root: str = "runs",
          k: int = 5, thumbs_dir: str = "cache/thumbs", **popen_kw) -> tuple[subprocess.Popen, str]:
    """Start Voilà on the page; (the process, the page's address). The caller stops the process and removes
    `workdir`, where the prepared notebook goes: a folder inside the repository, since notebook 05 finds the
    repository from the folder it runs in.
    """
    port = port or free_port()
    page = prepare_page(Path(workdir), run_dir, split, runs_root, k, thumbs_dir)
    env = {**os.environ, "JUPYTER_PATH": os.pathsep.join(filter(None, [str(TEMPLATES),
                                                                        os.environ.get("JUPYTER_PATH")]))}
    proc = subprocess.Popen(voila_command(page, port), cwd=ROOT, env=env, **popen_kw)
    return proc, f"http://{HOST}:{port}/"


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop Voilà (it shuts its kernels down on SIGTERM); kill it if it does not stop in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    from lib.analysis.run_finder import newest_run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="run folder to open (default: the one evaluated last under --runs-root)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--runs-root", default="runs", help="the page offers every evaluated run in this folder")
    ap.add_argument("--port", type=int, default=0, help=f"default: the first free one from {DEFAULT_PORT}")
    ap.add_argument("--k", type=int, default=5, help="gallery photos shown per query")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the runs' and photos' paths are relative to the repository
    run = args.run or newest_run(args.runs_root)
    if not run:
        print(f"no evaluated run under {args.runs_root}/: run `make demo` (or notebooks 01-03 on your photos) first",
              file=sys.stderr)
        return 1
    # a plain `kill` too must stop Voilà and remove the prepared notebook, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".browse-", dir=ROOT / "runs") as workdir:
        proc, url = serve(Path(workdir), run, args.split, args.port or None, args.runs_root, args.k)
        print(f"\nquery browser of {run} ({args.split}): {url}   (Ctrl-C stops it)\n", flush=True)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 130
        finally:
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())
