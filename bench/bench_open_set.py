"""Benchmark (not a test): the open-set protocol with frozen ImageNet EfficientNet-Lite0 features.

    python bench/bench_open_set.py [--data lions|demo] [--seed 42] [--k 20]

Split as notebook 01 does with split_mode="open" (unknown_share 0.2 of the val/test individuals held out of train;
each photo its own group), the train photos are the gallery, val and test the queries; each query votes over its k
nearest gallery photos (inverse-distance weights), the new-individual threshold is chosen on val (best harmonic mean
of BAKS and BAUS, as notebook 03 does) and applied to test; no reshoot (margin threshold 0). Prints, per split: known and unknown
individuals and queries, BAKS, BAUS, their harmonic mean, AUROC of new-vs-known from the top-1 distance and from the
vote margin, and Recall@1 / mAP of the known queries alone (lib.retrieval.open_set).
lions: ../shared/datasets/lions (train and val folders pooled, 94 individuals); demo: the demo's individuals
(metadata.csv), made in a temporary folder.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (first: sets the OpenMP switch before torch and faiss load)

# isort: split
import pandas as pd  # noqa: E402

from data_prep.make_demo import make_demo  # noqa: E402
from lib.core.device import auto_settings  # noqa: E402
from lib.data.splits import SplitConfig, load_split_index, prepare_splits  # noqa: E402
from lib.data.table import check_images, index_from_csv  # noqa: E402
from lib.probe.features import embeddings, load_backbone  # noqa: E402
from lib.retrieval.decide import decisions  # noqa: E402
from lib.retrieval.faiss_index import build_index, fill_padding, search  # noqa: E402
from lib.retrieval.open_set import balanced_new_threshold, open_set_report  # noqa: E402

LIONS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "lions"
LITE0 = {"name": "lite0-imagenet", "backbone": "tf_efficientnet_lite0", "pretrained": "lite0-imagenet", "img_size": 224}


def split_data(name: str, tmp: Path, seed: int) -> tuple[Path, pd.DataFrame]:
    """(data root, the split index with its `split` column) of the open-set split of `name`."""
    if name == "lions":
        if not (LIONS / "val").is_dir():
            sys.exit(f"lions photos not found at {LIONS}; nothing run")
        root = LIONS
        paths = sorted(p.relative_to(LIONS).as_posix() for p in LIONS.glob("*/*/*.png"))
        pd.DataFrame({"path": paths, "label": [p.split("/")[1] for p in paths]}).to_csv(tmp / "photos.csv", index=False)
        index, _ = index_from_csv(tmp / "photos.csv", data_root=LIONS)
        min_size = 64  # median 130 px: the 224 px rule would drop them all
    else:
        root = tmp / "demo"
        make_demo(root)
        index, _ = index_from_csv(root / "metadata.csv", label_col="individual")
        min_size = 224
    kept, excluded = check_images(index, root, min_size=min_size)
    prepare_splits(kept, tmp / "splits", SplitConfig(mode="open", seed=seed), excluded)
    return root, load_split_index(tmp / "splits")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["lions", "demo"], default="lions")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root, rows = split_data(args.data, tmp, args.seed)
        t0 = time.perf_counter()
        emb, _ = embeddings(load_backbone(LITE0), rows, root, auto_settings(device="cpu"))
        print(f"{len(rows)} photos embedded in {time.perf_counter() - t0:.0f} s")
    gallery = rows["split"].to_numpy() == "train"
    index = build_index(emb[gallery], "cpu")
    g_labels = rows.loc[gallery, "label"].to_numpy()
    reports, new_threshold = {}, None
    for split in ("val", "test"):
        part = (rows["split"] == split).to_numpy()
        distances, neighbours = search(index, emb[part], args.k)
        table, _ = decisions(distances, g_labels[fill_padding(neighbours)], sorted(set(g_labels)))
        queries = pd.concat([rows.loc[part, ["label"]].reset_index(drop=True), table], axis=1)
        if new_threshold is None:  # chosen on val, applied to test
            unknown = set(queries.loc[~queries["label"].isin(g_labels), "label"])
            new_threshold = balanced_new_threshold(queries["label"], queries["pred"], queries["top1_distance"], unknown)
        reports[split] = open_set_report(queries, g_labels, emb[gallery], emb[part], new_threshold)
    keys = ["n_known_individuals", "n_unknown_individuals", "n_known_queries", "n_unknown_queries", "BAKS", "BAUS",
            "harmonic_mean", "auroc_top1_distance", "auroc_margin", "new_threshold"]
    table = pd.DataFrame({s: {**{key: r[key] for key in keys}, **{f"{key} (known)": v for key, v in
                                                                   r["known_queries"].items()}}
                          for s, r in reports.items()})
    print(f"{args.data}, frozen Lite0 features, {int(gallery.sum())} gallery photos, k = {args.k}, seed {args.seed}")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
