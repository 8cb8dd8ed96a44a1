"""The training entry point torchrun and the notebook share, and the notebook's launcher for several processes.

    torchrun --nproc_per_node 4 -m lib.train.launch --config runs/photos/run_config.json

trains into the config file's folder (or --run-dir); notebook 02 with nproc > 1 writes that file and starts torchrun
itself (`train`), streaming its output into the notebook.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from torch.distributed.elastic.multiprocessing.errors import record

from lib.core.state_io import write_json
from lib.train.config import RunConfig
from lib.train.distributed import join_world, leave_world
from lib.train.run import train_run

CONFIG_FILE = "run_config.json"


def write_config(run_dir: str | os.PathLike, config: RunConfig) -> Path:
    return write_json(Path(run_dir) / CONFIG_FILE, config.as_dict(), indent=1)


def torchrun_command(config_file: Path, nproc: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: int = 29500, fresh: bool = False,
                     mlflow_uri: str = "") -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, so it is this environment's) on this module. One machine:
    --standalone, a rendezvous on a free local port; several: every machine runs this with its node_rank."""
    where = (["--standalone"] if nnodes == 1 else
             ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--master_addr", master_addr,
              "--master_port", str(master_port)])
    return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(nproc),
            "-m", "lib.train.launch", "--config", str(config_file), "--no-progress",
            *(["--fresh"] if fresh else []), *(["--mlflow-uri", mlflow_uri] if mlflow_uri else [])]


# 9 parameters: the run (run_dir, config, fresh, mlflow_uri) and torchrun's own rendezvous flags, named as torchrun
# names them, which notebook 02's parameters cell passes one for one
def train(run_dir: str, config: RunConfig, nproc: int = 1, nnodes: int = 1, node_rank: int = 0,
          master_addr: str = "127.0.0.1", master_port: int = 29500, fresh: bool = False,
          mlflow_uri: str = "") -> pd.DataFrame:
    """Train in this process (nproc = nnodes = 1) or under torchrun with nproc processes per machine; returns the
    history either way. torchrun's output streams through line by line; a failed run raises with its last lines."""
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"nproc and nnodes must be >= 1, got nproc={nproc}, nnodes={nnodes}")
    if nproc == 1 and nnodes == 1:
        return train_run(run_dir, config, fresh=fresh, mlflow_uri=mlflow_uri)
    cmd = torchrun_command(write_config(run_dir, config), nproc, nnodes, node_rank, master_addr, master_port,
                           fresh, mlflow_uri)
    print(" ".join(cmd[1:]))
    tail = collections.deque(maxlen=40)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=Path.cwd()) as proc:
        for line in proc.stdout:
            print(line, end="")
            tail.append(line)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with status {proc.returncode}; its last lines:\n" + "".join(tail))
    return pd.read_csv(Path(run_dir) / "metrics.csv")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help=f"a run config as JSON ({CONFIG_FILE} of notebook 02)")
    ap.add_argument("--run-dir", default="", help="where the run writes (default: the config file's folder)")
    ap.add_argument("--fresh", action="store_true", help="start over; earlier checkpoints move to replaced-<time>/")
    ap.add_argument("--mlflow-uri", default="")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (a log rather than a terminal)")
    ap.add_argument("--stop-after-epoch", type=int, default=None, help="end after this epoch, as if killed")
    args = ap.parse_args(argv)
    path = Path(args.config)
    try:
        config = RunConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        sys.exit(f"{path}: not a readable run config ({e})")

    @record  # torchrun's summary then carries this rank's traceback
    def run() -> None:
        world, _ = join_world(config.device.device)
        try:
            train_run(args.run_dir or str(path.parent), config, fresh=args.fresh, mlflow_uri=args.mlflow_uri,
                      progress=not args.no_progress, stop_after_epoch=args.stop_after_epoch)
        finally:
            leave_world(world)

    run()


if __name__ == "__main__":
    main()
