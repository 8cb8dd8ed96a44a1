"""Benchmark (not a test): global-only vs global + local re-ranking vs fused (and query expansion, k-reciprocal),
identity-balanced mAP and the time each costs per query, in one run.

    python bench/bench_probe.py [--data demo|lions] [--masks] [--run-dir runs/demo]

demo: a demo collection made in a temporary folder (8 pattern families x 12 individuals x 6 photos), split by
individual (open set): the probed val split (60 % of the individuals) queries itself leave-one-out. --masks adds the
same probe with each photo's background painted out from the demo's mask column.
lions: ../shared/datasets/lions, its val individuals leave-one-out (train unused by a pretrained backbone).
Backbone: ImageNet EfficientNet-Lite0 (packaged weights) as it comes, 224 px; --run-dir adds a trained run made on
the same splits. No feature cache, so every row pays for its features; 'x global' is the ratio to global's number.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (first: sets the OpenMP switch before torch and faiss load)
# isort: split
import pandas as pd  # noqa: E402

from data_prep.make_demo import make_demo  # noqa: E402
from lib.data.splits import SplitConfig, prepare_splits  # noqa: E402
from lib.data.table import check_images, index_from_csv  # noqa: E402
from lib.probe.run import ProbeConfig, run_probe  # noqa: E402

LIONS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lions"
LITE0 = {"name": "lite0-imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224}


def demo_splits(tmp: Path) -> tuple[Path, Path]:
    data = tmp / "demo"
    make_demo(data, n_classes=8, individuals_per_class=12, views_per_individual=6)
    index, _ = index_from_csv(data / "metadata.csv", label_col="individual")
    kept, excluded = check_images(index, data)
    prepare_splits(kept, tmp / "splits", SplitConfig(ratios=(0.4, 0.6, 0.0), mode="open", seed=0), excluded)
    return data, tmp / "splits"


def lions_splits(tmp: Path) -> tuple[Path, Path]:
    if not (LIONS / "val").is_dir():
        sys.exit(f"lions photos not found at {LIONS}; nothing run")
    paths = sorted(p.relative_to(LIONS).as_posix() for p in LIONS.glob("*/*/*.png"))
    table = pd.DataFrame({"path": paths, "label": [p.split("/")[1] for p in paths],
                          "split": [p.split("/")[0] for p in paths]})
    table.to_csv(tmp / "lions.csv", index=False)
    index, _ = index_from_csv(tmp / "lions.csv", data_root=LIONS, split_col="split")
    kept, excluded = check_images(index, LIONS, min_size=64)  # median 130 px: the 224 px rule would drop them all
    prepare_splits(kept, tmp / "splits", SplitConfig(mode="given"), excluded)
    return LIONS, tmp / "splits"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["demo", "lions"], default="demo")
    ap.add_argument("--masks", action="store_true", help="demo only: also probe with the backgrounds painted out")
    ap.add_argument("--run-dir", default="", help="a trained run made on these splits, probed beside ImageNet")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, splits = (demo_splits if args.data == "demo" else lions_splits)(Path(tmp))
        backbones = [LITE0] + ([{"name": "run", "run_dir": args.run_dir}] if args.run_dir else [])
        tables = []
        for mask_col in [""] + (["mask"] if args.masks and args.data == "demo" else []):
            cfg = ProbeConfig(data_dir=str(data), splits_dir=str(splits), split="val", backbones=backbones,
                              cache_dir="", mask_col=mask_col)
            table, _ = run_probe(cfg)
            tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    table["masks"] = table["mask_col"].ne("").map({True: "painted out", False: "no"})
    base = table[table["method"] == "global"].set_index(["backbone", "masks"])
    key = pd.MultiIndex.from_frame(table[["backbone", "masks"]])
    table["x global (mAP)"] = table["identity_balanced_mAP"].to_numpy() / base["identity_balanced_mAP"].reindex(key).to_numpy()
    table["x global (time)"] = table["ms_per_query"].to_numpy() / base["ms_per_query"].reindex(key).to_numpy()
    first = table.iloc[0]
    print(f"\n{args.data}: {first['split']} {first['protocol']}, {first['n_queries']} queries x "
          f"{first['n_gallery']} gallery photos each")
    cols = ["backbone", "masks", "method", "identity_balanced_mAP", "mAP", "recall@1", "recall@5", "ms_per_query",
            "x global (mAP)", "x global (time)"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
