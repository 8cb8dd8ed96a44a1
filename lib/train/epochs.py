"""What each epoch of the loop in lib.train.run does (timm's train_one_epoch and validate): train one epoch of its
phase through the one step function, validate by retrieval, mine hard contexts; and epoch 0, the untrained model.
The parts come built, in one `Training`."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from lib.train.distributed import World, seed_epoch
from lib.train.feature_cache import CachedFeatures
from lib.train.losses import MarginSchedule, context_margins
from lib.train.mining import mined_context_weights
from lib.train.optim import group_lr
from lib.train.phases import Phase
from lib.train.saver import CheckpointSaver
from lib.train.state import TrainState
from lib.train.step import check_finite, train_step
from lib.train.tracking import MetricsLog
from lib.train.validation import Validation


@dataclass
class Training:
    """A run's parts as the loop and each epoch read them, built once by lib.train.run.train_run."""
    state: TrainState
    phases: list[Phase]
    schedule: MarginSchedule
    sampler: object                          # the P x K batch sampler, this rank's share of every step
    validation: Validation
    saver: CheckpointSaver
    log: MetricsLog
    world: World = World()
    class_contexts: torch.Tensor | None = None  # class x context, for context margins
    query_contexts: np.ndarray | None = None    # val queries' contexts, for hard-context mining
    progress: bool = False

    @property
    def last_epoch(self) -> int:
        return self.phases[-1].epochs[-1] if self.phases else 0

    def say(self, line: str) -> None:
        """print on rank 0 alone: one voice per run."""
        if self.world.is_rank0:
            print(line)


def train_epoch(t: Training, phase: Phase, epoch: int) -> dict:
    """Train one epoch of its phase; its row of the history so far (phase, margin, loss, learning rates, speed)."""
    t0 = time.time()
    state, cfg, world = t.state, t.state.cfg, t.world
    if world.active:
        seed_epoch(cfg.seed, epoch, world.rank)
    frozen = t.schedule.backbone_frozen_at(epoch - 1)
    state.model.set_trainable_stages(0 if frozen else phase.stages)
    head = state.criterion.head
    if head.scheduled_margin:
        head.margin = t.schedule.margin_at(epoch - 1)
    t.sampler.set_epoch(epoch)
    margins_for = _margins_for(head.margin, t.class_contexts, cfg.context_margin)
    train_loss, n_images = epoch_steps(state, phase.batches(epoch), phase.pooled, margins_for,
                                       f"epoch {epoch}/{t.last_epoch} ({phase.name} phase)", t.progress, len(t.sampler))
    if world.active:  # every rank trained on its share: the epoch's loss is their mean, its images their sum
        shares = torch.tensor([train_loss, n_images], dtype=torch.float64, device=state.settings.device)
        train_loss, n_images = world.mean(shares).tolist()
        n_images = round(n_images * world.size)
    return {"epoch": epoch, "phase": phase.label(frozen), "margin": head.margin, "train_loss": train_loss,
            "lr_backbone": group_lr(state.optimizer, "backbone"), "lr_head": group_lr(state.optimizer, "head"),
            "train_seconds": time.time() - t0, "images_per_second": n_images / max(time.time() - t0, 1e-9)}


def epoch_steps(state: TrainState, batches: Iterable, pooled: bool = False, margins_for=None, desc: str = "",
                progress: bool = False, total: int | None = None) -> tuple[float, int]:
    """(mean loss, images) of one epoch over `batches` ((x, y) on the device: a phase's, lib.train.phases), one
    optimizer step each (lib.train.step.train_step; pooled: x are cached pooled features)."""
    state.runner.prepare(pooled=pooled)
    state.model.train()
    state.criterion.train()
    state.optimizer.zero_grad(set_to_none=True)
    # The running loss stays on the device: reading it every step would stall the GPU on a sync.
    loss_sum = torch.zeros((), device=state.settings.device)
    n_images = n_steps = 0
    bar = tqdm(batches, total=total, desc=desc, disable=not progress, leave=False)
    for x, y in bar:
        loss_sum += train_step(state, x, y, margins_for, pooled=pooled)
        n_images, n_steps = n_images + len(y), n_steps + 1
        if n_steps % 50 == 0:
            check_finite(mean := loss_sum.item() / n_steps, f"at step {n_steps} of {desc}")
            bar.set_postfix(loss=f"{mean:.3f}")
    mean = loss_sum.item() / max(n_steps, 1)
    check_finite(mean, f"in {desc}")
    return mean, n_images


def _margins_for(margin: float, class_contexts: torch.Tensor | None, context_margin: float):
    """Per-photo margins from the labels, or None: context margins only once there is a margin (the m=0 warm-up is
    plain softmax on purpose)."""
    if class_contexts is None or margin == 0:
        return None
    return lambda y: context_margins(y, class_contexts, base=margin, same_context=margin + context_margin)


def validate_epoch(t: Training, phase: Phase, epoch: int) -> dict:
    """Rank 0's val scores of the model (and the EMA), and its hard-context weights from the model's top-1 misses,
    on every rank: what rank 0 measured drives every rank's scheduler, early stop and context sampling alike."""
    state, validation = t.state, t.validation
    scores, state.context_weights = {}, None
    if t.world.is_rank0:
        scores, hits = validation(state.model, cached=phase.pooled)
        if state.ema is not None:
            scores.update(validation(state.ema.module, "ema_val_", cached=phase.pooled)[0])
        if t.query_contexts is not None and epoch >= state.cfg.mining_warmup_epochs:
            state.context_weights, scores["worst_contexts"] = mined_context_weights(
                t.query_contexts, hits, t.sampler.contexts)
    scores, state.context_weights = t.world.from_main((scores, state.context_weights))
    if state.context_weights is not None:
        t.sampler.set_context_weights(state.context_weights)
    return scores


def score_untrained(t: Training, features: CachedFeatures | None) -> None:
    """Epoch 0: the untrained model (the PCA head where asked for, from the head phase's cached `features`) beside
    the frozen backbone's own features, and the first best_model.pt, so a run whose training only hurts keeps the
    untrained model."""
    state = t.state
    if features is not None and state.cfg.head_init == "pca":
        state.model.init_head_pca(features.train.flatten(0, 1))
        if state.ema is not None:
            state.ema.set(state.model)
    metrics = None
    if t.world.is_rank0:
        metrics, _ = t.validation(state.model, cached=features is not None)
        metrics.update(t.validation.frozen_baseline(state.model))
    metrics = t.world.from_main(metrics)
    state.selection.best = metrics["val_recall@1"]
    row = {"epoch": 0, "phase": "untrained", **metrics, "best_val_recall@1": state.selection.best, "best_epoch": 0}
    state.history.append(row)
    t.saver.save_untrained(state)
    t.log.write(state.history)
    t.say(f"epoch 0 (untrained): val recall@1 {row['val_recall@1']:.4f} mAP {row['val_mAP']:.4f} | frozen "
          f"backbone features: recall@1 {row['frozen_val_recall@1']:.4f} mAP {row['frozen_val_mAP']:.4f}")


def epoch_line(row: dict, ema: bool) -> str:
    return (f"epoch {row['epoch']}: loss {row['train_loss']:.4f} val recall@1 {row['val_recall@1']:.4f} "
            f"recall@5 {row['val_recall@5']:.4f} mAP {row['val_mAP']:.4f}"
            + (f" | EMA recall@1 {row['ema_val_recall@1']:.4f}" if ema else "") + f" | {row['train_seconds']:.0f} s")
