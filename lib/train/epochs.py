"""One epoch of each phase: the head on cached frozen features, and the backbone on image batches (AMP, gradient
accumulation over micro-batches, clipping, EMA)."""
from __future__ import annotations

import math

import numpy as np
import torch
from timm.utils import dispatch_clip_grad
from tqdm.auto import tqdm

from lib.train.feature_cache import CachedFeatures
from lib.train.state import TrainState


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the checkpoints on disk are from the last good epoch."""


def head_epoch(state: TrainState, features: CachedFeatures, targets: torch.Tensor, batch_sampler, epoch: int,
               desc: str = "", margins_for=None, progress: bool = False) -> tuple[float, int]:
    """(mean loss, images) of one epoch of the head (and the loss's weights) on cached pooled features: the sampler's
    P x K batches, each photo in one of its cached views, drawn from a generator seeded by the epoch (exact resume,
    global RNG untouched); under DDP the views are drawn for the step's whole batch, so a rank's photos get the views
    one process would give. The head is one small matmul, so this runs in fp32 without autocast or accumulation."""
    device, cfg = state.settings.device, state.cfg
    state.runner.prepare(pooled=True)
    state.model.train()
    state.criterion.train()
    views = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    loss_sum = torch.zeros((), device=device)
    n_images = n_steps = 0
    for batch, own in tqdm(batch_sampler.steps(), total=len(batch_sampler), desc=desc, disable=not progress,
                           leave=False):
        idx = torch.as_tensor(batch[own])  # this rank's share of the step
        view = torch.randint(len(features.train), (len(batch),), generator=views)[own]
        x = features.train[view, idx].to(device)
        y = targets[idx].to(device)
        loss, _ = state.runner(x, y, margins_for(y) if margins_for else None, pooled=True)
        loss.backward()
        if cfg.grad_clip > 0:
            dispatch_clip_grad(state.stepped_parameters, cfg.grad_clip)
        state.optimizer.step()
        _after_step(state)
        loss_sum += loss.detach()
        n_images, n_steps = n_images + len(idx), n_steps + 1
    mean = loss_sum.item() / max(n_steps, 1)
    if not math.isfinite(mean):
        raise TrainingDiverged(f"loss became {mean} in {desc} (head on cached features); stopped. The checkpoints in "
                               "the run folder are from the last good epoch. Lower lr_head or the margin.")
    return mean, n_images


def backbone_epoch(state: TrainState, loader, desc: str = "", margins_for=None, batch_mix=None,
                   progress: bool = False) -> tuple[float, int]:
    """(mean loss, images) of one epoch on the loader's P x K image batches, one optimizer step each."""
    state.runner.prepare(pooled=False)
    state.model.train()
    state.criterion.train()
    n_steps = len(loader)
    # The running loss stays on the device: reading it every step would stall the GPU on a sync.
    loss_sum = torch.zeros((), device=state.settings.device)
    n_images = 0
    state.optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for step, (x, y) in enumerate(bar):
        x = x.to(state.settings.device, non_blocking=True, memory_format=state.memory_format)
        y = y.to(state.settings.device, non_blocking=True)
        n_images += len(y)
        if batch_mix is not None:
            x, y = batch_mix(x, y)
        loss_sum += train_step(state, x, y, margins_for)
        if (step + 1) % 50 == 0 or step + 1 == n_steps:
            mean = loss_sum.item() / (step + 1)
            if not math.isfinite(mean):
                raise TrainingDiverged(f"loss became {mean} at step {step + 1} of {desc}; stopped. The checkpoints in "
                                       "the run folder are from the last good epoch. Lower the learning rates or the "
                                       "margin, or try precision='fp32'.")
            bar.set_postfix(loss=f"{mean:.3f}")
    return loss_sum.item() / max(n_steps, 1), n_images


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor, margins_for=None) -> torch.Tensor:
    """One optimizer step on the batch (x, y), whose loss it returns (detached). The batch is the recipe's P x K;
    the card's memory decides only how it is cut: `accum_steps` contiguous micro-batches, each loss weighted by its
    share of the batch, so the gradient of a per-photo loss (ArcFace, softmax) is the whole batch's whatever
    accum_steps. Pairwise terms (triplet, Multi-Similarity) mine within each micro-batch, which holds about
    P / accum_steps whole classes of the class-ordered batch, and BatchNorm layers that train on batch statistics
    see the micro-batch (as each rank's share does under DDP without sync_bn)."""
    parts = [part for part in np.array_split(np.arange(len(y)), max(state.settings.accum_steps, 1)) if len(part)]
    total = torch.zeros((), device=x.device)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        xs, ys = (x, y) if len(parts) == 1 else (x[part], y[part])
        with state.runner.no_sync(accumulating=not last):
            loss, _ = state.runner(xs, ys, margins_for(ys) if margins_for else None,
                                   autocast=state.settings.autocast)
            share = len(part) / len(y)
            state.scaler(loss * share if share != 1 else loss, state.optimizer, clip_grad=state.cfg.grad_clip or None,
                         parameters=state.stepped_parameters, need_update=last)
        total += loss.detach() * share
    _after_step(state)
    return total


def _after_step(state: TrainState) -> None:
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update(state.model)
