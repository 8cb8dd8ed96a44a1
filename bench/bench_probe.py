"""Benchmark (not a test): global-only vs global + local re-ranking vs fused (and query expansion, k-reciprocal), an
ensemble of two backbones (rank averaging, score averaging, learned weights) and the boosted hybrid scorer,
identity-balanced mAP and the time each costs per query, in one run.

    python bench/bench_probe.py [--data demo|lions] [--masks] [--run-dir runs/demo]
    python bench/bench_probe.py --cost-only [--data lions|demo|FOLDER] [--size 640] [--old] [--sizes 256,512]

demo: a demo collection made in a temporary folder (8 pattern families x 12 individuals x 6 photos), split by
individual (open set): the probed val split (60 % of the individuals) queries itself leave-one-out. --masks adds the
same probe with each photo's background painted out from the demo's mask column.
lions: ../shared/datasets/lions, its val individuals leave-one-out (train unused by a pretrained backbone).
Backbones: ImageNet EfficientNet-Lite0 and -Lite1 (packaged weights) as they come, at 224 and 240 px; --run-dir adds
a trained run made on the same splits. The ensemble combines them all; its three combiners are three probes that
share one feature cache, made fresh in a temporary folder, and every row reports the extraction cost of its features
(the ensemble's: every member's). 'x global' is the ratio to the backbone's global row; the last table sets the
ensemble and the hybrid against the best single method (global, qe, kreciprocal, local, fusion; any backbone).

Last (alone with --cost-only), what local re-ranking and fusion cost per query against global search, cold (an
empty feature cache) and warm (every feature and inlier count cached), with their Recall@1 and mAP; Lite0, a global
shortlist of 20. The photos: the lions upscaled to --size px (640; 0 keeps them as they are) split closed set (every
fifth photo of each individual a query, the rest the gallery it searches), any FOLDER of {individual}/{photo} split
so too, or the demo made at --size px (val leave-one-out). 'ms' is the probe's own figure, as global's: the query
photo's features at their extraction cost, then the shortlist, matching and fusion; 'all-in' charges every SIFT
extraction of the run, the gallery's included, to the queries. --old adds the matcher before the batched one (SIFT
at 512 px and 1000 keypoints extracted one photo at a time, BFMatcher and RANSAC pair by pair, kept in this file)
in the same run, so both share the machine's load; --sizes adds the batched matcher with SIFT at other sizes.
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
from lib.probe import features as probe_features  # noqa: E402
from lib.probe import local_match  # noqa: E402
from lib.probe import methods as probe_methods  # noqa: E402
from lib.probe.compare import run_probe  # noqa: E402
from lib.probe.config import ProbeConfig  # noqa: E402
from lib.probe.ensemble import COMBINERS  # noqa: E402

LIONS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lions"
LITE0 = {"name": "lite0-imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224}
LITE1 = {"name": "lite1-imagenet", "backbone": "tf_efficientnet_lite1", "pretrained": "lite1-imagenet", "img_size": 240}
SINGLE = [m for m in probe_methods.PROBE_METHODS if m not in ("ensemble", "hybrid")]  # what the ensemble and the hybrid are set against


def demo_splits(tmp: Path, size: int = 256) -> tuple[Path, Path]:
    data = tmp / "demo"
    make_demo(data, n_classes=8, individuals_per_class=12, views_per_individual=6, size=size)
    index, _ = index_from_csv(data / "metadata.csv", label_col="individual")
    kept, excluded = check_images(index, data)
    identity_disjoint = SplitConfig(ratios=(0.4, 0.6, 0.0), mode="open", unknown_share=1, seed=0)
    prepare_splits(kept, tmp / "splits", identity_disjoint, excluded)
    return data, tmp / "splits"


def given_splits(table: pd.DataFrame, data: Path, tmp: Path) -> tuple[Path, Path]:
    """Splits as the table's 'split' column gives them, of photos (its 'path', 'label') under data."""
    table.to_csv(tmp / "photos.csv", index=False)
    index, _ = index_from_csv(tmp / "photos.csv", data_root=data, split_col="split")
    kept, excluded = check_images(index, data, min_size=64)  # lions: median 130 px, the 224 px rule drops them all
    prepare_splits(kept, tmp / "splits", SplitConfig(mode="given"), excluded)
    return data, tmp / "splits"


def lions_splits(tmp: Path) -> tuple[Path, Path]:
    """The lions as published (val individuals unseen in train)."""
    if not (LIONS / "val").is_dir():
        sys.exit(f"lions photos not found at {LIONS}; nothing run")
    paths = sorted(p.relative_to(LIONS).as_posix() for p in LIONS.glob("*/*/*.png"))
    table = pd.DataFrame({"path": paths, "label": [p.split("/")[1] for p in paths],
                          "split": [p.split("/")[0] for p in paths]})
    return given_splits(table, LIONS, tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo", help="demo | lions | a folder of {individual}/{photo} (--cost-only)")
    ap.add_argument("--masks", action="store_true", help="demo only: also probe with the backgrounds painted out")
    ap.add_argument("--run-dir", default="", help="a trained run made on these splits, probed beside ImageNet")
    ap.add_argument("--cost-only", action="store_true", help="only local re-ranking's cost per query")
    ap.add_argument("--size", type=int, default=640, help="cost table: photos' longer side in px (0: as they are)")
    ap.add_argument("--old", action="store_true", help="cost table: the old pair-by-pair matcher in the same run")
    ap.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="cost table: also the batched matcher with SIFT at these max_side values, e.g. 256,512")
    args = ap.parse_args()
    if not args.cost_only:
        if args.data not in ("demo", "lions"):
            sys.exit("the methods table runs on --data demo or lions; a folder goes with --cost-only")
        print_methods(args)
    print_local_cost(args)


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
def timed(*where):
    """{name: [seconds, photos]} filled while the block runs by every call of each (module, name) in `where`, patched
    where its caller looks it up: wall seconds and the rows of its first argument where that is a table
    (sift_table's photos)."""
    spent = {name: [0.0, 0] for _, name in where}

    def wrap(name, real):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[name][0] += time.perf_counter() - t0
                spent[name][1] += len(args[0]) if isinstance(args[0], pd.DataFrame) else 0
        return call

    reals = {(module, name): getattr(module, name) for module, name in where}
    for (module, name), real in reals.items():
        setattr(module, name, wrap(name, real))
    try:
        yield spent
    finally:
        for (module, name), real in reals.items():
            setattr(module, name, real)


OLD_SIFT = {"max_side": 512, "n_features": 1000}  # the settings the old matcher ran at


def old_count_inliers(a, b, cfg) -> int:
    """The matcher local re-ranking had before the batched one (kept here, for comparison only): pair by pair,
    BFMatcher's two nearest on raw SIFT, Lowe's ratio test, one match per gallery keypoint, plain RANSAC."""
    import cv2
    import numpy as np

    (pts_a, desc_a), (pts_b, desc_b) = a, b
    if len(desc_a) < 2 or len(desc_b) < 2:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc_a.astype(np.float32), desc_b.astype(np.float32), k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < cfg.ratio * p[1].distance]
    one_to_one = {}
    for m in sorted(good, key=lambda m: m.distance):
        one_to_one.setdefault(m.trainIdx, m)
    good = list(one_to_one.values())
    if len(good) < local_match.MIN_MATCHES[cfg.geometry]:
        return 0
    src = pts_a[[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = pts_b[[m.trainIdx for m in good]].reshape(-1, 1, 2)
    cv2.setRNGSeed(0)
    if cfg.geometry == "homography":
        _, status = cv2.findHomography(src, dst, cv2.RANSAC, cfg.ransac_px, maxIters=500)
    else:
        _, status = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.ransac_px,
                                                maxIters=500)
    return 0 if status is None else int(status.sum())


@contextlib.contextmanager
def old_matcher(on: bool):
    """While on: the probe extracts SIFT one photo at a time and matches pair by pair (a thread pool over pairs),
    as before the batched matcher."""
    import numpy as np

    if not on:
        yield
        return
    real_pairs, real_threads = probe_features.pair_inliers, probe_features.in_threads
    probe_features.pair_inliers = lambda pairs, cfg, workers=None: np.array(
        local_match.in_threads(lambda pair: old_count_inliers(*pair, cfg), pairs, workers), np.float32)
    probe_features.in_threads = lambda work, items, workers=None: [work(i) for i in items]
    try:
        yield
    finally:
        probe_features.pair_inliers, probe_features.in_threads = real_pairs, real_threads


def upscaled(src: Path, dst: Path, size: int) -> Path:
    """A copy of every photo under src (same relative paths) scaled so its longer side is `size` px, JPEG data as
    the lions' own files hold: the photo size a camera trap or phone gives, made from small crops."""
    from PIL import Image

    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"}):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / max(im.size)
            im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC).save(out, "JPEG", quality=92)
    return dst


def folder_splits(data: Path, tmp: Path) -> tuple[Path, Path]:
    """Any folder of {individual}/{photo} (at any depth: the photo's folder names the individual), split closed
    set: every fifth photo of each individual (from its second) a query, the rest the gallery it searches."""
    paths = sorted(p.relative_to(data).as_posix() for p in data.rglob("*")
                   if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    table = pd.DataFrame({"path": paths, "label": [p.split("/")[-2] for p in paths]})
    table["split"] = table.groupby("label").cumcount().mod(5).eq(1).map({True: "val", False: "train"})
    return given_splits(table, data, tmp)


def cost_sets(args, tmp: Path):
    """(name, data dir, splits dir) of the photo sets the cost table measures, at args.size px where that is set."""
    if args.data == "demo":
        # made at the size itself: the demo's patterns have detail at every scale, unlike an upscaled crop
        data, splits = demo_splits(tmp, size=args.size or 256)
        return [(f"demo {args.size or 256} px, val leave-one-out", data, splits)]
    src = LIONS if args.data == "lions" else Path(args.data)
    if not src.is_dir():
        print(f"\nlocal re-ranking cost: photos not found at {src}; skipped")
        return []
    if args.size:
        src = upscaled(src, tmp / "photos", args.size)
    data, splits = folder_splits(src, tmp)
    return [(f"{args.data} {args.size or 'as they are'} px, closed set", data, splits)]


def cost_row(table: pd.DataFrame, spent: dict) -> dict:
    """ms per query of global, local and fusion, and their accuracy. 'ms' is the probe's own figure, as global's: the
    query photo's features (embedding, SIFT) at their extraction cost, then the method's work (shortlist, matching,
    fusion); the gallery's features are made once, ahead. 'all-in ms' charges the run's every SIFT extraction
    (gallery photos included; warm: the cache reads) to its queries instead of the query's own."""
    by = table.set_index("method")
    n_q = by.loc["global", "n_queries"]
    sift_ms, matching_ms = (1000 * spent[name][0] / n_q for name in ("sift_table", "inlier_table"))
    global_ms = by.loc["global", "ms_per_query"]
    row = {"SIFT photos": spent["sift_table"][1], "SIFT ms": sift_ms, "matching ms": matching_ms,
           "global ms": global_ms}
    for method in ("local", "fusion"):
        row[f"{method} ms"] = by.loc[method, "ms_per_query"]
        row[f"{method} x global"] = row[f"{method} ms"] / global_ms
    for method in ("local", "fusion"):
        all_in = sift_ms + by.loc["global", "feature_ms_per_image"] + by.loc[method, "method_ms_per_query"]
        row[f"{method} all-in x global"] = all_in / global_ms
    for method in ("global", "local", "fusion"):
        row[f"{method} R@1"] = by.loc[method, "recall@1"]
        row[f"{method} mAP"] = by.loc[method, "mAP"]
    return row


def matchers(args) -> list[tuple[str, dict]]:
    """(name, SiftConfig fields) of each matcher the cost table measures."""
    new = [(f"new {side} px", {"max_side": side}) for side in args.sizes]
    return (([("old", OLD_SIFT)] if args.old else []) + [("new", {})] + new)


def print_local_cost(args) -> None:
    """Per query, global search against local re-ranking and fusion, cold and warm cache."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, data, splits in cost_sets(args, Path(tmp)):
            for n, (matcher, sift) in enumerate(matchers(args)):
                cfg = ProbeConfig(data_dir=str(data), splits_dir=str(splits), split="val", backbones=[LITE0],
                                  methods=["global", "local", "fusion"], cache_dir=str(Path(tmp) / f"cache{n}"),
                                  sift=sift)
                for cache in ("cold", "warm"):
                    with old_matcher(matcher == "old"), timed((probe_features, "sift_table"), (probe_methods, "inlier_table")) as spent:
                        table, _ = run_probe(cfg)
                    rows.append({"photos": name, "matcher": matcher, "cache": cache, **cost_row(table, spent)})
                    print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
                          flush=True)
            first = table.iloc[0]
            print(f"{name}: {first['n_queries']} queries x {first['n_gallery']} gallery photos ({first['protocol']}), "
                  f"Lite0, shortlist {cfg.shortlist_k}", flush=True)
    table = pd.DataFrame(rows)
    costs = [c for c in table.columns if "R@1" not in c and "mAP" not in c]
    print("\nms per query (one run: the ratios share the machine's load)")
    print(table[costs].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print("\naccuracy (Recall@1, mAP)")
    print(table[["photos", "matcher", "cache"] + [c for c in table.columns if c not in costs]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
