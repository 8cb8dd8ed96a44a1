"""Benchmark (not a test): global-only vs global + local re-ranking vs fused (and query expansion, k-reciprocal), an
ensemble of two backbones (rank averaging, score averaging, learned weights) and the boosted hybrid scorer,
identity-balanced mAP and the time each costs per query, in one run.

    python bench/bench_probe.py [--data demo|lions] [--masks] [--run-dir runs/demo] [--cost-only]

demo: a demo collection made in a temporary folder (8 pattern families x 12 individuals x 6 photos), split by
individual (open set): the probed val split (60 % of the individuals) queries itself leave-one-out. --masks adds the
same probe with each photo's background painted out from the demo's mask column.
lions: ../shared/datasets/lions, its val individuals leave-one-out (train unused by a pretrained backbone).
Backbones: ImageNet EfficientNet-Lite0 and -Lite1 (packaged weights) as they come, at 224 and 240 px; --run-dir adds
a trained run made on the same splits. The ensemble combines them all; its three combiners are three probes that
share one feature cache, made fresh in a temporary folder, and every row reports the extraction cost of its features
(the ensemble's: every member's). 'x global' is the ratio to the backbone's global row; the last table sets the
ensemble and the hybrid against the best single method (global, qe, kreciprocal, local, fusion; any backbone).

Last (alone with --cost-only), what local re-ranking and fusion cost per query on real photos at a gallery's scale:
the lions split closed-set (every fifth photo of each individual a query, the rest the gallery it searches), Lite0,
the fusion pipeline (global shortlist of 20, SIFT of the queries and shortlisted photos, inliers, fusion) timed in
three parts: SIFT extraction, pair matching, and the rest (the query's embedding at its extraction cost, global
search, shortlist, fusion); against global search's own cost per query (embedding + search), with a cold cache and
again warm (every feature and inlier count cached). Skipped, with a line saying so, where the lions are absent.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (first: sets the OpenMP switch before torch and faiss load)

# isort: split
import pandas as pd  # noqa: E402

from data_prep.make_demo import make_demo  # noqa: E402
from lib.data.splits import SplitConfig, prepare_splits  # noqa: E402
from lib.data.table import check_images, index_from_csv  # noqa: E402
from lib.probe import methods as probe_methods  # noqa: E402
from lib.probe.compare import run_probe  # noqa: E402
from lib.probe.config import METHODS, ProbeConfig  # noqa: E402
from lib.probe.ensemble import COMBINERS  # noqa: E402

LIONS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lions"
LITE0 = {"name": "lite0-imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224}
LITE1 = {"name": "lite1-imagenet", "backbone": "tf_efficientnet_lite1", "pretrained": "lite1-imagenet", "img_size": 240}
SINGLE = [m for m in METHODS if m not in ("ensemble", "hybrid")]  # what the ensemble and the hybrid are set against


def demo_splits(tmp: Path) -> tuple[Path, Path]:
    data = tmp / "demo"
    make_demo(data, n_classes=8, individuals_per_class=12, views_per_individual=6)
    index, _ = index_from_csv(data / "metadata.csv", label_col="individual")
    kept, excluded = check_images(index, data)
    identity_disjoint = SplitConfig(ratios=(0.4, 0.6, 0.0), mode="open", unknown_share=1, seed=0)
    prepare_splits(kept, tmp / "splits", identity_disjoint, excluded)
    return data, tmp / "splits"


def lions_splits(tmp: Path, closed: bool = False) -> tuple[Path, Path]:
    """The lions as published (val individuals unseen in train) or, closed, every fifth photo of each individual
    (from its second) in val and the rest in train, so val queries search a gallery that holds their individuals."""
    if not (LIONS / "val").is_dir():
        sys.exit(f"lions photos not found at {LIONS}; nothing run")
    paths = sorted(p.relative_to(LIONS).as_posix() for p in LIONS.glob("*/*/*.png"))
    table = pd.DataFrame({"path": paths, "label": [p.split("/")[1] for p in paths],
                          "split": [p.split("/")[0] for p in paths]})
    if closed:
        table["split"] = table.groupby("label").cumcount().mod(5).eq(1).map({True: "val", False: "train"})
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
    ap.add_argument("--cost-only", action="store_true", help="only the lions' local re-ranking cost per query")
    args = ap.parse_args()
    if not args.cost_only:
        print_methods(args)
    print_local_cost()


def print_methods(args) -> None:
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



@contextlib.contextmanager
def timed(module, *names):
    """{name: [seconds, photos]} filled while the block runs by every call of module.<name>: wall seconds and the
    rows of its first argument where that is a table (sift_table's photos)."""
    spent = {name: [0.0, 0] for name in names}

    def wrap(name, real):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[name][0] += time.perf_counter() - t0
                spent[name][1] += len(args[0]) if isinstance(args[0], pd.DataFrame) else 0
        return call

    reals = {name: getattr(module, name) for name in names}
    for name, real in reals.items():
        setattr(module, name, wrap(name, real))
    try:
        yield spent
    finally:
        for name, real in reals.items():
            setattr(module, name, real)


def print_local_cost() -> None:
    """Per query, the fusion pipeline's SIFT, matching and the rest against global search, cold and warm cache."""
    if not (LIONS / "val").is_dir():
        print(f"\nlocal re-ranking cost: lions photos not found at {LIONS}; skipped")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, splits = lions_splits(Path(tmp), closed=True)
        cfg = ProbeConfig(data_dir=str(data), splits_dir=str(splits), split="val", backbones=[LITE0],
                          methods=["global", "local", "fusion"], cache_dir=str(Path(tmp) / "cache"))
        for cache in ("cold", "warm"):
            with timed(probe_methods, "sift_table", "inlier_table") as spent:
                table, _ = run_probe(cfg)
            by = table.set_index("method")
            n_q = by.loc["global", "n_queries"]
            sift_ms, matching_ms = (1000 * spent[name][0] / n_q for name in ("sift_table", "inlier_table"))
            # fusion's own time holds the matching; the query's embedding is charged at its extraction cost, cached
            # or not, since every new query photo is embedded
            rest_ms = by.loc["global", "feature_ms_per_image"] + by.loc["fusion", "method_ms_per_query"] - matching_ms
            total, global_ms = sift_ms + matching_ms + rest_ms, by.loc["global", "ms_per_query"]
            rows.append({"cache": cache, "SIFT photos": spent["sift_table"][1], "features": sift_ms,
                         "matching": matching_ms, "rest": rest_ms, "local+fusion": total, "global": global_ms,
                         "x global": total / global_ms,
                         "fusion mAP": by.loc["fusion", "identity_balanced_mAP"],
                         "global mAP": by.loc["global", "identity_balanced_mAP"]})
    first = table.iloc[0]
    print(f"\nlions closed set, Lite0, fusion of the top {cfg.shortlist_k}: {first['n_queries']} queries x "
          f"{first['n_gallery']} gallery photos ({first['protocol']}); ms per query")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
