"""Benchmark (not a test): training-step throughput of the project's loop vs a bare PyTorch loop.

Same model, loss, batches, optimizer and precision; both read the same preloaded tensors so the ratio measures the
loop's own overhead (AMP/accumulation plumbing, EMA hook, NaN guard, progress bar), not image decoding. Runs are
interleaved and the median of the repeats is reported, because a shared 2-core machine is noisy.

    python bench/bench_train_loop.py [--backbone resnet10t] [--img-size 96] [--steps 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lib.core.device import auto_settings  # noqa: E402
from lib.data.samplers import PKSampler  # noqa: E402
from lib.train.config import TrainConfig  # noqa: E402
from lib.train.epochs import backbone_epoch  # noqa: E402
from lib.train.losses import LossConfig, build_loss  # noqa: E402
from lib.train.model import ModelConfig, create_model  # noqa: E402
from lib.train.state import TrainState  # noqa: E402


def bare_loop(model, criterion, optimizer, batches, settings) -> float:
    model.train()
    t0 = time.perf_counter()
    for x, y in batches:
        x, y = x.to(settings.device), y.to(settings.device)
        with settings.autocast():
            emb = model(x)
        loss, _ = criterion(emb.float(), y)
        loss.backward()
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

    model = create_model(ModelConfig(backbone=args.backbone, embed_dim=128)).to(settings.device)
    criterion = build_loss(LossConfig(s=30.0), 128, n_classes).to(settings.device)
    criterion.head.margin = 0.3  # as the margin schedule sets it
    cfg = TrainConfig()
    # contiguous tensors, as the bare loop feeds them
    state = TrainState.build(model, criterion, cfg, dataclasses.replace(settings, channels_last=False))
    optimizer = state.optimizer
    bare_loop(model, criterion, optimizer, batches[:2], settings)  # warm-up: allocator, cudnn autotune

    ours, bare = [], []
    for _ in range(args.repeats):
        bare.append(bare_loop(model, criterion, optimizer, batches, settings))
        ours.append(our_loop(state, loader))
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"device {settings.device} precision {settings.precision}; {args.backbone} at {args.img_size} px, "
          f"batch {args.p}x{args.k}, {args.steps} steps x {args.repeats} repeats")
    print(f"bare PyTorch loop : {b:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in bare)})")
    print(f"project loop      : {o:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in ours)})")
    print(f"ratio project/bare: {o / b:.3f}  (goal >= 0.9)")


if __name__ == "__main__":
    main()
