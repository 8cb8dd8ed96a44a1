"""Benchmark (not a test): training-step throughput of the project's loop vs a bare PyTorch loop, the bare loop at
the old setting (NCHW, the P x K batch through the backbone in one pass) and at the best (on the CPU the probe's
layout and backbone pass, lib.train.phases.cpu_training_settings as a training run calls it: the backbone takes the
step's images a pass at a time, the head and the loss the whole step).

Same model (the backbone phase's: its last --unfreeze stages train, BatchNorm statistics frozen for pretrained
weights), loss, batches, optimizer and precision. The bare loops read preloaded tensors, so their ratio measures the
layout and pass size alone. The project's loop reads the same preloaded tensors, which adds only its own overhead
(AMP/accumulation plumbing, EMA hook, NaN guard, progress bar), or with --data a folder of photos end to end:
decoding, the recipe's augmentation and the loader at the device table's workers (--workers), as a training run
reads them. Runs are interleaved and the median of the repeats is reported, because a shared 2-core machine is noisy.

    python bench/bench_train_loop.py [--backbone resnet10t] [--pretrained ''] [--img-size 96] [--steps 20]
        [--repeats 3] [--unfreeze all] [--data FOLDER] [--workers -1]
    the recipe's: --backbone tf_efficientnet_lite0 --pretrained lite0-imagenet --img-size 320 --unfreeze 1 --p 16
        --data ../shared/datasets/lions/train
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from lib.core.device import auto_settings  # noqa: E402
from lib.data.dataset import IndexDataset  # noqa: E402
from lib.data.samplers import PKSampler  # noqa: E402
from lib.data.splits import class_to_idx  # noqa: E402
from lib.data.table import index_from_folder  # noqa: E402
from lib.train.config import TrainConfig, build_config  # noqa: E402
from lib.train.epochs import epoch_steps  # noqa: E402
from lib.train.losses import LossConfig, build_loss  # noqa: E402
from lib.train.model import ModelConfig, create_model  # noqa: E402
from lib.train.phases import cpu_training_settings, image_batches, image_loader, trainable_stages  # noqa: E402
from lib.train.state import TrainState  # noqa: E402


def bare_loop(model, criterion, optimizer, batches, settings, channels_last: bool = False, chunk: int = 0) -> float:
    """One optimizer step per batch; the backbone takes `chunk` images a pass (0: all), the head and loss all."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    t0 = time.perf_counter()
    for x, y in batches:
        x, y = x.to(settings.device, memory_format=fmt), y.to(settings.device)
        with settings.autocast():
            emb = model.embed_features(torch.cat([model.pooled(c) for c in x.split(chunk or len(x))]))
        loss, _ = criterion(emb.float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - t0)


def our_loop(state: TrainState, loader) -> float:
    t0 = time.perf_counter()
    _, n = epoch_steps(state, image_batches(loader, state.settings.device, state.memory_format)(0), desc="ours",
                       progress=True)
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
    ap.add_argument("--unfreeze", default="all", help="the backbone stages that train: all, or the last N")
    ap.add_argument("--data", default="", help="a folder of photos ({label}/...) the project loop reads end to end")
    ap.add_argument("--workers", type=int, default=-1, help="with --data: loader workers (-1: the device table's)")
    args = ap.parse_args()

    settings = auto_settings(device=args.device, num_workers=0, accum_steps=1)
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone=args.backbone, pretrained=args.pretrained, embed_dim=128))
    if args.data:  # the photos through the recipe's augmentation, as a training run reads them
        index = index_from_folder(args.data, group_by="file")[0]
        train_tf = dataclasses.replace(build_config().aug, img_size=args.img_size).transforms(model.data_config)[0]
        dataset = IndexDataset(index, args.data, train_tf, class_to_idx(index))
        images, labels = None, dataset.targets
    else:
        images = torch.randn(4 * args.p * args.k * 2, 3, args.img_size, args.img_size)
        labels = torch.arange(4 * args.p).repeat_interleave(args.k * 2)
        dataset = TensorDataset(images, labels)
    n_classes = int(labels.max()) + 1
    sampler = PKSampler(labels.numpy(), args.p, args.k, batches_per_epoch=args.steps)
    batches = [(torch.stack([dataset[i][0] for i in idx]), labels[idx]) if args.data else (images[idx], labels[idx])
               for idx in sampler]
    # the project's loop reads the bare loops' tensors (its own overhead alone), or with --data the photos
    loading = auto_settings(device=args.device, num_workers=args.workers if args.data else 0, accum_steps=1)
    loader = image_loader(dataset, sampler, loading) if args.data else batches

    model = model.to(settings.device)
    model.frozen_bn = not model.random_init  # backbone_bn="auto"
    model.set_trainable_stages(trainable_stages(args.unfreeze))
    criterion = build_loss(LossConfig(s=30.0), 128, n_classes).to(settings.device)
    criterion.head.margin = 0.3  # as the margin schedule sets it
    cfg = TrainConfig()
    t0 = time.perf_counter()
    # the project's loop at the choice, as a training run (lib.train.run) sets it
    chosen, line = cpu_training_settings(settings, model, args.img_size, args.p * args.k, split=model.frozen_bn)
    chose_in = time.perf_counter() - t0
    state = TrainState.build(model, criterion, cfg, chosen)
    optimizer = state.optimizer
    best = (chosen.channels_last, chosen.backbone_chunk)
    for c in ((False, 0), best):  # warm-up: allocator, cudnn autotune, oneDNN's kernels per shape and layout
        bare_loop(model, criterion, optimizer, batches[:1], settings, *c)

    runs = {"old": [], "best": [], "ours": []}
    for _ in range(args.repeats):
        runs["old"].append(bare_loop(model, criterion, optimizer, batches, settings))
        runs["best"].append(bare_loop(model, criterion, optimizer, batches, settings, *best))
        runs["ours"].append(our_loop(state, loader))
    med = {key: statistics.median(v) for key, v in runs.items()}
    print(f"device {settings.device} precision {settings.precision}; {args.backbone} at {args.img_size} px, "
          f"batch {args.p}x{args.k}, unfreeze {args.unfreeze}, {args.steps} steps x {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads; "
          + (f"the project loop reads {len(dataset)} photos of {args.data} with {loading.num_workers} loader workers"
             if args.data else "random tensors, preloaded"))
    print(f"choice: {line or 'the device settings'}, chosen in {chose_in:.1f} s")
    labels = {"old": "bare loop, NCHW, P x K in one pass (old)", "best": "bare loop at the choice",
              "ours": "project loop at the choice" + (", end to end" if args.data else "")}
    for key, label in labels.items():
        print(f"{label:<42}: {med[key]:8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in runs[key])})")
    print(f"ratio best/old    : {med['best'] / med['old']:.3f}")
    print(f"ratio project/best: {med['ours'] / med['best']:.3f}  (goal >= 0.9)")
    print(f"ratio project/old : {med['ours'] / med['old']:.3f}")


if __name__ == "__main__":
    main()
