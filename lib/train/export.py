"""A trained run as files to deploy or share, in one folder that describes itself:

- model.onnx: the embedding model as an ONNX graph (input `x`, a float32 (N, 3, S, S) batch preprocessed as
  config.json's `preprocessing` says; output `y`, (N, D) unit-length embeddings), checked against PyTorch's
  embeddings of a few of the run's photos before anything is written;
- model.safetensors + config.json: the weights (no pickle, so opening them can run no code) and the run's config,
  which rebuild the PyTorch model (load_exported);
- what photo-predict --export reads besides the model, at the paths the run folder has them: the gallery index
  notebook 03 saved (index/, enrolled photos included) and its thresholds (eval/val/);
- export.json, written last: each file's sha256 (lib.core.state_io manifest), so a half-written, tampered or mixed
  export is refused by name (lib.evaluate.exported).

    python -m lib.train.export RUN_DIR OUT_DIR [--checkpoint best] [--no-gallery] [--overwrite]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from lib.core.errors import DataError
from lib.core.state_io import manifest_problem, read_bytes_hashed, read_manifest, write_bytes, write_json, write_manifest
from lib.data.dataset import IndexDataset
from lib.data.transforms import build_transforms
from lib.retrieval.faiss_index import INDEX_FILES, INDEX_MANIFEST
from lib.retrieval.onnx_engine import INPUT, OUTPUT, OnnxForward, onnx_bytes
from lib.train.config import RunConfig
from lib.train.model import EmbeddingModel, create_model
from lib.train.trained_run import TrainedRun, load_trained, split_rows, trained_min_size

WEIGHTS, CONFIG, ONNX, MANIFEST = "model.safetensors", "config.json", "model.onnx", "export.json"
INDEX_DIR = "index"  # the run's saved gallery index (lib.evaluate.gallery_index.INDEX_DIR), enrolled photos included
# notebook 03's choices photo-predict applies (lib.evaluate.predict.THRESHOLDS_FILE, cluster_eval.CLUSTER_FILE)
CHOICES = ("eval/val/thresholds.json", "eval/val/clustering.json")
PREPROCESSING_KEYS = ("input_size", "resize", "interpolation", "mean", "std", "embedding_dim")
INTERPOLATION = "bicubic"  # what load_trained's eval transform resizes with (build_transforms' default)
CHECK_PHOTOS = 8
# ONNX Runtime computes in float32 as PyTorch does, but fuses BatchNorm into the convolutions and sums in its own
# order: each layer's result moves by a few float32 roundings (eps 1.2e-7) of its fan-in, and tens of layers add up
# to ~1e-6 on a unit-length embedding. 1e-4 leaves two orders of magnitude for deeper nets and larger inputs, while
# a wrong weight, layer or normalisation moves it by 1e-2 or more.
ONNX_ATOL = 1e-4


def preprocessing(run: TrainedRun) -> dict:
    """What a photo goes through before model.onnx, as plain values another runtime can follow; eval_transform
    rebuilds the run's eval transform from it (refused by export_run if the two differ)."""
    dc, s = run.model.data_config, run.settings.aug.img_size
    return {"input_size": [3, s, s], "resize": run.settings.aug.resize, "interpolation": INTERPOLATION,
            "mean": [float(m) for m in dc["mean"]], "std": [float(v) for v in dc["std"]],
            "embedding_dim": run.settings.model.embed_dim,
            "pixels": "RGB scaled to [0, 1], then (x - mean) / std per channel",
            "resize_modes": "crop: shorter side to S, centre crop | squash: the whole photo to S x S | pad: longer "
                            "side to S, padded to a square with the mean colour",
            "output": "L2-normalised (unit length) float32 embeddings; distance = squared L2 = 2 - 2 cosine",
            "transform": repr(run.eval_tf)}


def eval_transform(prep: dict):
    """The eval transform `preprocessing` describes (lib.data.transforms)."""
    return build_transforms(prep["input_size"][-1], prep["mean"], prep["std"], preset="none",
                            interpolation=prep["interpolation"], resize=prep["resize"])[1]


def check_inputs(run: TrainedRun, n: int = CHECK_PHOTOS) -> tuple[torch.Tensor, str]:
    """(a batch of up to n of the run's photos through its eval transform, what they are); random inputs when none
    of its photos can be read here."""
    try:
        rows = split_rows(run)
    except DataError:
        rows = None
    if rows is not None and len(rows):
        rows = rows.iloc[np.unique(np.linspace(0, len(rows) - 1, 4 * n).round().astype(int))]
        d = run.settings.data
        dataset = IndexDataset(rows, d.data_dir, run.eval_tf, {}, d.cache_dir or None)
        found = []
        for i, path in enumerate(dataset.paths):
            if len(found) < n and Path(path).is_file():
                try:
                    found.append(dataset[i][0])
                except (OSError, ValueError):
                    continue
        if found:
            return torch.stack(found), f"{len(found)} of the run's photos"
    s = run.settings.aug.img_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(0)), "random inputs (no photo of the run here)"


def check_onnx(run: TrainedRun, graph: bytes) -> dict:
    """The ONNX graph's embeddings against PyTorch's on check_inputs: {'max_abs_diff', 'tolerance', 'on'}; a
    DataError when they differ by more than ONNX_ATOL."""
    x, on = check_inputs(run)
    with torch.no_grad():
        expected = run.model.eval()(x).numpy()
    got = OnnxForward.from_onnx(graph)(x).numpy()
    diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not diff <= ONNX_ATOL:
        raise DataError(f"{run.checkpoint}: the ONNX export's embeddings differ from PyTorch's by up to {diff:.3g} "
                        f"(> {ONNX_ATOL:g}) on {on}; nothing written. Report it with the backbone's name "
                        f"({run.settings.model.backbone}); model.safetensors alone: --no-onnx")
    return {"max_abs_diff": diff, "tolerance": ONNX_ATOL, "on": on}


def carried_files(run: TrainedRun) -> tuple[list[str], str]:
    """(files of the run folder photo-predict --export needs, relative to it; why there is no gallery, or '').
    The gallery index goes only when it was saved whole (its manifest) for this checkpoint and eval transform."""
    run_dir, folder = run.run_dir, run.run_dir / INDEX_DIR
    choices = [c for c in CHOICES if (run_dir / c).is_file()]
    info = read_manifest(folder, INDEX_MANIFEST)
    if not (folder / INDEX_FILES[0]).exists():
        return choices, f"no gallery index is saved in {folder} (notebook 03, or one photo-predict {run_dir}, saves it)"
    problem = manifest_problem(folder, info)
    if problem or info.get("checkpoint_sha256") != run.checkpoint_sha256 or info.get("transform") != repr(run.eval_tf):
        return choices, (f"the gallery index in {folder} is {problem or 'for another checkpoint or eval transform'} "
                         f"(photo-predict {run_dir} --checkpoint {run.checkpoint.name} rebuilds it)")
    index = [str(p.relative_to(run_dir)) for p in sorted(folder.rglob("*")) if p.is_file()
             and not p.name.startswith(".") and not p.name.endswith(".bak")]
    return choices + index, ""


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str = "best",
               overwrite: bool = False, gallery: bool = True, onnx: bool = True) -> Path:
    """Write the export (the module's docstring) to OUT_DIR; an existing export is kept unless `overwrite`.
    gallery: carry the run's saved gallery index and thresholds (said and skipped when there are none to carry)."""
    out = Path(out_dir)
    existing = [out / name for name in (WEIGHTS, CONFIG, ONNX, MANIFEST) if (out / name).exists()]
    if existing and not overwrite:
        raise DataError(f"{existing[0]} exists; pass overwrite=True (--overwrite) to replace it")
    if out.resolve() == Path(run_dir).resolve():
        raise DataError(f"{out} is the run folder itself; export into another folder (e.g. {out / 'export'})")
    run = load_trained(run_dir, checkpoint)
    prep = preprocessing(run)
    if repr(eval_transform(prep)) != prep["transform"]:
        raise DataError(f"{run.checkpoint}: its eval transform cannot be described for export ({prep['transform']})")
    graph = onnx_bytes(run.model, tuple(prep["input_size"])) if onnx else None
    check = check_onnx(run, graph) if onnx else None
    carried, why = carried_files(run) if gallery else ([], "not asked for (--no-gallery)")
    _clear(out, overwrite)
    write_bytes(out / WEIGHTS, safetensors.torch.save({k: v.contiguous() for k, v in run.model.state_dict().items()}))
    if graph is not None:
        write_bytes(out / ONNX, graph)
    for rel in carried:
        write_bytes(out / rel, read_bytes_hashed(run.run_dir / rel)[0])
    index_ok = any(rel.startswith(INDEX_DIR + "/") for rel in carried)
    if index_ok and manifest_problem(out / INDEX_DIR, read_manifest(out / INDEX_DIR, INDEX_MANIFEST)):
        raise DataError(f"{run.run_dir / INDEX_DIR} changed while it was copied; export again")
    meta = {**run.config, "epoch": run.epoch, "checkpoint": run.checkpoint.name,
            "checkpoint_sha256": run.checkpoint_sha256, "preprocessing": prep, "min_size": trained_min_size(run),
            "onnx": check and {"file": ONNX, "input": INPUT, "output": OUTPUT, "check": check},
            "gallery": INDEX_DIR if index_ok else None, "no_gallery": why}
    write_json(out / CONFIG, meta)
    write_manifest(out, MANIFEST, [WEIGHTS, CONFIG, *([ONNX] if graph else []), *carried],
                   {"run_dir": str(run.run_dir), "checkpoint_sha256": run.checkpoint_sha256})
    return out


def _clear(out: Path, overwrite: bool) -> None:
    """Before writing: the old manifest removed first, so an export stopped half way is never vouched for by the
    export it replaces; with `overwrite`, that export's gallery and choices too (the new one may carry none)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    if overwrite:
        shutil.rmtree(out / INDEX_DIR, ignore_errors=True)
        for rel in CHOICES:
            (out / rel).unlink(missing_ok=True)


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
    ap.add_argument("--no-gallery", action="store_true",
                    help="leave out the run's gallery index and thresholds (photo-predict --export then needs "
                         "--gallery)")
    ap.add_argument("--no-onnx", action="store_true", help="safetensors and config only (no model.onnx)")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out_dir, args.checkpoint, args.overwrite, not args.no_gallery,
                         not args.no_onnx)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    config = json.loads((out / CONFIG).read_text())
    print(f"{args.run_dir} ({args.checkpoint}) -> {out}")
    if config["onnx"]:
        check = config["onnx"]["check"]
        print(f"{ONNX}: max |ONNX - PyTorch| {check['max_abs_diff']:.2e} on {check['on']} "
              f"(tolerance {check['tolerance']:g})")
    print(f"gallery: {out / INDEX_DIR}" if config["gallery"] else f"note: no gallery carried: {config['no_gallery']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
