"""A trained run as files to share: the model's weights as safetensors (no pickle, so opening them can run no code)
and its config as JSON, which together rebuild the model without the run folder.

    python -m lib.train.export RUN_DIR OUT_DIR [--checkpoint best]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import safetensors.torch

from lib.core.errors import DataError
from lib.core.state_io import write_bytes, write_json
from lib.train.config import RunConfig
from lib.train.model import EmbeddingModel, create_model
from lib.train.trained_run import load_trained

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str = "best",
               overwrite: bool = False) -> Path:
    """Write OUT_DIR/model.safetensors and OUT_DIR/config.json (the run's config, class_to_idx, the epoch and the
    checkpoint's sha256); existing files are kept unless `overwrite`."""
    out = Path(out_dir)
    existing = [out / name for name in (WEIGHTS, CONFIG) if (out / name).exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} exists; pass overwrite=True (--overwrite) to replace it")
    run = load_trained(run_dir, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in run.model.state_dict().items()}
    write_bytes(out / WEIGHTS, safetensors.torch.save(state))
    meta = {**run.config, "epoch": run.epoch, "checkpoint": run.checkpoint.name,
            "checkpoint_sha256": run.checkpoint_sha256}
    write_json(out / CONFIG, meta)
    return out


def load_exported(out_dir: str | os.PathLike) -> tuple[EmbeddingModel, dict]:
    """(the model in eval mode on the CPU, the exported config) from export_run's files."""
    out = Path(out_dir)
    config = json.loads((out / CONFIG).read_text())
    settings = RunConfig.from_dict(config)
    model = create_model(dataclasses.replace(settings.model, pretrained=""))
    model.load_state_dict(safetensors.torch.load_file(str(out / WEIGHTS)))
    return model.eval(), config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.train.export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--checkpoint", default="best", help="best | latest | a .pt file name in RUN_DIR")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out_dir, args.checkpoint, args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.run_dir} ({args.checkpoint}) -> {out / WEIGHTS}, {out / CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
