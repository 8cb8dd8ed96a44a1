"""A trained run loaded back: its model with the checkpoint's weights and eval transform, its split rows (refused when
the data or the split assignment changed since training), and their embeddings through the run's cache; the loss head
too where it is a classifier, for class probabilities. Evaluation, prediction, the gallery browser and the probe all start here."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.core.device import DeviceSettings
from lib.core.errors import DataError
from lib.core.state_io import read_bytes_hashed, say_once
from lib.data.dataset import IndexDataset
from lib.data.splits import index_split_fingerprint, load_split_index, read_splits, split_fingerprint
from lib.data.transforms import build_transforms
from lib.retrieval.embed import EMBED_BATCH_SIZE, cached_embeddings
from lib.train.checkpoint import load_checkpoint
from lib.train.config import RunConfig
from lib.train.losses import SoftmaxHead, build_loss, loss_head
from lib.train.model import create_model
from lib.train.run import load_run_data

CHECKPOINTS = {"best": "best_model.pt", "latest": "latest_model.pt"}


@dataclass
class TrainedRun:
    run_dir: Path
    checkpoint: Path
    checkpoint_sha256: str
    config: dict              # the checkpoint's full config (sections + class_to_idx, data_fingerprint, ...)
    history: list
    model: torch.nn.Module
    eval_tf: object
    epoch: int | None = None  # the epoch the checkpoint holds (0: the untrained model was the best one)
    classifier: SoftmaxHead | None = None  # the loss head, where it gives class probabilities (LOSSES); else None

    @property
    def settings(self) -> RunConfig:
        """The run's typed config sections (data, model, loss, ...)."""
        return RunConfig.from_dict(self.config)


def checkpoint_file(run_dir: str | os.PathLike, checkpoint: str = "best") -> Path:
    """'best', 'latest', or a file name in run_dir (e.g. 'checkpoint_epoch_10.pt')."""
    path = Path(run_dir) / CHECKPOINTS.get(checkpoint, checkpoint)
    if not path.is_file():
        found = sorted(p.name for p in Path(run_dir).glob("*.pt")) if Path(run_dir).is_dir() else []
        raise DataError(f"no checkpoint {path}; run_dir holds {found or 'no .pt files'} (train it with notebook 02)")
    return path


def load_trained(run_dir: str | os.PathLike, checkpoint: str = "best") -> TrainedRun:
    """The run's model with the checkpoint's weights (built without fetching any pretrained weights) and its eval
    transform, on the CPU in eval mode."""
    path = checkpoint_file(run_dir, checkpoint)
    # one read: training may replace the file at any moment, and the hash that keys caches, the index and the
    # thresholds' provenance must name the weights loaded
    data, sha256 = read_bytes_hashed(path)
    ckpt = load_checkpoint(path, data=data)
    settings = RunConfig.from_dict(ckpt["config"])
    model = create_model(dataclasses.replace(settings.model, pretrained=""))
    model.load_state_dict(ckpt["model"])
    model.eval()
    dc = model.data_config
    # settings.aug.resize is "crop" for a checkpoint that predates the setting (config.PREDATES): evaluated as trained
    _, eval_tf = build_transforms(settings.aug.img_size, dc["mean"], dc["std"], preset="none",
                                  resize=settings.aug.resize)
    classifier = None
    if loss_head(settings.loss.loss).classifier:
        criterion = build_loss(settings.loss, settings.model.embed_dim, len(ckpt["config"]["class_to_idx"]))
        criterion.load_state_dict(ckpt["criterion"])
        classifier = criterion.head.eval()
    return TrainedRun(Path(run_dir), path, sha256, ckpt["config"], ckpt.get("history", []), model, eval_tf,
                      ckpt.get("epoch"), classifier)


@torch.no_grad()
def class_probabilities(run: TrainedRun, emb: np.ndarray) -> pd.DataFrame | None:
    """(n, n_classes) softmax probabilities of a cross-entropy run's classifier on embeddings (rows sum to 1), columns
    the class names in training's order; None for a run without a classifier (votes are then its scores)."""
    if run.classifier is None:
        return None
    probs = run.classifier.probabilities(torch.as_tensor(np.asarray(emb, dtype=np.float32))).numpy()
    class_to_idx = run.config["class_to_idx"]
    return pd.DataFrame(probs, columns=sorted(class_to_idx, key=class_to_idx.get))


def split_rows(run: TrainedRun) -> pd.DataFrame:
    """The run's split index (with `split`), refused when the data changed since training, or when the split files
    now place photos in other splits than those it trained on (a re-split: its val or test could hold photos the
    model trained on, and evaluation would report inflated figures)."""
    index, _, report = load_run_data(run.settings.data)
    splits_dir = run.settings.data.splits_dir
    trained_on = run.config.get("data_fingerprint")
    if trained_on and report.get("data_fingerprint") != trained_on:
        raise DataError(f"the split in {splits_dir} describes other data than {run.checkpoint} "
                        "was trained on (data fingerprints differ); evaluate with the splits it was trained with")
    check_split_assignment(run, index_split_fingerprint(index))
    return index.reset_index(drop=True)


def check_split_assignment(run: TrainedRun, now: str) -> None:
    """Refuse a checkpoint trained on another split assignment than `now` (the split files' index_split_fingerprint),
    naming both and the fix; a checkpoint from before the assignment was recorded is accepted, said once."""
    splits_dir = Path(run.settings.data.splits_dir)
    trained = run.config.get("split_fingerprint")
    if trained is None:
        say_once(f"split-unchecked:{run.checkpoint}", f"warning: {run.checkpoint} predates recorded split "
                 f"assignments: cannot check that {splits_dir} places each photo where it trained (retrain to record it)")
        return
    if trained == now:
        return
    kept = sorted(str(p) for p in splits_dir.glob("replaced-*") if _assignment_of(p) == trained)
    raise DataError(f"{run.checkpoint} was trained on another split than {splits_dir} holds now (split fingerprint "
                    f"{trained[:12]} at training, {now[:12]} now): its val and test may hold photos it trained on. "
                    "Retrain on the new split (notebook 02), or evaluate on the split it was trained on"
                    + (f" (kept in {kept[-1]}: move its files back into {splits_dir})" if kept else
                       " (notebook 01 with its seed and ratios, fresh=True, rewrites it)"))


def _assignment_of(splits_dir: Path) -> str | None:
    """split_fingerprint of the split files in a folder (a re-split's replaced-* backup), None when unreadable."""
    try:
        return split_fingerprint(read_splits(splits_dir).groups)
    except DataError:
        return None


def rows_in_split(rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split of a split index, without the `split` column, numbered from 0 (embedding order)."""
    return rows.loc[rows["split"] == split, [c for c in rows.columns if c != "split"]].reset_index(drop=True)


def trained_min_size(run: TrainedRun) -> int | None:
    """The smallest photo side the run trained on: notebook 01's min_size from the split report, or, for splits made
    before it was recorded, the shorter side of the smallest training photo; None when the split files are gone."""
    try:
        index, splits = load_split_index(run.settings.data.splits_dir)
    except DataError:
        return None
    if splits.report.get("min_size"):
        return int(splits.report["min_size"])
    train = index[index["split"] == "train"]
    if train.empty or not {"width", "height"} <= set(train.columns):
        return None
    return int(np.minimum(train["width"], train["height"]).min())


def embed_rows(run: TrainedRun, rows: pd.DataFrame, settings: DeviceSettings, tta: bool = False,
               batch_size: int = EMBED_BATCH_SIZE, progress: bool = False, desc: str = "embed") -> tuple[np.ndarray, dict]:
    """Embeddings of index rows through the run's cache (run_dir/embeddings/)."""
    d = run.settings.data
    dataset = IndexDataset(rows, d.data_dir, run.eval_tf, run.config["class_to_idx"], d.cache_dir or None)
    run.model.to(settings.device)
    return cached_embeddings(run.model, dataset, settings, run.run_dir / "embeddings", run.checkpoint_sha256, tta=tta,
                             batch_size=batch_size, progress=progress, desc=desc)


