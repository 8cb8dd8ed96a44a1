"""The training loop: epoch 0 (the untrained model), the head phase on cached features, then the backbone phase, each
epoch trained, validated by retrieval, selected on and checkpointed atomically; exact resume. The parts (model, loss,
sampler, device settings, logger) are built by the caller and passed in, so a test can hand in tiny ones; the pieces
each epoch calls live beside it (lib.train.state, epochs, validation, selection, mining).
"""
from __future__ import annotations

import datetime as _dt
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from lib.core.device import DeviceSettings, apply_settings
from lib.core.errors import DataError
from lib.train.checkpoint import fp32_state_dict, resume_checkpoint, save_checkpoint, seed_everything
from lib.train.config import TrainConfig, settings_diff
from lib.train.distributed import World, seed_epoch
from lib.train.epochs import TrainingDiverged, backbone_epoch, head_epoch
from lib.train.feature_cache import cache_features
from lib.train.losses import CombinedLoss, MarginSchedule, class_context_matrix, context_margins
from lib.train.mining import mined_context_weights
from lib.train.state import TrainState, build_optimizer, group_lr
from lib.train.tracking import MetricsLog
from lib.train.validation import Validation, validation_for

__all__ = ["TrainingDiverged", "build_optimizer", "fit", "resolve_backbone_bn", "trainable_stages"]
BACKBONE_BN = ("auto", "frozen", "train")
CHECKPOINT_FILES = ("latest_model.pt", "best_model.pt", "metrics.csv")


def resolve_backbone_bn(setting: str, random_init: bool) -> str:
    """backbone_bn as it acts: 'auto' keeps pretrained BatchNorm statistics ('frozen') and trains a random init's."""
    if setting not in BACKBONE_BN:
        raise ValueError(f"backbone_bn={setting!r}; valid: {', '.join(BACKBONE_BN)}")
    return ("train" if random_init else "frozen") if setting == "auto" else setting


def trainable_stages(unfreeze) -> int | None:
    """`unfreeze` as EmbeddingModel.set_trainable_stages takes it: 'all' -> None, N -> N."""
    if str(unfreeze) == "all":
        return None
    if str(unfreeze).isdigit():
        return int(unfreeze)
    raise ValueError(f"unfreeze must be 'all' or a number of backbone stages >= 0, got {unfreeze!r}")


@dataclass
class Plan:
    """What every epoch reads and none changes: the phases, the data, the contexts, the world."""
    schedule: MarginSchedule
    unfrozen: int | None                     # backbone stages the backbone phase trains (None: all)
    total_epochs: int
    batch_sampler: object
    loader: DataLoader
    train_targets: torch.Tensor
    batch_mix: object = None
    class_contexts: np.ndarray | None = None  # class x context, for context margins
    query_contexts: np.ndarray | None = None  # val queries' contexts, for hard-context mining
    world: World = World()
    progress: bool = False


def fit(run_dir: str | os.PathLike, model, criterion: CombinedLoss, schedule: MarginSchedule, cfg: TrainConfig,
        settings: DeviceSettings, train_set: Dataset, batch_sampler, gallery_set: Dataset, query_set: Dataset,
        config: dict, fresh: bool = False, log: MetricsLog | None = None, progress: bool = True,
        stop_after_epoch: int | None = None, defaults: dict | None = None, batch_mix=None,
        world: World = World()) -> pd.DataFrame:
    """Train and validate; returns the per-epoch history (epoch 0 = the untrained model, for comparison).

    `batch_mix` (lib.data.transforms.batch_mix: mixup/cutmix, images and labels -> images and class weights) acts on
    the backbone phase's image batches; the head phase trains on cached features, which it cannot mix.
    Resumes from run_dir/latest_model.pt unless fresh=True; a checkpoint made with other settings is an error.
    `stop_after_epoch` ends the call after that epoch as if the process were killed (tests resume from it).
    `defaults` (the config of an all-default run) stands in for settings an older checkpoint does not record.
    Under DDP (`world`, lib.train.distributed) every rank calls fit with its share of the sampler; rank 0 alone
    validates, prints and writes, and every rank returns the same history.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = log or MetricsLog(run_dir, enabled=world.main)
    say = print if world.main else _silent
    if fresh and world.main and (backup := _move_aside(run_dir)):
        say(f"fresh start: earlier checkpoints moved to {backup}")
    apply_settings(settings)
    state = TrainState.build(model, criterion, cfg, settings, world)
    unfrozen = trainable_stages(cfg.unfreeze)
    model.frozen_bn = resolve_backbone_bn(cfg.backbone_bn, model.random_init) == "frozen"
    plan = Plan(schedule, unfrozen, cfg.head_epochs + (cfg.epochs if unfrozen != 0 else 0),  # unfreeze=0: no backbone
                batch_sampler, image_loader(train_set, batch_sampler, settings), train_set.targets, batch_mix,
                *_contexts(cfg, train_set, query_set, batch_sampler), world, progress and world.main)
    start_epoch = _resume(state, run_dir, config, defaults, batch_sampler, world, say, fresh)
    log.start(config, run_dir.name, state.run_id)
    validation = validation_for(gallery_set, query_set, settings, cfg.eval_batch_size, cfg.val_protocol)
    say(f"validation: {validation.split.describe()}")
    if cfg.head_epochs > 0 and start_epoch <= cfg.head_epochs:
        model.eval()  # the features are the frozen backbone's in eval mode, as validation sees them
        # rank 0 computes and caches them; the other ranks then read its cache
        validation.features = world.main_first(lambda: cache_features(
            model, train_set, gallery_set, query_set, cfg.cached_views, settings, run_dir / "features", cfg.seed,
            cfg.eval_batch_size, plan.progress))
    if not state.history:
        _score_untrained(state, validation, run_dir, config, log, world, say)
    try:
        for epoch in range(start_epoch, plan.total_epochs + 1):
            in_head = epoch <= cfg.head_epochs
            if epoch == cfg.head_epochs + 1 and cfg.head_epochs:
                state.selection.since_best = 0  # patience counts within the backbone phase: it can beat the head
            if not in_head and state.selection.since_best >= cfg.early_stop_patience:
                say(f"early stop: no better val recall@1 for {state.selection.since_best} epochs")
                break
            row = _train_epoch(state, plan, validation, epoch, in_head)
            row.update(_validate_epoch(state, plan, validation, epoch, in_head))
            if state.scheduler is not None:
                state.scheduler.step(row["val_recall@1"]) if cfg.scheduler == "plateau" else state.scheduler.step()
            improved = state.selection.record(row, state.history)
            state.history.append(row)
            if world.main:
                _write_checkpoints(state, run_dir, epoch, config, log.mlflow_run_id, improved)
            log.write(state.history)
            say(_epoch_line(row, state.ema is not None))
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                break
    finally:
        log.end()
    return pd.DataFrame(state.history)


def image_loader(train_set: Dataset, batch_sampler, settings: DeviceSettings) -> DataLoader:
    """The backbone phase's loader of P x K image batches."""
    return DataLoader(train_set, batch_sampler=batch_sampler, num_workers=settings.num_workers,
                      pin_memory=settings.pin_memory, persistent_workers=settings.num_workers > 0,
                      prefetch_factor=4 if settings.num_workers > 0 else None)


def _resume(state: TrainState, run_dir: Path, config: dict, defaults: dict | None, batch_sampler, world: World, say,
            fresh: bool) -> int:
    """The first epoch to train: after the checkpoint in run_dir, loaded into `state` (refused when it was made with
    other settings), or 1, seeded, for a new run."""
    resumed = None if fresh else world.main_only(lambda: resume_checkpoint(run_dir))
    if resumed is None:
        seed_everything(state.cfg.seed)
        return 1
    ckpt, source = resumed
    diff = settings_diff(config, ckpt["config"], defaults or {})
    if diff:
        raise DataError(f"{source} was trained with other settings ({', '.join(diff[:8])}); "
                        "use fresh=True (old files are kept in a replaced-* folder) or another run_dir")
    state.load(ckpt)
    if state.context_weights:
        batch_sampler.set_context_weights(state.context_weights)
    say(f"resumed from {source} at epoch {ckpt['epoch']} (best val recall@1 {state.selection.best:.4f})")
    return ckpt["epoch"] + 1


def _score_untrained(state: TrainState, validation: Validation, run_dir: Path, config: dict, log: MetricsLog,
                     world: World, say) -> None:
    """Epoch 0: the untrained model (the PCA head where asked for) beside the frozen backbone's own features, and a
    candidate for best_model.pt, so a run whose training only hurts keeps the untrained model."""
    model, cached = state.model, validation.features is not None
    if cached and state.cfg.head_init == "pca":
        model.init_head_pca(validation.features.train.flatten(0, 1))
        if state.ema is not None:
            state.ema.set(model)
    metrics = None
    if world.main:
        metrics, _ = validation(model, cached=cached)
        metrics.update(validation.frozen_baseline(model))
    metrics = world.from_main(metrics)
    state.selection.best = metrics["val_recall@1"]
    row = {"epoch": 0, "phase": "untrained", **metrics, "best_val_recall@1": state.selection.best, "best_epoch": 0}
    state.history.append(row)
    if world.main:
        save_checkpoint(run_dir / "best_model.pt", state.checkpoint(0, config, log.mlflow_run_id))
    log.write(state.history)
    say(f"epoch 0 (untrained): val recall@1 {row['val_recall@1']:.4f} mAP {row['val_mAP']:.4f} | frozen "
        f"backbone features: recall@1 {row['frozen_val_recall@1']:.4f} mAP {row['frozen_val_mAP']:.4f}")


def _train_epoch(state: TrainState, plan: Plan, validation: Validation, epoch: int, in_head: bool) -> dict:
    """Train one epoch of its phase; its row of the history so far (phase, margin, loss, learning rates, speed)."""
    t0 = time.time()
    cfg, criterion, world = state.cfg, state.criterion, plan.world
    if world.active:
        seed_epoch(cfg.seed, epoch, world.rank)
    frozen = in_head or plan.schedule.backbone_frozen_at(epoch - 1)
    state.model.set_trainable_stages(0 if frozen else plan.unfrozen)
    if criterion.name == "arcface":  # the softmax head has no margin
        criterion.head.margin = plan.schedule.margin_at(epoch - 1)
    margins_for = _margins_for(criterion.head.margin, plan.class_contexts, cfg.context_margin)
    plan.batch_sampler.set_epoch(epoch)
    desc = f"epoch {epoch}/{plan.total_epochs}"
    if in_head:
        train_loss, n_images = head_epoch(state, validation.features, plan.train_targets, plan.batch_sampler, epoch,
                                          desc, margins_for, plan.progress)
    else:
        train_loss, n_images = backbone_epoch(state, plan.loader, desc, margins_for, plan.batch_mix, plan.progress)
    if world.active:  # every rank trained on its share: the epoch's loss is their mean, its images their sum
        shares = torch.tensor([train_loss, n_images], dtype=torch.float64, device=state.settings.device)
        train_loss, n_images = world.mean(shares).tolist()
        n_images = round(n_images * world.size)
    return {"epoch": epoch, "phase": "head" if in_head else "warmup" if frozen else "finetune",
            "margin": criterion.head.margin, "train_loss": train_loss,
            "lr_backbone": group_lr(state.optimizer, "backbone"), "lr_head": group_lr(state.optimizer, "head"),
            "train_seconds": time.time() - t0, "images_per_second": n_images / max(time.time() - t0, 1e-9)}


def _margins_for(margin: float, class_contexts: np.ndarray | None, context_margin: float):
    """Per-photo ArcFace margins from the labels, or None: context margins only once there is a margin (the m=0
    warm-up is plain softmax on purpose)."""
    if class_contexts is None or margin == 0:
        return None
    return lambda y: context_margins(y, class_contexts, base=margin, same_context=margin + context_margin)


def _validate_epoch(state: TrainState, plan: Plan, validation: Validation, epoch: int, in_head: bool) -> dict:
    """Rank 0's val scores of the model (and the EMA), and its hard-context weights from the model's top-1 misses,
    on every rank: what rank 0 measured drives every rank's scheduler, early stop and context sampling alike."""
    scores, state.context_weights = {}, None
    if plan.world.main:
        scores, hits = validation(state.model, cached=in_head)
        if state.ema is not None:
            scores.update(validation(state.ema.module, "ema_val_", cached=in_head)[0])
        if plan.query_contexts is not None and epoch >= state.cfg.mining_warmup_epochs:
            state.context_weights, scores["worst_contexts"] = mined_context_weights(
                plan.query_contexts, hits, plan.batch_sampler.contexts)
    scores, state.context_weights = plan.world.from_main((scores, state.context_weights))
    if state.context_weights is not None:
        plan.batch_sampler.set_context_weights(state.context_weights)
    return scores


def _write_checkpoints(state: TrainState, run_dir: Path, epoch: int, config: dict, mlflow_run_id: str | None,
                       improved: bool) -> None:
    """latest_model.pt every epoch; best_model.pt when the epoch is the best so far, holding the weights that scored
    (the EMA's when EMA drives selection); checkpoint_epoch_N.pt every cfg.checkpoint_every epochs."""
    ckpt = state.checkpoint(epoch, config, mlflow_run_id)
    save_checkpoint(run_dir / "latest_model.pt", ckpt)
    if improved:
        best = dict(ckpt, model=fp32_state_dict(state.ema.module)) if state.ema is not None else ckpt
        save_checkpoint(run_dir / "best_model.pt", best)
    if state.cfg.checkpoint_every and epoch % state.cfg.checkpoint_every == 0:
        save_checkpoint(run_dir / f"checkpoint_epoch_{epoch}.pt", ckpt)


def _epoch_line(row: dict, ema: bool) -> str:
    return (f"epoch {row['epoch']}: loss {row['train_loss']:.4f} val recall@1 {row['val_recall@1']:.4f} "
            f"recall@5 {row['val_recall@5']:.4f} mAP {row['val_mAP']:.4f}"
            + (f" | EMA recall@1 {row['ema_val_recall@1']:.4f}" if ema else "") + f" | {row['train_seconds']:.0f} s")


def _move_aside(run_dir: Path) -> Path | None:
    """fresh=True: earlier results are moved into run_dir/replaced-<time>/, never deleted."""
    old = [p for p in run_dir.iterdir()
           if p.is_file() and (p.name in CHECKPOINT_FILES or p.name.startswith("checkpoint_epoch_"))]
    if not old:
        return None
    backup = run_dir / f"replaced-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    backup.mkdir()
    for p in old:
        shutil.move(str(p), backup / p.name)
    return backup


def _silent(*args, **kwargs) -> None:
    """print on ranks other than 0: one voice per run."""


def _contexts(cfg: TrainConfig, train_set, query_set, batch_sampler):
    """(class x context matrix for context margins, val query contexts for mining), each None when not asked for."""
    wanted = cfg.context_margin > 0 or cfg.mining_warmup_epochs >= 0
    if not wanted:
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
        if not hasattr(batch_sampler, "set_context_weights"):
            raise ValueError("hard-context mining (mining_warmup_epochs >= 0) needs sampler='context_pk'")
        query_contexts = query_set.index["context"].to_numpy()
    return class_contexts, query_contexts
