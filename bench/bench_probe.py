"""Benchmark (not a test): global-only vs global + local re-ranking vs fused (and query expansion, k-reciprocal), an
ensemble of two backbones (rank averaging, score averaging, learned weights) and the boosted hybrid scorer,
identity-balanced mAP and the time each costs per query, in one run.

    python bench/bench_probe.py [--data demo|lions] [--masks] [--run-dir runs/demo]

demo: a demo collection made in a temporary folder (8 pattern families x 12 individuals x 6 photos), split by
individual (open set): the probed val split (60 % of the individuals) queries itself leave-one-out. --masks adds the
same probe with each photo's background painted out from the demo's mask column.
lions: ../shared/datasets/lions, its val individuals leave-one-out (train unused by a pretrained backbone).
Backbones: ImageNet EfficientNet-Lite0 and -Lite1 (packaged weights) as they come, at 224 and 240 px; --run-dir adds
a trained run made on the same splits. The ensemble combines them all; its three combiners are three probes that
share one feature cache, made fresh in a temporary folder, and every row reports the extraction cost of its features
(the ensemble's: every member's). 'x global' is the ratio to the backbone's global row; the last table sets the
ensemble and the hybrid against the best single method (global, qe, kreciprocal, local, fusion; any backbone).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (first: sets the OpenMP switch before torch and faiss load)
# isort: split
import pandas as pd  # noqa: E402

from data_prep.make_demo import make_demo  # noqa: E402
from lib.data.splits import SplitConfig, prepare_splits  # noqa: E402
from lib.data.table import check_images, index_from_csv  # noqa: E402
from lib.probe.ensemble import COMBINERS  # noqa: E402
from lib.probe.run import METHODS, ProbeConfig, run_probe  # noqa: E402

LIONS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lions"
LITE0 = {"name": "lite0-imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224}
LITE1 = {"name": "lite1-imagenet", "backbone": "tf_efficientnet_lite1", "pretrained": "lite1-imagenet", "img_size": 240}
SINGLE = [m for m in METHODS if m not in ("ensemble", "hybrid")]  # what the ensemble and the hybrid are set against


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
        backbones = [LITE0, LITE1] + ([{"name": "run", "run_dir": args.run_dir}] if args.run_dir else [])
        tables = []
        for mask_col in [""] + (["mask"] if args.masks and args.data == "demo" else []):
            common = dict(data_dir=str(data), splits_dir=str(splits), split="val", backbones=backbones,
                          cache_dir=str(Path(tmp) / "cache"), mask_col=mask_col)
            table, _ = run_probe(ProbeConfig(**common))
            tables.append(table.assign(method=table["method"].replace("ensemble", "ensemble (logistic)")))
            for combiner in [c for c in COMBINERS if c != "logistic"]:
                table, _ = run_probe(ProbeConfig(**common, methods=["ensemble"], ensemble_combine=combiner))
                tables.append(table.assign(method=f"ensemble ({combiner})"))
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
    print_against_best_single(table)


def print_against_best_single(table: pd.DataFrame) -> None:
    """The ensemble and hybrid rows beside the best single-backbone, non-learned-across method, per mask setting,
    and what the learned ones leaned on."""
    for masks, rows in table.groupby("masks", sort=False):
        single = rows[rows["method"].isin(SINGLE)]
        best = single.loc[single["identity_balanced_mAP"].idxmax()]
        learned = rows[rows["method"].str.startswith("ensemble") | (rows["method"] == "hybrid")]
        shown = pd.concat([best.to_frame().T, learned], ignore_index=True)
        shown["x best (mAP)"] = shown["identity_balanced_mAP"].astype(float) / best["identity_balanced_mAP"]
        shown["x best (time)"] = shown["ms_per_query"].astype(float) / best["ms_per_query"]
        print(f"\nmasks {masks}: against the best single method ({best['backbone']} / {best['method']})")
        cols = ["backbone", "method", "identity_balanced_mAP", "mAP", "recall@1", "recall@5", "ms_per_query",
                "x best (mAP)", "x best (time)"]
        print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for _, row in learned[learned["importance"].ne("")].iterrows():
            print(f"  {row['backbone']} / {row['method']}: {json.loads(row['importance'])}")


if __name__ == "__main__":
    main()
