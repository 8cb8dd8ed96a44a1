"""Benchmark (not a test): training throughput of one process against `--nproc` DDP processes under torchrun, at the
same global batch (P x K in one process, P / nproc x K in each of nproc), the project's loop on preloaded tensors.

    python bench/bench_ddp.py [--nproc 2] [--backbone resnet10t] [--img-size 96] [--p 16] [--k 4] [--steps 12]

On a GPU box nproc GPUs should give close to nproc x one GPU's images/s; on a CPU the processes share the same cores
(torchrun gives each one thread), so the ratio there measures what DDP's gradient all-reduce costs, not a speed-up.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import lib.core.device  # noqa: F401  (sets the OpenMP guard before torch loads)

# isort: split
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lib.core.device import auto_settings  # noqa: E402
from lib.data.samplers import PKSampler  # noqa: E402
from lib.train.config import TrainConfig  # noqa: E402
from lib.train.distributed import join_world, leave_world  # noqa: E402
from lib.train.epochs import epoch_steps  # noqa: E402
from lib.train.losses import LossConfig, build_loss  # noqa: E402
from lib.train.model import ModelConfig, create_model  # noqa: E402
from lib.train.phases import image_batches  # noqa: E402
from lib.train.state import TrainState  # noqa: E402


def measure(args) -> float:
    """Global images/s of this process's world (one process, or every rank of a torchrun launch)."""
    world, device = join_world(args.device)
    settings = auto_settings(device=device, num_workers=0, accum_steps=1)
    torch.manual_seed(0)
    n_classes = 4 * args.p
    images = torch.randn(n_classes * args.k * 2, 3, args.img_size, args.img_size)
    labels = torch.arange(n_classes).repeat_interleave(args.k * 2)
    sampler = PKSampler(labels.numpy(), args.p // world.size, args.k, batches_per_epoch=args.steps,
                        rank=world.rank, world=world.size)
    loader = DataLoader(TensorDataset(images, labels), batch_sampler=sampler, pin_memory=settings.pin_memory)
    model = create_model(ModelConfig(backbone=args.backbone, embed_dim=128)).to(settings.device)
    criterion = build_loss(LossConfig(s=30.0), 128, n_classes).to(settings.device)
    criterion.head.margin = 0.3
    cfg = TrainConfig()
    state = TrainState.build(model, criterion, cfg, settings, world)
    seconds = []
    for epoch in range(2):  # the first warms up (allocator, DDP buckets)
        sampler.set_epoch(epoch)
        world.barrier()
        t0 = time.perf_counter()
        _, n = epoch_steps(state, image_batches(loader, settings.device, state.memory_format)(epoch))
        if settings.device.startswith("cuda"):
            torch.cuda.synchronize()
        world.barrier()
        seconds.append(time.perf_counter() - t0)
    leave_world(world)
    return n * world.size / seconds[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rank-of-launch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_of_launch:
        rate = measure(args)
        if os.environ.get("RANK") == "0":
            print(f"images/s {rate:.2f}")
        return
    one = measure(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, *sys.argv[1:], "--rank-of-launch"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    many = float(next(line for line in out.splitlines() if line.startswith("images/s")).split()[1])
    print(f"{args.backbone} at {args.img_size} px, global batch {args.p}x{args.k}, {args.steps} steps; "
          f"{torch.get_num_threads()} threads in one process, torchrun's default in each of {args.nproc}")
    print(f"1 process       : {one:8.1f} images/s")
    print(f"{args.nproc} processes (DDP): {many:8.1f} images/s")
    print(f"ratio DDP / one : {many / one:.3f}")


if __name__ == "__main__":
    main()
