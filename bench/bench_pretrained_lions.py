"""Pretrained vs random weights on the real lions photos (issue 9, item 4).

    python bench/bench_pretrained_lions.py [--minutes 10] [--lions ../shared/datasets/lions] [--out /tmp/bench_lions_result.md]

tf_efficientnet_lite0 at 224 px, embed_dim 512. Training uses lions/train (label = individual); every row is scored
on lions/val (19 other individuals) leave-one-out: each val photo queries all other val photos. Rows:
  (a) frozen ImageNet weights ('lite0-imagenet'): the EmbeddingModel as created (its Linear+BN head is random) and
      the plain pooled backbone features (the honest "frozen ImageNet features");
  (b) the project's training loop (lib.train.run.train_run) from ImageNet weights, for a wall-clock budget;
  (c) the same loop from random weights, same budget.
The loop validates on photos held out of lions/train (the val individuals are not in its gallery, so the loop's
train-gallery protocol would score 0 there); that split only selects the checkpoint. It takes ~25 min on 2 cores.
"""

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import lib.core.device  # noqa: E402,F401  (first: sets the OpenMP switch before torch and faiss load)
# isort: split
import pandas as pd  # noqa: E402
from torch import nn  # noqa: E402

from lib.core.device import auto_settings  # noqa: E402
from lib.data.dataset import IndexDataset  # noqa: E402
from lib.data.splits import SplitConfig, class_to_idx, prepare_splits  # noqa: E402
from lib.data.table import check_images, index_from_folder  # noqa: E402
from lib.data.transforms import build_transforms  # noqa: E402
from lib.retrieval.embed import EMBED_BATCH_SIZE, extract_embeddings  # noqa: E402
from lib.retrieval.ranking import evaluate_retrieval  # noqa: E402
from lib.train.checkpoint import load_checkpoint, seed_everything  # noqa: E402
from lib.train.model import ModelConfig, create_model  # noqa: E402
from lib.train.config import RunConfig, build_config  # noqa: E402
from lib.train.run import train_run  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"
IMG_SIZE = 224
MIN_SIZE = 64            # the photos are small by nature (median 130 px): the usual 224 px rule would drop them all
SELECT_RATIOS = (0.8, 0.2, 0.0)  # photos of the train individuals held out for checkpoint selection; no test split
NUM_WORKERS = 1          # 2 cores: one loader process beside the main process's compute threads
# A fine-tuning recipe for a pretrained backbone, fixed beforehand (not tuned on lions/val):
# one frozen-backbone epoch lets the random head find class centres before the backbone moves;
# a moderate margin and scale suit ~8 photos per individual; hflip off because a lion's left and right
# whisker-spot patterns differ, so a mirrored left face is not the same individual's right face.
PARAMS = dict(backbone=BACKBONE, embed_dim=512, img_size=IMG_SIZE, augment="light", hflip=False,
              warmup_epochs=1, freeze_backbone_in_warmup=True, margin=0.3, s=30.0,
              lr_backbone=1e-4, lr_head=1e-3, p=16, k=4, checkpoint_every=0, device="auto", num_workers=NUM_WORKERS,
              seed=0)


def read_lions(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Checked index (one row per photo, every photo its own group) and the photos the min-size rule excluded."""
    index, problems = index_from_folder(root, group_by="file")
    if len(problems):
        print(f"{root}: {len(problems)} indexing problem(s):\n{problems.to_string(index=False)}")
    return check_images(index, root, min_size=MIN_SIZE)


def leave_one_out(emb, labels) -> dict:
    return evaluate_retrieval(emb, labels, emb, labels, ks=(1, 5), exclude_self=True)


def score(model: nn.Module, val_set: IndexDataset, labels, settings) -> dict:
    """Leave-one-out retrieval on val; rows are L2-normalised inside the index, so raw pooled features work too."""
    return leave_one_out(extract_embeddings(model, val_set, settings, batch_size=EMBED_BATCH_SIZE), labels)


def frozen_rows(model: nn.Module, val_set: IndexDataset, labels, settings) -> list[dict]:
    rows = []
    for method, net in (("(a) frozen ImageNet, pooled backbone features (GeM)", nn.Sequential(model.backbone, model.pool)),
                        ("(a) frozen ImageNet + random Linear/BN head", model)):
        t0 = time.time()
        rows.append({"method": method, **score(net, val_set, labels, settings), "seconds": time.time() - t0})
    return rows


def with_epochs(config: RunConfig, epochs: int) -> RunConfig:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))


def train_for(run_dir: Path, config: RunConfig, budget_s: float) -> pd.DataFrame:
    """train_run for about `budget_s` seconds: the warm-up epoch, then one fine-tune epoch whose cost sets how many
    more fit the budget; each call resumes the previous one's checkpoint (the epoch count is not part of the
    settings a resume must match)."""
    t0 = time.time()
    train_run(str(run_dir), with_epochs(config, 1), progress=False)   # epoch 0 (untrained) + warm-up epoch
    t1 = time.time()
    train_run(str(run_dir), with_epochs(config, 2), progress=False)   # one full fine-tune epoch, validation included
    per_epoch = time.time() - t1
    epochs = 2 + max(0, int((budget_s - (time.time() - t0)) // per_epoch))
    print(f"one fine-tune epoch took {per_epoch:.0f} s: {epochs} epochs fit {budget_s / 60:.1f} min")
    return train_run(str(run_dir), with_epochs(config, epochs), progress=False)


def checkpoint_model(path: Path, config: RunConfig) -> tuple[nn.Module, int]:
    ckpt = load_checkpoint(path)
    # pretrained='' : the checkpoint replaces every weight, so nothing needs loading first
    model = create_model(dataclasses.replace(config.model, pretrained=""))
    model.load_state_dict(ckpt["model"])
    return model, ckpt["epoch"]


def trained_rows(name: str, pretrained: str, train_root: Path, splits_dir: Path, val_set: IndexDataset, labels,
                 settings, budget_s: float, run_dir: Path) -> tuple[list[dict], pd.DataFrame]:
    """Train for the budget, then score the selected ('best') and the last ('latest') checkpoint on val."""
    config = build_config(**PARAMS, pretrained=pretrained, data_dir=str(train_root), splits_dir=str(splits_dir))
    t0 = time.time()
    history = train_for(run_dir, config, budget_s)
    train_s = time.time() - t0
    rows = []
    for which in ("best", "latest"):
        model, epoch = checkpoint_model(run_dir / f"{which}_model.pt", config)
        t1 = time.time()
        metrics = score(model, val_set, labels, settings)
        rows.append({"method": f"{name}, {which} epoch ({epoch} of {int(history['epoch'].max())})", **metrics,
                     "seconds": train_s + time.time() - t1})
    return rows, history


def markdown(table: pd.DataFrame) -> str:
    """A GitHub table (pandas' to_markdown needs the tabulate package, which the project does not install)."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget of each trained run")
    ap.add_argument("--lions", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/lions"))
    ap.add_argument("--out", default="/tmp/bench_lions_result.md", help="markdown results file")
    ap.add_argument("--runs", default="abc", help="which rows to run: any of a (frozen), b (fine-tuned), c (random init)")
    args = ap.parse_args()
    lions = Path(args.lions)
    if not ((lions / "train").is_dir() and (lions / "val").is_dir()):
        sys.exit(f"lions photos not found: {lions} needs train/ and val/ folders (pass --lions PATH); nothing run")
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("lib").setLevel(logging.INFO)  # shows which weights were loaded

    train_index, train_excl = read_lions(lions / "train")
    val_index, val_excl = read_lions(lions / "val")
    notes = [f"train: {len(train_index)} photos of {train_index['label'].nunique()} individuals kept, "
             f"{len(train_excl)} excluded by min_size={MIN_SIZE}",
             f"val: {len(val_index)} photos of {val_index['label'].nunique()} individuals kept, "
             f"{len(val_excl)} excluded by min_size={MIN_SIZE}"]
    for excl in (train_excl, val_excl):
        notes += [f"excluded {r.path}: {r.reason}" for r in excl.itertuples()]
    print("\n".join(notes))
    settings = auto_settings(device="auto", num_workers=NUM_WORKERS)
    loads = [f"start {os.getloadavg()[0]:.1f}"]

    seed_everything(0)
    frozen = create_model(ModelConfig(backbone=BACKBONE, pretrained="lite0-imagenet", embed_dim=512)).eval()
    # every row scores the same val photos with the same eval transform (timm's mean/std for lite0: 0.5)
    _, eval_tf = build_transforms(IMG_SIZE, frozen.data_config["mean"], frozen.data_config["std"], preset="none")
    val_set = IndexDataset(val_index, lions / "val", eval_tf, class_to_idx(val_index))
    labels = val_index["label"].to_numpy()
    rows = frozen_rows(frozen, val_set, labels, settings) if "a" in args.runs else []
    histories = {}
    with tempfile.TemporaryDirectory() as tmp:
        splits_dir = Path(tmp) / "splits"
        prepare_splits(train_index, splits_dir, SplitConfig(ratios=SELECT_RATIOS, seed=0), train_excl)
        for name, pretrained in (("(b) fine-tuned from ImageNet", "lite0-imagenet"), ("(c) trained from random init", "")):
            if name[1] not in args.runs:
                continue
            got, histories[name] = trained_rows(name, pretrained, lions / "train", splits_dir, val_set, labels, settings,
                                                args.minutes * 60, Path(tmp) / name[1])
            rows += got
            loads.append(f"after {name[:3]} {os.getloadavg()[0]:.1f}")
    table = pd.DataFrame(rows)[["method", "recall@1", "recall@5", "mAP", "seconds"]].astype({"seconds": int})
    print("\n" + table.to_string(index=False))

    cols = ["epoch", "phase", "train_loss", "val_recall@1", "val_mAP", "train_seconds"]
    text = [f"# Pretrained vs random weights on the lions (val leave-one-out, {len(val_index)} queries)", "",
            markdown(table), "",
            f"{BACKBONE} {IMG_SIZE} px, device {settings.device}, workers {NUM_WORKERS}, budget {args.minutes:g} min "
            f"per trained run; 1-minute load average: {', '.join(loads)} (on {os.cpu_count()} cores).",
            f"Training settings: {PARAMS}. 'best' = the epoch with the best Recall@1 on the photos held out of train "
            f"(ratios {SELECT_RATIOS}); 'seconds' of trained rows = training (incl. per-epoch validation) + scoring.",
            "", *[f"- {n}" for n in notes], ""]
    for name, history in histories.items():
        text += [f"## {name}: per-epoch history (val = photos held out of train)", "",
                 markdown(history[[c for c in cols if c in history]]), ""]
    Path(args.out).write_text("\n".join(text))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
