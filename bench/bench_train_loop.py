"""Benchmark (not a test): training-step throughput of the project's loop vs a bare PyTorch loop, the bare loop at
the old setting (NCHW, the P x K batch in one pass) and at the best (on the CPU the probe's layout and micro-batch,
lib.core.cpu_probe.cpu_train_choice, accumulated to the same P x K step).

Same model, loss, batches, optimizer and precision; all read the same preloaded tensors so the ratios measure the
layout and micro-batch, and the loop's own overhead (AMP/accumulation plumbing, EMA hook, NaN guard, progress bar),
not image decoding. Runs are interleaved and the median of the repeats is reported, because a shared 2-core machine
is noisy.

    python bench/bench_train_loop.py [--backbone resnet10t] [--pretrained ''] [--img-size 96] [--steps 20]
        [--repeats 3]
    the issue's setting: --backbone tf_efficientnet_lite0 --pretrained lite0-imagenet --img-size 320 --steps 2
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lib.core.cpu_probe import ForwardChoice, cpu_train_choice  # noqa: E402
from lib.core.device import auto_settings  # noqa: E402
from lib.data.samplers import PKSampler  # noqa: E402
from lib.train.config import TrainConfig  # noqa: E402
from lib.train.epochs import backbone_epoch  # noqa: E402
from lib.train.losses import LossConfig, build_loss  # noqa: E402
from lib.train.model import ModelConfig, create_model  # noqa: E402
from lib.train.state import TrainState  # noqa: E402


def bare_loop(model, criterion, optimizer, batches, settings, choice: ForwardChoice | None = None) -> float:
    """choice: the layout and micro-batch, each step's gradient accumulated over its micro-batches; None: NCHW, the
    whole step in one pass."""
    fmt = choice.memory_format if choice else torch.contiguous_format
    model.to(memory_format=fmt).train()
    t0 = time.perf_counter()
    for x, y in batches:
        x, y = x.to(settings.device, memory_format=fmt), y.to(settings.device)
        micro = choice.batch_size if choice else len(y)
        for xm, ym in zip(x.split(micro), y.split(micro)):
            with settings.autocast():
                emb = model(xm)
            loss, _ = criterion(emb.float(), ym)
            (loss * len(ym) / len(y)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - t0)


def our_loop(state: TrainState, loader) -> float:
    t0 = time.perf_counter()
    _, n = backbone_epoch(state, loader, desc="ours", progress=True)
    if state.settings.device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--pretrained", default="", help="'' random init; lite0-imagenet: packaged ImageNet weights")
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    settings = auto_settings(device=args.device, num_workers=0, accum_steps=1)
    torch.manual_seed(0)
    n_classes = 4 * args.p
    images = torch.randn(n_classes * args.k * 2, 3, args.img_size, args.img_size)
    labels = torch.arange(n_classes).repeat_interleave(args.k * 2)
    sampler = PKSampler(labels.numpy(), args.p, args.k, batches_per_epoch=args.steps)
    loader = DataLoader(TensorDataset(images, labels), batch_sampler=sampler, pin_memory=settings.pin_memory)
    batches = [(images[idx], labels[idx]) for idx in sampler]

    model = create_model(ModelConfig(backbone=args.backbone, pretrained=args.pretrained, embed_dim=128))
    model = model.to(settings.device)
    criterion = build_loss(LossConfig(s=30.0), 128, n_classes).to(settings.device)
    criterion.head.margin = 0.3  # as the margin schedule sets it
    cfg = TrainConfig()
    t0 = time.perf_counter()
    choice = (cpu_train_choice(model, (3, args.img_size, args.img_size), args.p * args.k)
              if settings.device == "cpu" else ForwardChoice(settings.channels_last, args.p * args.k, "GPU: settings"))
    chose_in = time.perf_counter() - t0
    # the project's loop at the choice, as lib.core.device.cpu_training_settings sets it: the layout, and the P x K
    # step cut into accum_steps micro-batches
    state = TrainState.build(model, criterion, cfg, dataclasses.replace(
        settings, channels_last=choice.channels_last, accum_steps=args.p * args.k // choice.batch_size))
    optimizer = state.optimizer
    for c in (None, choice):  # warm-up: allocator, cudnn autotune, oneDNN's kernels per shape and layout
        bare_loop(model, criterion, optimizer, batches[:1], settings, c)

    runs = {"old": [], "best": [], "ours": []}
    for _ in range(args.repeats):
        runs["old"].append(bare_loop(model, criterion, optimizer, batches, settings))
        runs["best"].append(bare_loop(model, criterion, optimizer, batches, settings, choice))
        runs["ours"].append(our_loop(state, loader))
    med = {key: statistics.median(v) for key, v in runs.items()}
    print(f"device {settings.device} precision {settings.precision}; {args.backbone} at {args.img_size} px, "
          f"batch {args.p}x{args.k}, {args.steps} steps x {args.repeats} repeats, {torch.get_num_threads()} threads")
    print(f"choice: {choice.describe()}, chosen in {chose_in:.1f} s")
    labels = {"old": "bare loop, NCHW, P x K in one pass (old)", "best": "bare loop at the choice",
              "ours": "project loop at the choice"}
    for key, label in labels.items():
        print(f"{label:<42}: {med[key]:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in runs[key])})")
    print(f"ratio best/old    : {med['best'] / med['old']:.3f}")
    print(f"ratio project/best: {med['ours'] / med['best']:.3f}  (goal >= 0.9)")
    print(f"ratio project/old : {med['ours'] / med['old']:.3f}")


if __name__ == "__main__":
    main()
