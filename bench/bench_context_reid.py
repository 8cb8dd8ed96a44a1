"""Benchmark (not a test): context-aware re-identification on the demo data, with vs without the context tools.

The demo's individuals are the labels (48 individuals, 6 camera sites, --views photos each); each photo is its own group, so every
individual has photos in train, val and test (closed-set re-ID, as at known street addresses). Same seed, model,
epochs and batches for each variant; only the context settings change:
  baseline        P x K sampler, ArcFace margin m for every pair of individuals
  context         context P x K sampler (individuals of one site per batch) + context_margin on same-site pairs
  context+mining  the same, with hard-context mining after a uniform warm-up
Printed: identity-balanced mAP, mAP and Recall@1 on val (train photos as the gallery), and the seconds each took.

    python bench/bench_context_reid.py [--epochs 30] [--context-margin 0.2] [--views 10]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd  # noqa: E402

from data_prep.make_demo import make_demo  # noqa: E402
from lib.data.splits import SplitConfig, prepare_splits  # noqa: E402
from lib.data.table import check_images, index_from_csv  # noqa: E402
from lib.evaluate.run_eval import evaluate_run  # noqa: E402
from lib.train.config import build_config  # noqa: E402
from lib.train.run import train_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--context-margin", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", type=int, default=10, help="photos per individual (the demo's default is 5)")
    args = ap.parse_args()
    variants = {
        "baseline": {"sampler": "pk"},
        "context": {"sampler": "context_pk", "context_margin": args.context_margin},
        "context+mining": {"sampler": "context_pk", "context_margin": args.context_margin,
                           "mining_warmup_epochs": 2},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo"
        make_demo(data, views_per_individual=args.views)
        index, _ = index_from_csv(data / "metadata.csv", data, label_col="individual", context_col="context")
        kept, excluded = check_images(index, data)
        splits = Path(tmp) / "splits"
        prepare_splits(kept, splits, SplitConfig(ratios=(0.6, 0.2, 0.2), seed=args.seed), excluded)
        for name, settings in variants.items():
            config = build_config(data_dir=str(data), splits_dir=str(splits), backbone="resnet10t", pretrained="",
                                  img_size=64, embed_dim=128, epochs=args.epochs, p=8, k=3, seed=args.seed,
                                  lr_backbone=1e-3, lr_head=3e-3, margin=0.3, s=64.0, warmup_epochs=5,
                                  head_epochs=0, unfreeze="all", lr_decay=1.0, **settings)
            t0 = time.time()
            run_dir = Path(tmp) / name
            train_run(str(run_dir), config, progress=False)
            m = evaluate_run(run_dir, split="val", checkpoint="latest", device="cpu").metrics
            rows.append({"variant": name, "identity_balanced_mAP": m["identity_balanced_mAP"], "mAP": m["mAP"],
                         "recall@1": m["recall@1"], "seconds": round(time.time() - t0)})
    table = pd.DataFrame(rows).set_index("variant")
    base = table.loc["baseline", "identity_balanced_mAP"]
    table["vs_baseline"] = table["identity_balanced_mAP"] / base
    print(f"demo re-ID, {len(kept)} photos of {kept['label'].nunique()} individuals at "
          f"{kept['context'].nunique()} sites; resnet10t 64 px, {args.epochs} epochs, seed {args.seed}, "
          f"context_margin {args.context_margin}; val with the train photos as gallery")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
