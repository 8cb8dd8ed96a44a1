"""How a photo is made square for the network, measured on real photos: crop vs squash vs pad at 224 and 320 px.

    python bench/bench_resize_modes.py [--lions ../shared/datasets/lions] [--sizes 224 320] [--out /tmp/bench_resize_modes.md]

Frozen tf_efficientnet_lite0 ImageNet weights ('lite0-imagenet'), its plain GeM-pooled backbone features (no
embedding head: an untrained head is a random projection). Every photo of ../shared/datasets/lions is embedded once
per (resize mode, img_size) through lib.data.transforms.build_transforms(preset='none', resize=mode), i.e. exactly
the eval transform a run with AugConfig.resize = mode uses, and scored leave-one-out (each photo queries all others,
lib.retrieval.ranking.evaluate_retrieval with exclude=leave_one_out(n)). The lions set has no closed protocol: train/ and val/
hold disjoint individuals, so train photos cannot be a gallery for val queries. Since the features never saw a lion,
all of it is unseen data, and three open-set protocols are scored:
  val   - 146 val photos of 19 individuals (the protocol of bench/bench_pretrained_lions.py and docs/benchmarks.md);
  train - 594 train photos of 75 individuals (4x the queries: less noise);
  all   - all 740 photos of 94 individuals (every other individual a distractor);
  all, trimmed 3:2 - the same 740 photos, each centre-trimmed to 3:2 landscape or 2:3 portrait (half each, seeded):
          the lions photos are near-square (median w/h 1.03), camera photos are not, and a collection mixes both
          orientations; this shows what squash's stretching (opposite ways for the two orientations) and pad's
          smaller photo cost on such shapes.
Then a paired comparison of each mode with crop at the same size on 'all' and 'all, trimmed 3:2': the per-query difference in Recall@1 hit and
in AP, with its standard error, because the modes score the same queries and a paired difference is far less noisy
than two separate means. 'seconds' = embedding all 740 photos (transform + forward) on this machine.
"""

import argparse
import sys
import time
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (first: sets the OpenMP switch before torch and faiss load)
# isort: split
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from torch import nn  # noqa: E402
from bench_training_recipes import markdown, read  # noqa: E402  (a sibling script: bench/ is on the path when run)
from torchvision.transforms.v2 import functional as F  # noqa: E402

from lib.core.device import auto_settings  # noqa: E402
from lib.core.state_io import write_text  # noqa: E402
from lib.data.dataset import IndexDataset  # noqa: E402
from lib.data.images import open_image  # noqa: E402
from lib.data.splits import class_to_idx  # noqa: E402
from lib.data.transforms import RESIZES, build_transforms  # noqa: E402
from lib.retrieval.embed import EMBED_BATCH_SIZE, extract_embeddings  # noqa: E402
from lib.retrieval.exclusion import leave_one_out  # noqa: E402
from lib.retrieval.ranking import evaluate_retrieval  # noqa: E402
from lib.train.checkpoint import seed_everything  # noqa: E402
from lib.train.model import ModelConfig, create_model  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"
MIN_SIZE = 32            # the photos are small by nature (median 130 px, smallest 67x58): keep every one
NUM_WORKERS = 1


class Trimmed(IndexDataset):
    """Each photo centre-trimmed to aspect w/h `aspects[i]` before the transform."""

    def __init__(self, *args, aspects: np.ndarray, **kwargs):
        super().__init__(*args, **kwargs)
        self.aspects = aspects

    def __getitem__(self, i: int):
        image = open_image(self.paths[i])
        w, h = image.size
        tw, th = min(w, round(h * self.aspects[i])), min(h, round(w / self.aspects[i]))
        return self.transform(F.center_crop(image, [th, tw])), self.targets[i]


def loo(emb: np.ndarray, labels: np.ndarray) -> dict:
    return evaluate_retrieval(emb, labels, emb, labels, leave_one_out(len(emb)), ks=(1, 5))


def top1_hits(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per query (leave-one-out): whether its nearest other photo (cosine) has its label."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return (labels[sim.argmax(axis=1)] == labels).astype(float)


def paired(a: np.ndarray, b: np.ndarray) -> str:
    """mean(a - b) +- its standard error, over the queries where both are defined."""
    ok = ~(np.isnan(a) | np.isnan(b))
    d = a[ok] - b[ok]
    return f"{d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(len(d)):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lions", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/lions"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    ap.add_argument("--out", default="/tmp/bench_resize_modes.md", help="markdown results file")
    args = ap.parse_args()
    lions = Path(args.lions)
    if not ((lions / "train").is_dir() and (lions / "val").is_dir()):
        sys.exit(f"lions photos not found: {lions} needs train/ and val/ folders (pass --lions PATH); nothing run")

    parts = {part: read(lions / part, MIN_SIZE) for part in ("train", "val")}
    index = pd.concat([p.assign(path=f"{name}/" + p["path"]) for name, p in parts.items()], ignore_index=True)
    labels = index["label"].to_numpy()
    is_val = index["path"].str.startswith("val/").to_numpy()
    aspect = (index["width"] / index["height"]).to_numpy()
    off_square = float(np.mean(np.abs(np.log(aspect)) > np.log(1.2)))
    print(f"{len(index)} photos ({is_val.sum()} val) of {len(set(labels))} individuals; aspect w/h median "
          f"{np.median(aspect):.2f}, 10-90% {np.percentile(aspect, 10):.2f}-{np.percentile(aspect, 90):.2f}, "
          f"{off_square:.0%} more than 1.2x off square")

    settings = auto_settings(device="auto", num_workers=NUM_WORKERS)
    seed_everything(0)
    model = create_model(ModelConfig(backbone=BACKBONE, pretrained="lite0-imagenet", embed_dim=512)).eval()
    net = nn.Sequential(model.backbone, model.pool).eval()
    dc = model.data_config

    everyone = np.ones(len(index), bool)
    aspects = np.where(np.random.default_rng(0).permutation(len(index)) % 2 == 0, 3 / 2, 2 / 3)
    variants = {"": (IndexDataset, {}, (("val", is_val), ("train", ~is_val), ("all", everyone))),
                ", trimmed 3:2": (Trimmed, {"aspects": aspects}, (("all", everyone),))}
    rows, per_query = [], {}
    for variant, (dataset_cls, extra, protocols) in variants.items():
        for size in args.sizes:
            for mode in RESIZES:
                _, eval_tf = build_transforms(size, dc["mean"], dc["std"], preset="none", resize=mode)
                dataset = dataset_cls(index, lions, eval_tf, class_to_idx(index), **extra)
                t0 = time.perf_counter()
                emb = extract_embeddings(net, dataset, settings, batch_size=EMBED_BATCH_SIZE)
                seconds = time.perf_counter() - t0
                for protocol, rows_of in protocols:
                    m = loo(emb[rows_of], labels[rows_of])
                    rows.append({"protocol": protocol + variant, "resize": mode, "img_size": size,
                                 "queries": int(m["n_queries"]), "recall@1": m["recall@1"], "recall@5": m["recall@5"],
                                 "mAP": m["mAP"], "id_bal_mAP": m["identity_balanced_mAP"],
                                 "seconds": round(seconds, 1)})
                    if protocol == "all":
                        per_query[variant, mode, size] = (top1_hits(emb, labels), m["ap"])
                        assert abs(per_query[variant, mode, size][0].mean() - m["recall@1"]) < 1e-9
                print(f"{mode} {size}{variant}: {seconds:.0f} s")

    table = pd.DataFrame(rows)
    table["protocol"] = pd.Categorical(table["protocol"], ["val", "train", "all", "all, trimmed 3:2"], ordered=True)
    table = table.sort_values(["protocol", "img_size"], kind="stable")  # modes stay in RESIZES order
    diffs = []
    for variant in variants:
        for size in args.sizes:
            for a, b in (("squash", "crop"), ("pad", "crop"), ("squash", "pad")):
                (hits_a, ap_a), (hits_b, ap_b) = per_query[variant, a, size], per_query[variant, b, size]
                diffs.append({"protocol": "all" + variant, "img_size": size, "comparison": f"{a} - {b}",
                              "recall@1": paired(hits_a, hits_b), "AP": paired(ap_a, ap_b)})
    diffs = pd.DataFrame(diffs)
    print("\n" + table.to_string(index=False) + "\n\npaired per-query differences (mean +- s.e.):\n"
          + diffs.to_string(index=False))
    text = ["# Resize modes on the lions (frozen lite0 ImageNet GeM features, leave-one-out)", "", markdown(table), "",
            f"Paired per-query differences ({len(index)} queries; mean +- standard error):", "",
            markdown(diffs), "",
            (f"{BACKBONE}, device {settings.device}; {len(index)} photos, aspect w/h median {np.median(aspect):.2f}, "
             f"{off_square:.0%} more than 1.2x off square."), ""]
    write_text(args.out, "\n".join(text))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
