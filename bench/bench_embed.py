"""Embedding extraction end to end vs the bare model, and flat-index search speed:
python bench/bench_embed.py [--n 256] [--img-size 128] [--backbone resnet10t] [--workers -1] [--gallery 100000]
    [--dim 512]

1. Writes --n camera-like JPEGs (1200x900) to a temp folder, builds a resize cache (shorter side = img size), then
   times extract_embeddings over an IndexDataset reading the cache (decode + transform + loader + forward) against
   the same model's forward alone on tensors already in memory. The ratio (bare / end-to-end time) says how much of
   the model's speed survives the input pipeline; the goal on CPU is >= 0.9. --workers -1: the device table's count.
2. Faiss IndexFlatL2 over --gallery random unit vectors of --dim, queried in batches: queries per second at k=20.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (sets the OpenMP guard before torch and faiss load)

# isort: split
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lib.core.device import auto_settings  # noqa: E402
from lib.data.dataset import IndexDataset  # noqa: E402
from lib.data.resize_cache import build_cache  # noqa: E402
from lib.data.transforms import build_transforms  # noqa: E402
from lib.retrieval.embed import extract_embeddings  # noqa: E402
from lib.retrieval.faiss_index import build_index, search  # noqa: E402
from lib.train.model import ModelConfig, create_model  # noqa: E402


def photo(path: Path, seed: int, w: int = 1200, h: int = 900) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:h, 0:w]
    base = 128 + 60 * np.sin(2 * np.pi * (rng.uniform(1, 5) * x / w)) * np.cos(2 * np.pi * rng.uniform(1, 5) * y / h)
    img = np.stack([base + rng.normal(0, 8, (h, w)) for _ in range(3)], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, "JPEG", quality=90)


@torch.inference_mode()
def bare_forward(model, batches, settings) -> float:
    t0 = time.perf_counter()
    for x in batches:
        with settings.autocast():
            model(x.to(settings.device)).float().cpu()
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_embedding(args) -> None:
    settings = auto_settings(device=args.device, num_workers=args.workers)
    model = create_model(ModelConfig(backbone=args.backbone, embed_dim=128)).to(settings.device).eval()
    _, eval_tf = build_transforms(args.img_size, model.data_config["mean"], model.data_config["std"], preset="none")
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        data.mkdir()
        rels = [f"img_{i:04d}.jpg" for i in range(args.n)]
        for i, rel in enumerate(rels):
            photo(data / rel, i)
        build_cache(data, rels, cache, size=args.img_size, workers=settings.num_workers or 1)
        dataset = IndexDataset(pd.DataFrame({"path": rels, "label": "x"}), data, eval_tf, {"x": 0}, cache)
        batches = [torch.stack([dataset[j][0] for j in range(i, min(i + args.batch_size, len(dataset)))])
                   for i in range(0, len(dataset), args.batch_size)]
        extract_embeddings(model, torch.utils.data.Subset(dataset, range(args.batch_size)), settings, args.batch_size)
        # interleaved repeats, medians, the ratio paired within a repeat: on a shared machine one run of each would
        # measure the neighbours' load, and the load changes between repeats more than between a repeat's two runs
        timings = {"end_to_end": [], "bare": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            extract_embeddings(model, dataset, settings, args.batch_size)
            timings["end_to_end"].append(time.perf_counter() - t0)
            timings["bare"].append(bare_forward(model, batches, settings))
    end_to_end, bare = (statistics.median(timings[key]) for key in ("end_to_end", "bare"))
    ratios = [b / e for b, e in zip(timings["bare"], timings["end_to_end"])]
    print(f"embedding: {args.backbone} at {args.img_size} px, {args.n} images, batch {args.batch_size}, "
          f"device {settings.device}, workers {settings.num_workers} (loading at 1 intra-op thread), forward at "
          f"{torch.get_num_threads()} intra-op threads, precision {settings.precision}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"  end to end (resize cache -> decode -> transform -> forward): {end_to_end:.2f} s "
          f"({args.n / end_to_end:.0f} img/s)")
    print(f"  bare forward on preloaded tensors:                         {bare:.2f} s ({args.n / bare:.0f} img/s)")
    print(f"  ratio bare / end to end, median of the repeats': {statistics.median(ratios):.2f} (goal >= 0.9); "
          f"each repeat's: {' '.join(f'{r:.2f}' for r in ratios)}")


def bench_search(args) -> None:
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(args.gallery, args.dim)).astype(np.float32)
    queries = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    t0 = time.perf_counter()
    index = build_index(gallery, device=args.device if args.device != "auto" else "auto")
    built = time.perf_counter() - t0
    search(index, queries[:64], k=20)  # warm-up
    t0 = time.perf_counter()
    search(index, queries, k=20)
    seconds = time.perf_counter() - t0
    print(f"faiss flat search: {args.gallery} x {args.dim} ({type(index).__name__}, built in {built:.2f} s), "
          f"{args.queries} queries, k=20: {args.queries / seconds:.0f} queries/s ({1000 * seconds / args.queries:.2f} ms each)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--backbone", default="resnet10t")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    bench_embedding(args)
    bench_search(args)


if __name__ == "__main__":
    main()
