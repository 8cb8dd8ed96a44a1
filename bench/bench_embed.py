"""Embedding extraction end to end vs the bare model at the old and at the best setting, and flat-index search speed:
python bench/bench_embed.py [--n 256] [--img-size 128] [--backbone resnet10t] [--pretrained ''] [--workers -1]
    [--gallery 100000] [--dim 512]
the issue's setting: --backbone tf_efficientnet_lite0 --pretrained lite0-imagenet --img-size 320 --n 64

1. Writes --n camera-like JPEGs (1200x900) to a temp folder, builds a resize cache (shorter side = img size), then
   times, interleaved: the model's forward alone on tensors already in memory at the old setting (NCHW, batch 64),
   the same at the device's choice (on the CPU the probe's layout and batch, lib.core.cpu_probe), and
   extract_embeddings over an IndexDataset reading the cache (decode + transform + loader + forward). The ratios
   say how much faster the choice is than the old setting, and how much of the best bare speed survives the input
   pipeline (goal on CPU >= 0.9). --workers -1: the device table's count.
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

from lib.core import cpu_probe  # noqa: E402
from lib.core.device import auto_settings  # noqa: E402
from lib.data.dataset import IndexDataset  # noqa: E402
from lib.data.resize_cache import build_cache  # noqa: E402
from lib.data.transforms import build_transforms  # noqa: E402
from lib.retrieval.embed import EMBED_BATCH_SIZE, engine_for, extract_embeddings, forward_choice  # noqa: E402
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


def preloaded(images: torch.Tensor, batch: int, memory_format) -> list[torch.Tensor]:
    return [x.contiguous(memory_format=memory_format) for x in images.split(batch)]


def bench_embedding(args) -> None:
    # the choice a collection large enough to repay the probe and the engine's export gets, on these --n images
    cpu_probe.PROBE_MIN_IMAGES = 0
    settings = auto_settings(device=args.device, num_workers=args.workers)
    model = create_model(ModelConfig(backbone=args.backbone, pretrained=args.pretrained, embed_dim=128))
    model = model.to(settings.device).eval()
    _, eval_tf = build_transforms(args.img_size, model.data_config["mean"], model.data_config["std"], preset="none")
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "cache"
        data.mkdir()
        rels = [f"img_{i:04d}.jpg" for i in range(args.n)]
        for i, rel in enumerate(rels):
            photo(data / rel, i)
        build_cache(data, rels, cache, size=args.img_size, workers=settings.num_workers or 1)
        dataset = IndexDataset(pd.DataFrame({"path": rels, "label": "x"}), data, eval_tf, {"x": 0}, cache)
        images = torch.stack([dataset[j][0] for j in range(len(dataset))])
        t0 = time.perf_counter()
        choice = forward_choice(model, settings, tuple(images.shape[1:]), len(dataset), args.batch_size)
        chose_in = time.perf_counter() - t0
        old = preloaded(images, EMBED_BATCH_SIZE, torch.contiguous_format)
        best = preloaded(images, choice.batch_size, choice.memory_format)
        for batches in (old, best):  # warm-up: oneDNN builds its kernels per shape and layout on the first call
            bare_forward(model, batches[:1], settings)
        eager = preloaded(images, choice.batch_size, torch.channels_last if choice.channels_last else
                          torch.contiguous_format)
        bare_forward(model, eager[:1], settings)
        # a first extraction of one batch: the engine's export (once per weights and input size, kept for the next
        # extraction of the same model, as a run's feature pass and evaluation keep it) and eager's kernels
        t0 = time.perf_counter()
        extract_embeddings(model, torch.utils.data.Subset(dataset, range(choice.batch_size)), settings)
        exported_in = time.perf_counter() - t0
        engines = {"eager": model}
        if choice.engine == "onnxruntime":
            engines["onnxruntime"] = engine_for(model, choice, tuple(images.shape[1:]))
            bare_forward(engines["onnxruntime"], best[:1], settings)
        # interleaved repeats, medians, the ratios paired within a repeat: on a shared machine one run of each would
        # measure the neighbours' load, and the load changes between repeats more than between a repeat's runs
        timings = {"old": [], "eager": [], **({"onnxruntime": []} if len(engines) > 1 else {}), "end_to_end": []}
        for _ in range(args.repeats):
            timings["old"].append(bare_forward(model, old, settings))
            timings["eager"].append(bare_forward(model, eager, settings))
            if "onnxruntime" in timings:
                timings["onnxruntime"].append(bare_forward(engines["onnxruntime"], best, settings))
            t0 = time.perf_counter()
            extract_embeddings(model, dataset, settings, args.batch_size)
            timings["end_to_end"].append(time.perf_counter() - t0)
    median = {key: statistics.median(v) for key, v in timings.items()}
    print(f"embedding: {args.backbone} at {args.img_size} px, {args.n} images, loader batch {args.batch_size}, "
          f"device {settings.device}, workers {settings.num_workers} (loading at 1 intra-op thread), forward at "
          f"{torch.get_num_threads()} intra-op threads, precision {settings.precision}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"  choice: {choice.describe()}, chosen in {chose_in:.1f} s (once per machine, model and input size); "
          f"first extraction of one batch {exported_in:.1f} s (the {choice.engine} engine's export or kernels: once "
          "per weights and input size, outside the timings below)")
    layout = "channels_last" if choice.channels_last else "NCHW"
    labels = {"old": f"bare forward, eager, NCHW, batch {EMBED_BATCH_SIZE} (the old setting)",
              "eager": f"bare forward, eager, {layout}, batch {choice.batch_size} (the best eager)",
              "onnxruntime": f"bare forward, onnxruntime, batch {choice.batch_size}",
              "end_to_end": "end to end (resize cache -> decode -> transform -> forward)"}
    for key in timings:
        print(f"  {labels[key]:<66} {median[key]:6.2f} s ({args.n / median[key]:6.1f} img/s)")
    top = list(timings)[-2]  # the fastest bare forward: the engine when there is one
    pairs = [("old", "eager", ""), ("eager", top, ""), (top, "end_to_end", " (goal >= 0.9)"),
             ("old", "end_to_end", "")]
    for num, den, goal in dict.fromkeys(p for p in pairs if p[0] != p[1]):
        ratios = [a / b for a, b in zip(timings[num], timings[den])]
        print(f"  speed ratio {den} / {num}: {statistics.median(ratios):.2f}{goal}; each repeat's: "
              f"{' '.join(f'{r:.2f}' for r in ratios)}")


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
    ap.add_argument("--pretrained", default="", help="'' random init; lite0-imagenet: packaged ImageNet weights")
    ap.add_argument("--batch-size", type=int, default=EMBED_BATCH_SIZE, help="the loader's batch")
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
