"""One training run from its config, assembled and trained in one sitting (timm's train.py `main`, nanoGPT's
train.py): data, model, loss, phases, device, then the loop over the phases' epochs. Each epoch's work is
lib.train.epochs', each step lib.train.step's, the checkpoints lib.train.saver's. Launched by torchrun
(lib.train.launch), each process trains its share; rank 0 alone validates, prints and writes.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import pandas as pd

from lib.core.device import DeviceSettings, apply_settings, auto_settings, is_cuda
from lib.core.errors import DataError
from lib.data.dataset import IndexDataset
from lib.data.samplers import ContextPKSampler, PKSampler
from lib.data.splits import index_split_fingerprint, load_split_index
from lib.data.transforms import batch_mix
from lib.retrieval.embed import forward_choice
from lib.train.checkpoint import seed_everything
from lib.train.config import SAMPLERS, DataConfig, RunConfig, SamplerConfig, TrainConfig, build_config, settings_diff
from lib.train.distributed import World, join_world, sync_batchnorm
from lib.train.epochs import Training, epoch_line, score_untrained, train_epoch, validate_epoch
from lib.train.feature_cache import cache_features
from lib.train.losses import LOSSES, class_context_matrix, build_loss
from lib.train.model import create_model
from lib.train.phases import (backbone_phase_settings, cached_batches, image_batches, image_loader, phase_at,
                              plan_phases, resolve_backbone_bn)
from lib.train.run_lock import run_lock
from lib.train.saver import CheckpointSaver, recorded_device
from lib.train.state import TrainState
from lib.train.tracking import MetricsLog
from lib.train.validation import validation_for


def load_run_data(data: DataConfig) -> tuple[pd.DataFrame, dict[str, int], dict]:
    """(split index, class_to_idx, split report) of a run's data section."""
    index, splits = load_split_index(data.splits_dir, fold=None if data.fold < 0 else data.fold)
    return index, splits.class_to_idx, splits.report


def train_run(run_dir: str, config: RunConfig | dict, fresh: bool = False, mlflow_uri: str = "", progress: bool = True,
              stop_after_epoch: int | None = None) -> pd.DataFrame:
    """Train the run of `config` (a RunConfig, or one stored as a dict) in run_dir; returns the per-epoch history
    (epoch 0 = the untrained model, for comparison). Resumes from run_dir's latest checkpoint unless fresh=True
    (which moves the earlier files aside); a checkpoint made with other settings is an error. `stop_after_epoch`
    ends the call after that epoch as if the process were killed (tests resume from it)."""
    config = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    world, device_name = join_world(config.device.device)
    run_dir = Path(run_dir)
    # one writer per run folder, from before anything in it is read or moved
    with run_lock(run_dir) if world.is_rank0 else nullcontext():
        # ---- data: the split's photos, train / val
        index, class_to_idx, report = load_run_data(config.data)
        train_index, val_index = index[index["split"] == "train"], index[index["split"] == "val"]
        if val_index.empty:
            raise DataError(f"the split in {config.data.splits_dir} has no val images; validation needs some")
        # ---- model, its backbone BatchNorm setting resolved once and recorded as what it chose, so the checkpoint
        # says how BatchNorm trained and a resume compares like with like
        seed_everything(config.train.seed)  # the head's random init must not depend on what ran before
        model = create_model(config.model)
        if world.active and config.device.sync_bn:
            model = _synced_batchnorm(model, device_name)
        backbone_bn = resolve_backbone_bn(config.train.backbone_bn, model.random_init)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, backbone_bn=backbone_bn))
        cfg = config.train
        model.frozen_bn = backbone_bn == "frozen"
        # ---- data as the model takes it: datasets, this rank's P x K sampler
        train_set, gallery_set, query_set = _datasets(config, train_index, val_index, class_to_idx, model.data_config)
        sampler = build_sampler(config.sampler, train_index, cfg.seed, world)
        class_contexts, query_contexts = _contexts(cfg, train_set, query_set, sampler)
        # ---- loss
        criterion = build_loss(config.loss, config.model.embed_dim, len(class_to_idx))
        _check_batch_mixing(config, criterion.head)
        # ---- phases: the head on cached features, then the backbone on images
        phases = plan_phases(cfg.head_epochs, cfg.epochs, cfg.unfreeze)
        backbone = next((phase for phase in phases if not phase.pooled), None)
        # ---- device: this machine's settings; a resumed checkpoint, read once here, says what the run began at
        saver = CheckpointSaver(run_dir, cfg.checkpoint_every, writes=world.is_rank0)
        resumed = world.main_only(lambda: saver.start(fresh))
        settings = auto_settings(device=device_name, precision=config.device.precision,
                                 num_workers=config.device.num_workers, accum_steps=config.device.accum_steps)
        backbone_line = ""
        if backbone is not None:
            settings, backbone_line = backbone_phase_settings(
                settings, model, backbone, config.aug.img_size, config.sampler.p * config.sampler.k,
                recorded_device(resumed and resumed[0]), ddp=world.active)
        record = _run_record(config, class_to_idx, model.weights_source, report, index, settings, world)
        _check_resumable(record, resumed)
        if world.is_rank0:
            _describe(config, model, settings, world, (train_set, query_set, class_to_idx), backbone_line)
        apply_settings(settings)
        state = TrainState.build(model, criterion, cfg, settings, world, record)
        start_epoch = _start_epoch(state, resumed, sampler, world)
        log = MetricsLog(run_dir, mlflow_uri=mlflow_uri, enabled=world.is_rank0)
        log.start(record, run_dir.name, state.run_id)
        state.run_id = log.mlflow_run_id  # what each checkpoint carries, so a resume logs on into the same run
        # ---- validation, and each phase's batches
        validation = validation_for(gallery_set, query_set, settings, cfg.eval_batch_size, cfg.val_protocol)
        if world.is_rank0:
            print(f"validation: {validation.split.describe()}")
        features = None
        if any(phase.pooled and start_epoch <= phase.epochs[-1] for phase in phases):
            model.eval()  # the features are the frozen backbone's in eval mode, as validation sees them
            # rank 0 computes and caches them; the other ranks then read its cache
            features = validation.features = world.main_first(lambda: cache_features(
                model, train_set, gallery_set, query_set, cfg.cached_views, settings, run_dir / "features", cfg.seed,
                cfg.eval_batch_size, progress and world.is_rank0))
        for phase in phases:
            phase.batches = (cached_batches(features, train_set.targets, sampler, cfg.seed, settings.device)
                             if phase.pooled else
                             image_batches(image_loader(train_set, sampler, settings), settings.device,
                                           state.memory_format, batch_mix(config.aug.mixup, config.aug.cutmix,
                                                                          len(class_to_idx))))
        training = Training(state=state, phases=phases, schedule=config.schedule, sampler=sampler,
                            validation=validation, saver=saver, log=log, world=world,
                            class_contexts=class_contexts, query_contexts=query_contexts,
                            progress=progress and world.is_rank0)
        # ---- the loop
        if not state.history:
            score_untrained(training, features)
        return train_epochs(training, start_epoch, stop_after_epoch)


def train_epochs(t: Training, start_epoch: int, stop_after_epoch: int | None = None) -> pd.DataFrame:
    """Each epoch from start_epoch on: trained, validated, selected on and checkpointed; the history, every rank
    alike. Selection's patience counts within the backbone phase, which can beat the head phase's best."""
    state, cfg = t.state, t.state.cfg
    try:
        for epoch in range(start_epoch, t.last_epoch + 1):
            phase = phase_at(t.phases, epoch)
            if phase.stages != 0 and epoch == phase.epochs.start and phase is not t.phases[0]:
                state.selection.since_best = 0
            if phase.stages != 0 and state.selection.since_best >= cfg.early_stop_patience:
                t.say(f"early stop: no better val recall@1 for {state.selection.since_best} epochs")
                break
            row = train_epoch(t, phase, epoch)
            row.update(validate_epoch(t, phase, epoch))
            if state.scheduler is not None:
                state.scheduler.step(row["val_recall@1"]) if cfg.scheduler == "plateau" else state.scheduler.step()
            improved = state.selection.record(row, state.history)
            state.history.append(row)
            t.saver.save(state, epoch, improved)
            t.log.write(state.history)
            t.say(epoch_line(row, state.ema is not None))
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    finally:
        t.log.end()
    return pd.DataFrame(state.history)


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


def _datasets(config: RunConfig, train_index: pd.DataFrame, val_index: pd.DataFrame, class_to_idx: dict,
              data_config: dict) -> tuple[IndexDataset, IndexDataset, IndexDataset]:
    """(train photos augmented, train photos as the gallery, val photos as the queries) at the model's input."""
    train_tf, eval_tf = config.aug.transforms(data_config)
    root, cache = config.data.data_dir, config.data.cache_dir or None
    return (IndexDataset(train_index, root, train_tf, class_to_idx, cache),
            IndexDataset(train_index, root, eval_tf, class_to_idx, cache),
            IndexDataset(val_index, root, eval_tf, class_to_idx, cache))


def _synced_batchnorm(model, device_name: str):
    if not is_cuda(device_name):
        raise ValueError("sync_bn=True needs CUDA: PyTorch's SyncBatchNorm has no CPU kernel")
    # BatchNorm in train mode normalises over the step's batch on all ranks, as one process would
    return sync_batchnorm(model)


def _check_batch_mixing(config: RunConfig, head) -> None:
    if (config.aug.mixup or config.aug.cutmix) and not head.mixed_labels:
        takes = " or ".join(repr(name) for name, h in LOSSES.items() if h.mixed_labels)
        raise ValueError(f"mixup/cutmix train on mixed labels, which only a classifier head takes: set loss={takes} "
                         f"(loss={config.loss.loss!r})")


def _run_record(config: RunConfig, class_to_idx: dict, weights_source: str, report: dict, index: pd.DataFrame,
                settings: DeviceSettings, world: World) -> dict:
    """The config as every checkpoint, the metrics log and MLflow carry it: the settings, the classes, the weights'
    source, the data and split fingerprints, and what the machine chose."""
    stored = config.as_dict()
    return {**stored, "class_to_idx": class_to_idx, "weights_source": weights_source,
            "data_fingerprint": report.get("data_fingerprint"), "split_fingerprint": index_split_fingerprint(index),
            "device": {**stored["device"], "resolved": {**settings.as_dict(), "world_size": world.size}}}


def _check_resumable(record: dict, resumed: tuple[dict, Path] | None) -> None:
    """Refuse to resume a checkpoint made with other settings; one that predates a setting counts as its default."""
    if resumed is None:
        return
    ckpt, source = resumed
    diff = settings_diff(record, ckpt["config"], build_config().as_dict())
    if diff:
        raise DataError(f"{source} was trained with other settings ({', '.join(diff[:8])}); "
                        "use fresh=True (old files are kept in a replaced-* folder) or another run_dir")


def _start_epoch(state: TrainState, resumed: tuple[dict, Path] | None, sampler, world: World) -> int:
    """The first epoch to train: after the resumed checkpoint, loaded into `state` (RNG included), or 1, seeded."""
    if resumed is None:
        seed_everything(state.cfg.seed)
        return 1
    ckpt, source = resumed
    state.load(ckpt)
    if state.context_weights:
        sampler.set_context_weights(state.context_weights)
    if world.is_rank0:
        print(f"resumed from {source} at epoch {ckpt['epoch']} (best val recall@1 {state.selection.best:.4f})")
    return ckpt["epoch"] + 1


def _describe(config: RunConfig, model, settings: DeviceSettings, world: World, data: tuple, backbone_line: str):
    """Rank 0's lines on what trains where; on the CPU, the probe's layout and batch for extraction
    (lib.core.cpu_probe), measured here once and cached."""
    train_set, query_set, class_to_idx = data
    img, s = config.aug.img_size, config.sampler
    extraction = forward_choice(model, settings, (3, img, img), len(train_set) + len(query_set))
    print(f"backbone {config.model.backbone}: {model.weights_source}")
    print(f"device: {settings.device} {settings.gpu} precision={settings.precision} "
          f"workers={settings.num_workers} accum={settings.accum_steps}"
          + (f", {world.size} processes (DDP), {s.p} x {s.k} images each per step" if world.active else "")
          + f"; {len(train_set)} train / {len(query_set)} val images, {len(class_to_idx)} classes"
          + (f"; extraction {extraction.describe()}" if settings.device == "cpu" else "")
          + (f"; {backbone_line}" if backbone_line else ""))


def _contexts(cfg: TrainConfig, train_set, query_set, sampler):
    """(class x context matrix for context margins, val query contexts for mining), each None when not asked for."""
    if not (cfg.context_margin > 0 or cfg.mining_warmup_epochs >= 0):
        return None, None
    if "context" not in train_set.index.columns:
        raise DataError("context_margin / mining_warmup_epochs need a `context` column in the index "
                        "(notebook 01: metadata_csv with context_col)")
    class_contexts = None
    if cfg.context_margin > 0:
        class_contexts = class_context_matrix(train_set.targets.numpy(), train_set.index["context"].to_numpy(),
                                              int(train_set.targets.max()) + 1)
    query_contexts = None
    if cfg.mining_warmup_epochs >= 0:
        if not hasattr(sampler, "set_context_weights"):
            raise ValueError("hard-context mining (mining_warmup_epochs >= 0) needs sampler='context_pk'")
        query_contexts = query_set.index["context"].to_numpy()
    return class_contexts, query_contexts


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
