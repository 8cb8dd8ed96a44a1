"""One optimizer step, the same for both phases: the model and the loss as one module (what DDP wraps), cut into
micro-batches where the card asks, backward through the loss scaler, then clipping, the step and the EMA update; and
the one check that the loss is still finite.

timm's train.py keeps the scaler, the clipping and the EMA as parts its train_one_epoch is given; here they are
fields of the TrainState (lib.train.state) the step is given.
"""
from __future__ import annotations

import gc
import math
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from lib.core.device import is_cuda

if TYPE_CHECKING:
    from lib.train.distributed import World
    from lib.train.state import TrainState


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the checkpoints on disk are from the last good epoch."""


class TrainStep(nn.Module):
    """The model and the loss as one module: the unit DDP wraps, so the loss's class weights (ArcFace's centres, the
    softmax classifier) are averaged and stay in step across ranks like the model's own."""

    def __init__(self, model: nn.Module, criterion: nn.Module, chunk: int = 0):
        super().__init__()
        self.model, self.criterion, self.chunk = model, criterion, chunk

    def forward(self, x: torch.Tensor, y: torch.Tensor, margins=None, pooled: bool = False, autocast=nullcontext):
        """(loss, logits) of a batch of images, or of pooled backbone features with pooled=True. With `chunk`, the
        backbone takes the images `chunk` at a time (autograd then runs each chunk's backward apart too) and the
        head, its BatchNorm, the miners and the loss the whole batch: the step is the one-pass step, only the
        backbone's passes are smaller (unless its own BatchNorm trains on batch statistics)."""
        with autocast():
            if pooled:
                emb = self.model.embed_features(x)
            elif self.chunk and len(x) > self.chunk:
                emb = self.model.embed_features(torch.cat([self.model.pooled(c) for c in x.split(self.chunk)]))
            else:
                emb = self.model(x)
        # The loss runs in fp32: the margin's trigonometry and s=64 logits are where half precision hurts.
        return self.criterion(emb.float(), y, margins)


class StepRunner:
    """The TrainStep, wrapped in DDP under several processes. DDP only syncs the parameters that train when it is
    built, so it is rebuilt when the trainable set changes (head phase -> backbone warm-up -> fine-tuning)."""

    def __init__(self, step: TrainStep, world: World, device: str):
        self.step, self.world, self.device = step, world, device
        self.trainable, self.wrapped = None, step

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def prepare(self, pooled: bool) -> None:
        if not self.world.active:
            return
        trainable = (pooled, *(p.requires_grad for p in self.step.parameters()))
        if trainable == self.trainable:
            return
        self.trainable = trainable
        # the old wrapper's gradient hooks leave with it (its reducer removes them), before the new one adds its own
        self.wrapped = self.step
        gc.collect()
        ids = [torch.device(self.device).index] if is_cuda(self.device) else None
        # On cached features the backbone's pooling (GeM's p) gets no gradient: DDP must be told to expect that.
        self.wrapped = nn.parallel.DistributedDataParallel(self.step, device_ids=ids, find_unused_parameters=pooled)

    def no_sync(self, accumulating: bool):
        """No gradient all-reduce on a micro-step that only accumulates: one per optimizer step is enough."""
        return self.wrapped.no_sync() if accumulating and self.world.active else nullcontext()


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, margins_for=None,
               pooled: bool = False) -> torch.Tensor:
    """One optimizer step on the batch (x, y), whose loss it returns (detached): images, or with pooled=True the
    head phase's cached pooled features, which take one fp32 pass (the head is one small matmul: no autocast, and
    nothing for the card's memory to cut).

    The batch is the recipe's P x K; the card's memory decides only how it is cut: `accum_steps` contiguous
    micro-batches, each loss weighted by its share of the batch, so the gradient of a per-photo loss (ArcFace,
    softmax) is the whole batch's whatever accum_steps. Pairwise terms (triplet, Multi-Similarity) mine within each
    micro-batch, which holds about P / accum_steps whole classes of the class-ordered batch, and BatchNorm layers that
    train on batch statistics see the micro-batch (as each rank's share does under DDP without sync_bn). Every
    micro-batch's backward goes through the loss scaler, and the last one unscales, clips and steps."""
    settings = state.settings
    cuts = 1 if pooled else max(settings.accum_steps, 1)
    parts = [part for part in np.array_split(np.arange(len(y)), cuts) if len(part)]
    total = torch.zeros((), device=x.device)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        xs, ys = (x, y) if len(parts) == 1 else (x[part], y[part])
        with state.runner.no_sync(accumulating=not last):
            loss, _ = state.runner(xs, ys, margins_for(ys) if margins_for else None, pooled=pooled,
                                   autocast=nullcontext if pooled else settings.autocast)
            share = len(part) / len(y)
            state.scaler(loss * share if share != 1 else loss, state.optimizer, clip_grad=state.cfg.grad_clip or None,
                         parameters=state.stepped_parameters, need_update=last)
        total += loss.detach() * share
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.model)
    return total


def check_finite(mean: float, where: str) -> None:
    """Stop a run whose loss became NaN or inf, before it writes a checkpoint of the broken weights."""
    if not math.isfinite(mean):
        raise TrainingDiverged(f"loss became {mean} {where}; stopped. The checkpoints in the run folder are from the "
                               "last good epoch. Lower the learning rates or the margin, or try precision='fp32'.")
