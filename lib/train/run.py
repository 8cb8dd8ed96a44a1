"""One training run from its config: the split's data, model, loss, sampler and device settings built, then fit."""
from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
import torch

from lib.core.device import auto_settings, cpu_training_settings
from lib.core.errors import DataError
from lib.data.dataset import IndexDataset
from lib.data.samplers import ContextPKSampler, PKSampler
from lib.data.splits import index_split_fingerprint, load_split_index
from lib.data.transforms import batch_mix
from lib.retrieval.embed import forward_choice
from lib.train.checkpoint import recorded_device, seed_everything
from lib.train.config import SAMPLERS, DataConfig, RunConfig, SamplerConfig, build_config
from lib.train.distributed import World, join_world, sync_batchnorm
from lib.train.loop import fit, resolve_backbone_bn, trainable_stages
from lib.train.losses import build_loss
from lib.train.model import create_model
from lib.train.run_lock import run_lock
from lib.train.tracking import MetricsLog


def load_run_data(data: DataConfig) -> tuple[pd.DataFrame, dict[str, int], dict]:
    """(split index, class_to_idx, split report) of a run's data section."""
    index, splits = load_split_index(data.splits_dir, fold=None if data.fold < 0 else data.fold)
    return index, splits.class_to_idx, splits.report


def train_run(run_dir: str, config: RunConfig | dict, fresh: bool = False, mlflow_uri: str = "", progress: bool = True,
              stop_after_epoch: int | None = None):
    """Build data, model, loss, sampler and device settings from `config` (a RunConfig, or one stored as a dict)
    and train; returns the history. Launched by torchrun (lib.train.launch), each process trains its share."""
    config = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    world, device_name = join_world(config.device.device)
    index, class_to_idx, report = load_run_data(config.data)
    train_index = index[index["split"] == "train"]
    val_index = index[index["split"] == "val"]
    if val_index.empty:
        raise DataError(f"the split in {config.data.splits_dir} has no val images; validation needs some")
    seed_everything(config.train.seed)  # the head's random init must not depend on what ran before
    model = create_model(config.model)
    if world.active and config.device.sync_bn:
        if not device_name.startswith("cuda") and not (device_name == "auto" and torch.cuda.is_available()):
            raise ValueError("sync_bn=True needs CUDA: PyTorch's SyncBatchNorm has no CPU kernel")
        # BatchNorm in train mode normalises over the step's batch on all ranks, as one process would
        model = sync_batchnorm(model)
    # auto is recorded as what it chose, so the checkpoint says how BatchNorm trained and a resume compares like
    # with like
    chosen = resolve_backbone_bn(config.train.backbone_bn, model.random_init)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, backbone_bn=chosen))
    aug = config.aug
    train_tf, eval_tf = aug.transforms(model.data_config)
    if (aug.mixup or aug.cutmix) and config.loss.loss != "ce":
        raise ValueError(f"mixup/cutmix train on mixed labels, which only the softmax head takes: set loss='ce' "
                         f"(loss={config.loss.loss!r})")
    root, cache = config.data.data_dir, config.data.cache_dir or None
    train_set = IndexDataset(train_index, root, train_tf, class_to_idx, cache)
    gallery_set = IndexDataset(train_index, root, eval_tf, class_to_idx, cache)
    query_set = IndexDataset(val_index, root, eval_tf, class_to_idx, cache)

    s = config.sampler
    sampler = build_sampler(s, train_index, config.train.seed, world)
    criterion = build_loss(config.loss, config.model.embed_dim, len(class_to_idx))
    device = config.device
    settings = auto_settings(device=device_name, precision=device.precision, num_workers=device.num_workers,
                             accum_steps=device.accum_steps)
    backbone_line = ""
    unfrozen = trainable_stages(config.train.unfreeze)
    if world.active and unfrozen != 0 and config.train.epochs > 0 and settings.device == "cpu":
        # processes timing at once on one machine would measure each other; recorded, so that a resume by one
        # process trains on at what the backbone epochs so far trained at
        settings = dataclasses.replace(settings, backbone_choice="DDP: the device settings, not probed")
    elif unfrozen != 0 and config.train.epochs > 0:
        # On the CPU, the probe's layout and backbone pass for the backbone phase, of the model as that phase trains
        # it. Smaller passes leave the step as it was only where the backbone's BatchNorm keeps its statistics.
        phase_model = copy.deepcopy(model)
        phase_model.frozen_bn = chosen == "frozen"
        phase_model.set_trainable_stages(unfrozen)
        settings, backbone_line = cpu_training_settings(
            settings, phase_model, aug.img_size, -(-s.p * s.k // settings.accum_steps), split=chosen == "frozen",
            recorded=None if fresh else recorded_device(run_dir))
    stored = config.as_dict()
    full = {**stored, "class_to_idx": class_to_idx, "weights_source": model.weights_source,
            "data_fingerprint": report.get("data_fingerprint"), "split_fingerprint": index_split_fingerprint(index),
            "device": {**stored["device"], "resolved": {**settings.as_dict(), "world_size": world.size}}}
    if world.main:
        # on the CPU: the probe's layout and batch for extraction (lib.core.cpu_probe), measured here once and cached
        extraction = forward_choice(model, settings, (3, aug.img_size, aug.img_size), len(train_set) + len(query_set))
        print(f"backbone {config.model.backbone}: {model.weights_source}")
        print(f"device: {settings.device} {settings.gpu} precision={settings.precision} "
              f"workers={settings.num_workers} accum={settings.accum_steps}"
              + (f", {world.size} processes (DDP), {s.p} x {s.k} images each per step" if world.active else "")
              + f"; {len(train_set)} train / {len(query_set)} val images, {len(class_to_idx)} classes"
              + (f"; extraction {extraction.describe()}" if settings.device == "cpu" else "")
              + (f"; {backbone_line}" if backbone_line else ""))
    log = MetricsLog(Path(run_dir), mlflow_uri=mlflow_uri, enabled=world.main)
    # one lock per run folder, held by the rank that writes
    with run_lock(run_dir) if world.main else nullcontext():
        return fit(run_dir, model, criterion, config.schedule, config.train, settings, train_set, sampler,
                   gallery_set, query_set, full, fresh=fresh, log=log, progress=progress,
                   stop_after_epoch=stop_after_epoch, defaults=build_config().as_dict(),
                   batch_mix=batch_mix(aug.mixup, aug.cutmix, len(class_to_idx)), world=world)


def build_sampler(s: SamplerConfig, train_index: pd.DataFrame, seed: int, world: World) -> PKSampler:
    """The P x K batch sampler of the sampler section, this rank's share of every step."""
    if s.sampler not in SAMPLERS:
        raise ValueError(f"sampler={s.sampler!r}; valid: {', '.join(SAMPLERS)}")
    labels, batches = train_index["label"].to_numpy(), s.batches_per_epoch or None
    if s.sampler == "context_pk":
        if "context" not in train_index.columns:
            raise DataError("sampler='context_pk' needs a context column in the index (notebook 01: context_col)")
        return ContextPKSampler(labels, train_index["context"].to_numpy(), s.p, s.k, seed=seed,
                                batches_per_epoch=batches, rank=world.rank, world=world.size)
    return PKSampler(labels, s.p, s.k, seed=seed, batches_per_epoch=batches, rank=world.rank, world=world.size)


def run_summary(history: pd.DataFrame) -> str:
    """What a training run earned, in a few lines: val Recall@1 of the frozen backbone features, the untrained model
    and the best epoch, and a plain warning when the best is epoch 0 (training did not beat where it started)."""
    first, last = history.iloc[0], history.iloc[-1]
    best_epoch = int(last.get("best_epoch", 0) or 0)
    lines = [f"val recall@1: untrained model {first['val_recall@1']:.3f}"
             + (f", frozen backbone features {first['frozen_val_recall@1']:.3f}" if "frozen_val_recall@1" in first
                else "")
             + f" -> best {last['best_val_recall@1']:.3f} at epoch {best_epoch}"]
    if best_epoch == 0:
        lines.append("best_model.pt is epoch 0, the untrained model: training did not beat it (try fewer unfrozen "
                     "stages, lower learning rates, or more photos per class)")
    return "\n".join(lines)
