"""The CPU's memory layout and batch size for a model's forward (and forward + backward), chosen by what is fastest.

On a CPU the backbone's passes are the whole cost, and the layout and batch move them several-fold: oneDNN's
convolutions run channels_last (NHWC) without reordering every activation, and small batches keep a 320 px activation
in cache (bench/bench_embed.py; docs/benchmarks.md, "CPU extraction"). Which batch wins depends on the model, the
input size and the thread count, so a short probe times each candidate once per (model, input shape, threads, mode)
and the answer is stored in a JSON file under the user's cache folder: the speed is the machine's, not a run's, and
predict and the probe extract with no run folder. A job too small to repay the probe takes the rule the benchmark
supports (RULE).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lib.core.state_io import read_json_cache, try_write_cache, write_json

# batch sizes the probe tries: small batches keep a 320 px activation in cache. Lite0 at 320 px on 2 cores, eager
# channels_last: 4 won every probe of the benchmark, and 2 measured level with 4, so the list starts at 4
# (docs/benchmarks.md, "Figures behind lib's defaults")
CANDIDATE_BATCHES = (4, 8, 16)
# the backbone phase's smallest pass: the training step runs its batch through the backbone in chunks of the
# probe's size (lib.train.step.TrainStep), the head and the loss on the whole batch
MIN_CHUNK = 4
# fewer images than this: the probe (2 rounds x 2 layouts x 3 batches, ~220 images) and the ONNX export would cost
# more than they save; the rule and eager PyTorch are used
PROBE_MIN_IMAGES = 512
# what the probe picks for Lite0 at 320 px on 2 cores (docs/benchmarks.md, "CPU extraction"): the choice without a probe
RULE = {"channels_last": True, "batch_size": 4}


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "photo-retrieval" / "cpu_probe.json"


@dataclass(frozen=True)
class ForwardChoice:
    channels_last: bool
    batch_size: int
    why: str  # 'probe: ...' (measured now), 'cached probe: ...' or 'rule: ...'
    engine: str = "eager"  # or 'onnxruntime' (lib.retrieval.onnx_engine), which takes NCHW and lays it out itself

    @property
    def memory_format(self) -> torch.memory_format:
        """Of the input: ONNX Runtime takes NCHW (and lays it out in its own blocked format)."""
        return torch.channels_last if self.channels_last and self.engine == "eager" else torch.contiguous_format

    def describe(self) -> str:
        layout = "NCHW in" if self.engine == "onnxruntime" else "channels_last" if self.channels_last else "NCHW"
        return f"{self.engine}, {layout}, batch {self.batch_size} ({self.why})"


def probe_key(model: nn.Module, input_shape: tuple[int, ...], threads: int, train: bool,
              batches: tuple[int, ...]) -> str:
    """What the answer depends on: the architecture (its repr: layers and their shapes, not the weights), which
    parameters train (a backward through the last stage alone costs less), the image's (C, H, W), the intra-op
    threads, forward or forward + backward, the candidates, and the torch build and the CPU's vector unit."""
    trains = [name for name, p in model.named_parameters() if p.requires_grad] if train else []
    text = json.dumps([repr(model), trains, list(input_shape), threads, train, list(batches), torch.__version__,
                       torch.backends.cpu.get_cpu_capability()])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _timed(model: nn.Module, shape: tuple[int, ...], batch: int, channels_last: bool, train: bool) -> float:
    """Seconds per image of one pass at this batch and layout, after one untimed pass (oneDNN builds its kernels
    for a new shape on the first call)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, *shape).contiguous(memory_format=fmt)

    def step():
        if train:
            model(x).float().sum().backward()
        else:
            with torch.inference_mode():
                model(x)

    step()
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) / batch


def probe(model: nn.Module, input_shape: tuple[int, ...], train: bool = False,
          batches: tuple[int, ...] = CANDIDATE_BATCHES, repeats: int = 2) -> dict[tuple[bool, int], float]:
    """Images/s of each (channels_last, batch), the best of `repeats` interleaved rounds (on a shared machine the
    fastest round is the one the neighbours disturbed least). Runs on a copy: training mode's BatchNorm statistics,
    gradients and the channels_last weights stay off the caller's model."""
    net = copy.deepcopy(model).train(train)
    if not train:
        net.requires_grad_(False)
    best: dict[tuple[bool, int], float] = {}
    for _ in range(repeats):
        for channels_last in (False, True):
            # the weights follow the layout as the training loop converts them; in inference the input alone does
            net.to(memory_format=torch.channels_last if channels_last and train else torch.contiguous_format)
            for batch in batches:
                seconds = _timed(net, input_shape, batch, channels_last, train)
                best[channels_last, batch] = max(best.get((channels_last, batch), 0.0), 1 / seconds)
            net.zero_grad(set_to_none=True)
    return best


def _load(path: Path) -> dict:
    return read_json_cache(path)  # none yet, or cut short: probe again


def _store(path: Path, key: str, entry: dict) -> None:
    """Never fatal: a cache folder that cannot be written (a ~/.cache that is a file, a read-only home) is said once
    and the probe's answer is used without being kept."""
    try_write_cache(path, write_json, {**_load(path), key: entry}, indent=1)


def cpu_forward_choice(model: nn.Module, input_shape: tuple[int, ...], n_images: int | None = None,
                       train: bool = False, batches: tuple[int, ...] = CANDIDATE_BATCHES,
                       path: str | os.PathLike | None = None) -> ForwardChoice:
    """The fastest layout and batch for `model` on images of `input_shape` (C, H, W) at torch's current thread count:
    a stored probe's answer, else a new probe (stored), else, for a job of fewer than PROBE_MIN_IMAGES images,
    RULE. train: forward + backward, as the backbone phase runs it."""
    path = Path(path) if path else cache_file()
    threads = torch.get_num_threads()
    key = probe_key(model, tuple(input_shape), threads, train, tuple(batches))
    stored = _load(path).get(key)
    if stored:
        return ForwardChoice(stored["channels_last"], stored["batch_size"],
                             f"cached probe: {stored['images_per_s']:.1f} img/s at {threads} threads, {path}")
    if n_images is not None and n_images < PROBE_MIN_IMAGES:
        return ForwardChoice(RULE["channels_last"], max(b for b in batches if b <= RULE["batch_size"]),
                             f"rule: {n_images} images are too few to repay a probe")
    speeds = probe(model, tuple(input_shape), train, batches)
    (channels_last, batch), rate = max(speeds.items(), key=lambda kv: kv[1])
    nchw = max(v for (cl, _), v in speeds.items() if not cl)
    table = {f"{'channels_last' if cl else 'nchw'}/{b}": round(v, 2) for (cl, b), v in speeds.items()}
    _store(path, key, {"channels_last": channels_last, "batch_size": batch, "images_per_s": rate,
                       "threads": threads, "input_shape": list(input_shape), "train": train, "all": table})
    return ForwardChoice(channels_last, batch, f"probe: {rate:.1f} img/s at {threads} threads, best NCHW {nchw:.1f}")


def cpu_train_choice(model: nn.Module, input_shape: tuple[int, ...], effective_batch: int, split: bool = True,
                     min_chunk: int = MIN_CHUNK, path: str | os.PathLike | None = None) -> ForwardChoice:
    """The backbone phase's layout and backbone pass on the CPU: forward + backward of `model` as that phase trains
    it (its trainable stages, its BatchNorm mode) probed at the divisors of the step's batch from min_chunk to the
    largest extraction candidate; the whole batch when none divides it or when split=False (the layout alone is
    chosen). The weights take the layout too (the loop's model.to(memory_format))."""
    top = min(effective_batch, max(CANDIDATE_BATCHES))
    divisors = tuple(d for d in range(min_chunk, top + 1) if effective_batch % d == 0)
    batches = divisors if split and divisors else (effective_batch,)
    return cpu_forward_choice(model, input_shape, train=True, batches=batches, path=path)
