"""The head phase's feature pass as a training run makes it (benchmark, not a test): every train photo in --views
versions (the eval transform, then seeded draws of the training augmentation) and every val photo through the frozen
backbone and pooling (lib.train.feature_cache.cache_features), read from the photos as they are or through a resize
cache (--cache-size, as notebook 01's cache_dir makes one), with the device settings and extraction choice (probe,
engine) a run gets. Beside it, in the same run, the bare forward at the old setting (eager, NCHW, batch 64) on a
sample of the same images, and the pass's time at that speed.

    python bench/bench_feature_pass.py [--n 1294] [--val 0] [--photo-size 640] [--views 4] [--img-size 320]
        [--cache-size 480]  # through a resize cache of that shorter side, built first (its time printed apart)
        [--data FOLDER]    # a folder of your own ({label}/{ID}_{seq}.jpg), instead of --n synthetic photos

The defaults are issue 29's setting: a 1,294-photo collection of 640 px JPEGs, the recipe's backbone (Lite0), input
size (320 px) and augmentation, 4 views.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import lib.core.device  # noqa: F401  (first: sets the OpenMP switch before torch and faiss load)

# isort: split
import pandas as pd
import torch

from bench_embed import bare_forward, photo, preloaded
from lib.core.device import auto_settings
from lib.data.dataset import IndexDataset
from lib.data.resize_cache import build_cache
from lib.data.splits import class_to_idx
from lib.data.table import check_images, index_from_folder
from lib.retrieval.embed import EMBED_BATCH_SIZE, forward_choice
from lib.train.feature_cache import PooledFeatures, cache_features
from lib.train.config import build_config
from lib.train.model import ModelConfig, create_model

DEFAULTS = build_config()  # the recipe's model and augmentation: a run's feature pass
SAMPLE = 64  # images of the old setting's bare forward: one of its batches


def synthetic(folder: Path, n: int, size: int) -> pd.DataFrame:
    """n camera-like JPEGs, size px wide (4:3), 4 photos per label."""
    rows = []
    for i in range(n):
        rel = f"c{i // 4:04d}/c{i // 4:04d}_{i % 4}.jpg"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        photo(folder / rel, i, w=size, h=size * 3 // 4)
        rows.append({"path": rel, "label": f"c{i // 4:04d}"})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1294, help="synthetic train photos")
    ap.add_argument("--val", type=int, default=0, help="synthetic val photos (one eval view each)")
    ap.add_argument("--photo-size", type=int, default=640)
    ap.add_argument("--data", default="", help="a folder of your own photos: all of them train, none val")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--cache-size", type=int, default=0, help="0: the photos as they are; else a resize cache's size")
    ap.add_argument("--img-size", type=int, default=DEFAULTS.aug.img_size)
    ap.add_argument("--backbone", default=DEFAULTS.model.backbone)
    ap.add_argument("--pretrained", default=DEFAULTS.model.pretrained)
    args = ap.parse_args()

    settings = auto_settings()
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone=args.backbone, pretrained=args.pretrained)).eval()
    train_tf, eval_tf = dataclasses.replace(DEFAULTS.aug, img_size=args.img_size).transforms(model.data_config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        t0 = time.perf_counter()
        if args.data:  # any file names; a photo that cannot be read is left out, as notebook 01 leaves it out
            index, excluded = check_images(index_from_folder(root, group_by="file")[0], root, min_size=1)
            if len(excluded):
                print(f"{len(excluded)} unreadable photo(s) of {root} left out, e.g. {excluded.iloc[0].to_dict()}")
        else:
            index = synthetic(root, args.n + args.val, args.photo_size)
        made = time.perf_counter() - t0
        train, val = index.iloc[:len(index) - args.val], index.iloc[len(index) - args.val:]
        classes = class_to_idx(index)
        cache, cached_in = None, 0.0
        if args.cache_size:
            cache, t0 = Path(tmp) / "cache", time.perf_counter()
            build_cache(root, index["path"].tolist(), cache, size=args.cache_size)
            cached_in = time.perf_counter() - t0
        train_set = IndexDataset(train, root, train_tf, classes, cache)
        gallery_set = IndexDataset(train, root, eval_tf, classes, cache)
        query_set = IndexDataset(val, root, eval_tf, classes, cache)
        n_images = args.views * len(train) + len(val)
        pooled = PooledFeatures(model)
        # the pass's extraction choice (a probe once per machine, model and input size, stored; outside the timing)
        t0 = time.perf_counter()
        choice = forward_choice(pooled, settings, (3, args.img_size, args.img_size), len(train_set) + len(query_set))
        chose_in = time.perf_counter() - t0

        sample = torch.stack([gallery_set[i][0] for i in range(min(SAMPLE, len(gallery_set)))])
        old = preloaded(sample, EMBED_BATCH_SIZE, torch.contiguous_format)
        bare_forward(pooled, old, settings)  # warm-up: oneDNN builds its kernels per shape on the first call
        old_rate = len(sample) / bare_forward(pooled, old, settings)

        t0 = time.perf_counter()
        cache_features(model, train_set, gallery_set, query_set, args.views, settings, Path(tmp) / "features")
        seconds = time.perf_counter() - t0
    print(f"feature pass: {args.backbone} at {args.img_size} px, {len(train)} train photos x {args.views} views + "
          f"{len(val)} val = {n_images} images "
          + (f"from {args.data}" if args.data else f"({args.photo_size} px JPEGs, made in {made:.0f} s)")
          + (f", through a resize cache of {args.cache_size} px (built in {cached_in:.0f} s)" if cache else "")
          + f"; {torch.get_num_threads()} threads, workers {settings.num_workers}")
    print(f"  extraction: {choice.describe()}, chosen in {chose_in:.1f} s")
    print(f"  bare forward at the old setting (eager, NCHW, batch {EMBED_BATCH_SIZE}): {old_rate:.1f} img/s, "
          f"so the pass would take {n_images / old_rate / 60:.1f} min at it, the input pipeline not counted")
    print(f"  feature pass end to end (decode, augment, export, forward): {seconds / 60:.2f} min "
          f"({n_images / seconds:.1f} img/s), {n_images / seconds / old_rate:.2f}x the old bare forward")


if __name__ == "__main__":
    main()
