"""Leave-one-out figures under the photo rule and the group rule (lib.retrieval.exclusion), frozen features (benchmark,
not a test).

    python bench/bench_loo_rule.py [--lions ../shared/datasets/lions] [--sizes 224 320]

Frozen ImageNet EfficientNet-Lite0 pooled features (the packaged weights, no head), squash resize, every photo a query
of the others (lib.retrieval.ranking.evaluate_retrieval, exclude=leave_one_out(n, groups)), with each rule:
  lions val (146 photos of 19 individuals; the open / open-ids protocol and probe of docs/benchmarks.md): groups as
        those benches make them (every file its own group, the lions carry no encounter) and, as an assumption to show
        what the rule can do, one group per individual and side (its Left_* crops, its Right_* crops, the rest), as
        if each side's crops were cut from one photo;
  demo: the make-demo photos (6 pattern families x 8 individuals x 5 views) as classification by retrieval, label =
        the family, group = the individual (the folder layout's ID): under the group rule a photo must find its
        family through other individuals, not through other views of its own.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (first: sets the OpenMP switch before torch and faiss load)
# isort: split
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from bench_training_recipes import markdown, read  # noqa: E402  (a sibling script: bench/ is on the path when run)
from torch import nn  # noqa: E402

from data_prep.make_demo import make_demo  # noqa: E402
from lib.core.device import auto_settings  # noqa: E402
from lib.data.dataset import IndexDataset  # noqa: E402
from lib.data.splits import class_to_idx  # noqa: E402
from lib.data.table import check_images, index_from_folder  # noqa: E402
from lib.data.transforms import build_transforms  # noqa: E402
from lib.retrieval.embed import extract_embeddings  # noqa: E402
from lib.retrieval.exclusion import leave_one_out  # noqa: E402
from lib.retrieval.ranking import evaluate_retrieval  # noqa: E402
from lib.train.model import ModelConfig, create_model  # noqa: E402

MIN_SIZE = 32  # the lions are small by nature (median 130 px): keep every one


def side_groups(index: pd.DataFrame) -> np.ndarray:
    """individual/side: 'left' or 'right' where the file name says so, else 'front'."""
    name = index["path"].str.lower()
    side = np.where(name.str.contains("left"), "left", np.where(name.str.contains("right"), "right", "front"))
    return (index["label"] + "/" + side).to_numpy()


def scores(emb, labels, groups=None) -> dict:
    m = evaluate_retrieval(emb, labels, emb, labels, leave_one_out(len(emb), groups), ks=(1, 5))
    return {k: m[k] for k in ("recall@1", "recall@5", "mAP", "identity_balanced_mAP", "n_queries_without_relevant")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lions", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/lions"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    args = ap.parse_args()
    lions = Path(args.lions)
    if not (lions / "val").is_dir():
        sys.exit(f"lions photos not found: {lions} needs a val/ folder (pass --lions PATH); nothing run")
    settings = auto_settings(device="auto", num_workers=1)
    model = create_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained="lite0-imagenet", embed_dim=512))
    net = nn.Sequential(model.backbone, model.pool).eval()
    dc = model.data_config
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        demo_root = Path(tmp) / "demo"
        make_demo(demo_root)
        demo, _ = check_images(index_from_folder(demo_root)[0], demo_root)
        sets = {"lions val": (read(lions / "val", MIN_SIZE), lions / "val"), "demo": (demo, demo_root)}
        for size in args.sizes:
            _, tf = build_transforms(size, dc["mean"], dc["std"], preset="none", resize="squash")
            for name, (index, root) in sets.items():
                emb = extract_embeddings(net, IndexDataset(index, root, tf, class_to_idx(index)), settings)
                labels = index["label"].to_numpy()
                rules = {"photo": None, "group": index["group"].to_numpy()}
                if name == "lions val":
                    rules["group = individual + side (assumed)"] = side_groups(index)
                for rule, groups in rules.items():
                    rows.append({"set": name, "px": size, "rule": rule, **scores(emb, labels, groups)})
                    print(rows[-1], flush=True)
    print(markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
