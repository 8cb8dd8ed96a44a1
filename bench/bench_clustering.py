"""Benchmark (not a test): photos of unknown individuals grouped into individuals (lib.retrieval.clustering), with
frozen ImageNet EfficientNet-Lite0 features, and the time clustering takes.

    python bench/bench_clustering.py [--data lions demo] [--seed 42] [--sizes 1000 10000]

Each set is split as bench_open_set.py splits it (notebook 01's split_mode="open", each photo its own group); the
photos of unknown individuals (no photo in train) of val are cut in two by lib.evaluate.calibrate.calibration_mask
(as notebook 03 does): the threshold is chosen on the calibration half (best ARI) and measured on the other half and
on test's unknown photos. Per method (agglomerative average / complete linkage, HDBSCAN): ARI, AMI, pairwise and
B-cubed F1, clusters against individuals, and the best ARI any threshold reaches on the measured photos (what a
perfect threshold choice would give). Timing: cluster_photos at its default settings on synthetic unit vectors
(individuals of 5 photos, 128 dimensions), and HDBSCAN, at each of --sizes photos.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (first: sets the OpenMP switch before torch and faiss load)

# isort: split
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from bench_open_set import LITE0, split_data  # noqa: E402  (this folder is on sys.path when run as a script)

from lib.core.device import auto_settings  # noqa: E402
from lib.evaluate.calibrate import calibration_mask  # noqa: E402
from lib.probe.features import embeddings, load_backbone  # noqa: E402
from lib.retrieval.cluster_metrics import cluster_scores  # noqa: E402
from lib.retrieval.clustering import ClusterSettings, choose_threshold, cluster_photos, threshold_curve  # noqa: E402

METHODS = {"average": ClusterSettings("agglomerative", "average"),
           "complete": ClusterSettings("agglomerative", "complete"),
           "hdbscan": ClusterSettings("hdbscan")}
SHOWN = ("n_photos", "n_individuals", "n_clusters", "ari", "ami", "pair_f1", "bcubed_f1")


def unknown_parts(rows: pd.DataFrame, seed: int) -> dict[str, np.ndarray]:
    """Masks of the unknown photos: val's calibration half, val's other half, test."""
    unknown = ~rows["label"].isin(rows.loc[rows["split"] == "train", "label"]).to_numpy()
    val = unknown & (rows["split"] == "val").to_numpy()
    cal = np.zeros(len(rows), dtype=bool)
    cal[val] = calibration_mask(rows.loc[val, "group"], 0.5, seed)
    return {"calibration": cal, "val held-out": val & ~cal, "test": unknown & (rows["split"] == "test").to_numpy()}


def scores_table(emb: np.ndarray, rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    parts = unknown_parts(rows, seed)
    labels, groups = rows["label"].to_numpy(), rows["group"].to_numpy()
    out = {}
    for name, settings in METHODS.items():
        cal = parts["calibration"]
        threshold, _ = choose_threshold(emb[cal], labels[cal], groups[cal], settings=settings)
        for part in ("val held-out", "test"):
            m = parts[part]
            found = cluster_photos(emb[m], threshold, groups[m], settings=settings)
            best = threshold_curve(emb[m], labels[m], groups[m], settings=settings)["ari"].max()
            out[(name, part)] = {**{k: cluster_scores(labels[m], found)[k] for k in SHOWN}, "threshold": threshold,
                                 "best_ari_any_threshold": best}
    return pd.DataFrame(out).T


def timings(sizes, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        centres = rng.normal(size=(n // 5, 128))
        emb = np.repeat(centres, 5, axis=0) + 0.5 * rng.normal(size=(n // 5 * 5, 128))
        for name in ("average", "hdbscan"):
            t0 = time.perf_counter()
            found = cluster_photos(emb, 0.3, settings=METHODS[name])
            rows.append({"photos": len(emb), "method": name, "seconds": time.perf_counter() - t0,
                         "ari": cluster_scores(np.repeat(np.arange(n // 5), 5), found)["ari"]})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", choices=["lions", "demo"], default=["lions", "demo"])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--sizes", nargs="*", type=int, default=[1000, 10000])
    args = ap.parse_args()
    for data in args.data:
        with tempfile.TemporaryDirectory() as tmp_name:
            root, rows = split_data(data, Path(tmp_name), args.seed)
            t0 = time.perf_counter()
            emb, _ = embeddings(load_backbone(LITE0), rows, root, auto_settings(device="cpu"))
            print(f"{data}: {len(rows)} photos embedded in {time.perf_counter() - t0:.0f} s")
        table = scores_table(emb, rows.reset_index(drop=True), args.seed)
        print(f"{data}, frozen Lite0 features, unknown individuals' photos, seed {args.seed}")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    if args.sizes:
        print("clustering time, synthetic 128-d vectors (individuals of 5 photos)")
        print(timings(args.sizes, args.seed).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
