"""GPU benchmark (not a test), run by bench/gpu_check.sh: each figure a ratio of two things measured in this run.

1. Training: the project's loop (train_run on the synthetic demo at 560 px: decoding from a resize cache, the
   table's workers, augmentation, AMP, channels_last; its images/s exclude validation) against the bare model
   (forward + backward + optimizer step on batches already on the GPU), images/s, for EfficientNet-Lite0 at 320 px
   and tf_efficientnetv2_l at 480 px (random init: speed does not depend on the weights); peak GPU memory of each.
   Goal: the loop >= 0.8 x bare at 480 px.
2. Embedding: extract_embeddings over the cached photos against the bare forward on tensors on the GPU.
3. Faiss: exact search over 100k x 512 unit vectors, queries/s on the GPU (faiss-gpu) and on the CPU.

Without CUDA every row prints "skipped: no CUDA" (nothing is built). --smoke runs every row's code on the CPU
with resnet10t at 64 px and small sizes, to check the script where no GPU is (its figures mean nothing).

    python bench/bench_gpu.py [--photos 320] [--steps 40] [--smoke]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROWS = ("train Lite0 320 px", "train V2-L 480 px", "embedding Lite0 320 px", "faiss 100k x 512", "peak GPU memory")
BACKBONES = {"train Lite0 320 px": ("tf_efficientnet_lite0", 320), "train V2-L 480 px": ("tf_efficientnetv2_l", 480)}
EMBEDDER = ("tf_efficientnet_lite0", 320)
SMOKE = ("resnet10t", 64)  # --smoke: every backbone and size replaced by this


def row(name: str, text: str) -> None:
    print(f"ROW {name}: {text}", flush=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def demo_split(base: Path, photos: int, size: int, cache_size: int):
    """(data_dir, splits_dir, cache_dir): the synthetic demo at `size` px, split, with a resize cache."""
    from data_prep.make_demo import make_demo
    from lib.data.resize_cache import build_cache
    from lib.data.splits import SplitConfig, prepare_splits
    from lib.data.table import check_images, index_from_folder

    data, splits, cache = base / "data", base / "splits", base / "cache"
    views = 5
    make_demo(data, n_classes=8, individuals_per_class=max(2, photos // (8 * views)), views_per_individual=views,
              size=size)
    index, _ = index_from_folder(data)
    kept, excluded = check_images(index, data)
    prepare_splits(kept, splits, SplitConfig(), excluded)
    build_cache(data, kept["path"].tolist(), cache, size=cache_size)
    return data, splits, cache


def bare_images_per_second(backbone: str, img_size: int, settings, p: int, k: int, steps: int) -> float:
    """Forward + backward + AdamW step of the same model and loss on one batch already on the device."""
    from lib.train.step import TrainStep
    from lib.train.losses import LossConfig, build_loss
    from lib.train.model import ModelConfig, create_model

    cfg = ModelConfig(backbone=backbone, pretrained="")
    model = create_model(cfg)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(settings.device, memory_format=memory_format).train()
    criterion = build_loss(LossConfig(), cfg.embed_dim, p).to(settings.device)
    step = TrainStep(model, criterion)
    optimizer = torch.optim.AdamW(step.parameters(), lr=1e-4, fused=settings.device.startswith("cuda"))
    scaler = settings.grad_scaler()
    x = torch.randn(p * k, 3, img_size, img_size, device=settings.device).to(memory_format=memory_format)
    y = torch.arange(p, device=settings.device).repeat_interleave(k)

    def one():
        loss, _ = step(x, y, autocast=settings.autocast)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # cudnn.benchmark's autotuning, the allocator's first blocks
        one()
    synchronize(settings.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    synchronize(settings.device)
    return steps * p * k / (time.perf_counter() - t0)


def train_row(name: str, backbone: str, img_size: int, base: Path, data, splits, cache, steps: int, device: str,
              peaks: dict) -> None:
    from lib.core.device import apply_settings, auto_settings
    from lib.train.config import build_config
    from lib.train.run import train_run

    p, k = 8, 4
    config = build_config(data_dir=str(data), splits_dir=str(splits), cache_dir=str(cache), backbone=backbone,
                          pretrained="", img_size=img_size, head_epochs=0, epochs=2, warmup_epochs=0,
                          unfreeze="all", batches_per_epoch=steps, p=p, k=k, device=device)
    reset_peak(device)
    history = train_run(str(base / name.replace(" ", "_")), config, progress=False)
    loop = float(history["images_per_second"].iloc[-1])  # epoch 2: workers started, cudnn's choices made
    peaks[f"{name}, loop"] = peak_gib(device)
    settings = auto_settings(device)
    apply_settings(settings)
    reset_peak(device)
    bare = bare_images_per_second(backbone, img_size, settings, p, k, steps)
    peaks[f"{name}, bare"] = peak_gib(device)
    goal = " (goal >= 0.8)" if img_size == 480 else ""
    row(name, f"loop {loop:.1f} images/s, bare {bare:.1f} images/s, ratio {loop / bare:.2f}{goal}; batch {p}x{k}, "
              f"{settings.precision}, {settings.num_workers} workers")


def embedding_row(name: str, backbone: str, img_size: int, data, splits, cache, device: str) -> None:
    from lib.core.device import auto_settings
    from lib.data.dataset import IndexDataset
    from lib.data.splits import load_split_index
    from lib.data.transforms import build_transforms
    from lib.retrieval.embed import extract_embeddings
    from lib.train.model import ModelConfig, create_model

    settings = auto_settings(device)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = create_model(ModelConfig(backbone=backbone, pretrained=""))
    model.to(settings.device, memory_format=memory_format).eval()
    _, eval_tf = build_transforms(img_size, model.data_config["mean"], model.data_config["std"], preset="none")
    index, split = load_split_index(splits)
    dataset = IndexDataset(index, data, eval_tf, split.class_to_idx, cache)
    extract_embeddings(model, dataset, settings)  # warm: workers' first start, cudnn's choices
    t0 = time.perf_counter()
    extract_embeddings(model, dataset, settings)  # returns numpy: synchronised
    loaded = len(dataset) / (time.perf_counter() - t0)
    batch = torch.randn(128, 3, img_size, img_size, device=settings.device).to(memory_format=memory_format)
    with torch.inference_mode(), settings.autocast():
        model(batch)
        synchronize(settings.device)
        t0 = time.perf_counter()
        for _ in range(5):
            model(batch).float().cpu()
    bare = 5 * len(batch) / (time.perf_counter() - t0)
    row(name, f"end to end {loaded:.0f} images/s, bare forward {bare:.0f} images/s, ratio {loaded / bare:.2f}; "
              f"{len(dataset)} photos, {settings.num_workers} workers, {settings.precision}")


def faiss_row(name: str, n: int, d: int = 512, k: int = 20) -> None:
    import faiss
    import numpy as np

    from lib.retrieval.faiss_index import build_index, search

    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(n, d)).astype(np.float32)
    queries = rng.normal(size=(10_000, d)).astype(np.float32)

    def rate(device: str, q) -> float:
        index = build_index(gallery, device)
        search(index, q[:100], k)
        t0 = time.perf_counter()
        search(index, q, k)
        return len(q) / (time.perf_counter() - t0)

    cpu = rate("cpu", queries[:2000])
    if faiss.get_num_gpus() == 0:
        row(name, f"CPU {cpu:.0f} queries/s (k={k}); GPU skipped: this faiss has no GPU (faiss-cpu build)")
        return
    gpu = rate("cuda:0", queries)
    row(name, f"GPU {gpu:.0f} queries/s, CPU {cpu:.0f} queries/s (k={k}), ratio {gpu / cpu:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=320, help="demo photos to train and embed on")
    ap.add_argument("--steps", type=int, default=40, help="training steps per epoch (P x K = 8 x 4)")
    ap.add_argument("--smoke", action="store_true", help="every row's code on the CPU, tiny (figures mean nothing)")
    args = ap.parse_args()
    if not (torch.cuda.is_available() or args.smoke):
        for name in ROWS:
            row(name, "skipped: no CUDA")
        return
    device = "cpu" if args.smoke else "cuda"
    photos, steps, n_faiss = (100, 2, 5_000) if args.smoke else (args.photos, args.steps, 100_000)
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    peaks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        t0 = time.perf_counter()
        size, cache_size = (256, 96) if args.smoke else (560, 480)
        prepared = demo_split(base, photos, size, cache_size)
        print(f"demo: {photos} photos at {size} px, resize cache at {cache_size} px, {time.perf_counter() - t0:.0f} s",
              flush=True)
        for name in ROWS:
            try:
                if name in BACKBONES:
                    train_row(name, *(SMOKE if args.smoke else BACKBONES[name]), base, *prepared, steps, device, peaks)
                elif name.startswith("embedding"):
                    embedding_row(name, *(SMOKE if args.smoke else EMBEDDER), *prepared, device)
                elif name.startswith("faiss"):
                    faiss_row(name, n_faiss)
                else:
                    row(name, "; ".join(f"{what} {gib:.1f} GiB" for what, gib in peaks.items()))
            except Exception as e:  # one failing row must not hide the others' figures
                traceback.print_exc()
                row(name, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


if __name__ == "__main__":
    main()
