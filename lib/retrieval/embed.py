"""Embedding extraction: a model and a dataset in, one float32 row per dataset row out (same order); and a cache
that computes them once per (checkpoint, data, transform, TTA, precision).

Cache files live in one folder (a run's `embeddings/`), named by a hash of everything that changes the result:
the checkpoint file's content, each image file read (path, size, mtime), the transform's repr, TTA and the
autocast precision. A changed input gives another name, so a stale file is never read, only left behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lib.core import cpu_probe
from lib.core.cpu_probe import ForwardChoice, cpu_forward_choice
from lib.core.device import DeviceSettings
from lib.core.state_io import read_cache, save_npz, try_write_cache
from lib.retrieval.onnx_engine import OnnxForward, onnx_available

# images per loaded batch when embedding (validation, evaluation, prediction, probe), and per forward pass on a GPU:
# fits any GPU at 224-480 px in inference mode; a bigger batch speeds a big GPU little since decoding is the
# bottleneck. On the CPU the forward runs in the probe's smaller batches (forward_choice).
EMBED_BATCH_SIZE = 64


@contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to n inside the block, the caller's restored after it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _loaded_batches(loader):
    """The loader's batches, each fetched at one intra-op thread; the caller's forward between them keeps its own.
    Without workers this process decodes and transforms each image, and the transform's tensor ops (~50k values at
    128 px) lose more to OpenMP's fork and join across cores than they gain, most of all beside busy processes
    (docs/benchmarks.md, "Figures behind lib's defaults"). Workers run at one thread already
    (PyTorch sets it), and the elementwise transform gives the same values at any thread count."""
    batches = iter(loader)
    while True:
        with intra_op_threads(1):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def forward_choice(model: torch.nn.Module, settings: DeviceSettings, input_shape: tuple[int, ...], n_images: int,
                   batch_size: int = EMBED_BATCH_SIZE) -> ForwardChoice:
    """Engine, layout and images per forward pass of an extraction (the embedding of an image depends on none of
    them, to float32 rounding). On the CPU: the fastest layout and batch by the probe (lib.core.cpu_probe), and ONNX
    Runtime where it is installed and the job repays the export (PROBE_MIN_IMAGES or more images). On a GPU: the
    settings' layout at the loader's batch, eager."""
    if settings.device != "cpu":
        return ForwardChoice(settings.channels_last, batch_size, "GPU: device settings")
    choice = cpu_forward_choice(model, input_shape, n_images)
    if n_images >= cpu_probe.PROBE_MIN_IMAGES and onnx_available():
        return replace(choice, engine="onnxruntime")
    return choice


def state_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers (in NCHW order whatever their memory layout): names which weights
    made a feature."""
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# the last ONNX export, by what it was made from: the head phase's feature pass extracts the same frozen backbone
# once per view, and evaluation the same checkpoint for gallery and queries, so each pays one export (seconds)
_exports: dict[tuple, OnnxForward] = {}


def engine_for(model: torch.nn.Module, choice: ForwardChoice, input_shape: tuple[int, ...]):
    """The callable that runs the choice's engine: the model itself, or its ONNX Runtime export (kept for the next
    extraction of the same module, weights and input size)."""
    if choice.engine != "onnxruntime":
        return model
    key = (type(model).__qualname__, repr(model), state_sha256(model), input_shape, torch.get_num_threads())
    if key in _exports:
        return _exports[key]
    try:
        net = OnnxForward(model, input_shape)
    except Exception as e:  # noqa: BLE001  (an architecture the exporter cannot trace still extracts, eagerly)
        warnings.warn(f"ONNX export of {type(model).__name__} failed ({type(e).__name__}: {e}); extracting with "
                      "eager PyTorch", stacklevel=3)
        return model
    _exports.clear()
    _exports[key] = net
    return net


@torch.inference_mode()
def extract_embeddings(model: torch.nn.Module, dataset: Dataset, settings: DeviceSettings, batch_size: int = EMBED_BATCH_SIZE,
                       progress: bool = False, desc: str = "embed", tta: bool = False) -> np.ndarray:
    """tta: flip TTA, the mean of an image's and its mirror image's embeddings, re-normalised to unit length.
    `model` may be a ready forward that is no nn.Module (an OnnxForward of an export's model.onnx), which runs as it
    is, on the CPU, in the loader's batches."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=settings.num_workers,
                        pin_memory=settings.pin_memory)
    exported = not isinstance(model, torch.nn.Module)
    was_training = not exported and model.training
    choice = net = None
    if exported:
        choice, net = ForwardChoice(False, batch_size, "an exported model", "onnxruntime"), model
    else:
        model.eval()
    out = []
    # tqdm.auto opens a second, unused iterator of the loader, and each draws a seed from the global RNG: kept, since
    # training draws from that RNG after validating and would change with one draw fewer
    for batch, _ in _loaded_batches(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        if choice is None:
            choice = forward_choice(model, settings, tuple(batch.shape[1:]), len(dataset), batch_size)
            net = engine_for(model, choice, tuple(batch.shape[1:]))
        for x in batch.split(choice.batch_size):
            # the input's layout alone sets the convolutions' (oneDNN follows the input), so the caller's weights are
            # left as they are
            x = x.to(settings.device, non_blocking=True, memory_format=choice.memory_format)
            with settings.autocast():
                emb = net(x).float()
                if tta:
                    emb = torch.nn.functional.normalize(emb + net(torch.flip(x, dims=[3])).float(), dim=1)
            out.append(emb.cpu())
    if not exported:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def files_fingerprint(paths) -> str:
    """Hash of the files in this order by path, size and mtime: any edited, replaced or reordered image changes it."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.fspath(p)}\x1f{st.st_size}\x1f{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def embedding_key(checkpoint_sha256: str, data_fingerprint: str, transform: str, tta: bool, precision: str,
                  extra: dict | None = None) -> dict:
    """Everything an embedding depends on besides the model code; its hash names the cache file. `extra`: what else
    the caller's images depend on (e.g. the probe's background masks)."""
    return {"checkpoint_sha256": checkpoint_sha256, "data_fingerprint": data_fingerprint, "transform": transform,
            "tta": bool(tta), "precision": precision, **(extra or {})}


# 10 parameters: what is embedded (model, dataset, settings), what keys its cache (cache_dir, checkpoint_sha256, tta,
# extra) and how the pass shows (batch_size, progress, desc), each passed on to extract_embeddings or the key as is
def cached_embeddings(model: torch.nn.Module, dataset: Dataset, settings: DeviceSettings, cache_dir: str | os.PathLike,
                      checkpoint_sha256: str, tta: bool = False, batch_size: int = EMBED_BATCH_SIZE, progress: bool = False,
                      desc: str = "embed", extra: dict | None = None) -> tuple[np.ndarray, dict]:
    """(embeddings, info) for an IndexDataset-like `dataset` (it has `.paths` and `.transform`), from the cache when
    it holds them, else extracted and stored. info: the key, `file`, `cached` and `ms_per_image` (of extraction).
    checkpoint_sha256 may name any model state (e.g. a backbone and the hash of its weights file); `extra` joins the key.
    """
    key = embedding_key(checkpoint_sha256, files_fingerprint(dataset.paths), repr(dataset.transform), tta,
                        settings.precision, extra)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{name}.npz"
    cached = read_cache(path, _read_embeddings)
    if cached is not None:
        emb, stored = cached
        return emb, {**key, **stored, "file": str(path), "cached": True}
    t0 = time.perf_counter()
    emb = extract_embeddings(model, dataset, settings, batch_size, progress=progress, desc=desc, tta=tta)
    info = {"ms_per_image": 1000 * (time.perf_counter() - t0) / max(len(dataset), 1), "n": len(emb)}
    try_write_cache(path, save_npz, embeddings=emb, paths=np.asarray([str(p) for p in dataset.paths]),
                    info=json.dumps({**key, **info}))
    return emb, {**key, **info, "file": str(path), "cached": False}


def _read_embeddings(path: Path) -> tuple[np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as f:
        return f["embeddings"], json.loads(str(f["info"]))
