"""Several processes, one run: torch.distributed as torchrun launches it (DDP, NCCL on CUDA, gloo on the CPU).

Each process (rank) trains on its own share of every P×K step (lib.data.samplers), DDP averages the gradients of the
model and the loss's class weights so every rank holds the same weights, and rank 0 alone validates, writes
checkpoints, metrics and MLflow, then hands what it decided (the epoch's scores, hard-context weights) to the others.
A rank that fails ends the run: torchrun stops the other ranks and reports the failing one's error.
"""
from __future__ import annotations

import datetime as _dt
import os
import random
from dataclasses import dataclass

import numpy as np
import timm.layers
import torch
import torch.distributed as dist
from torch import nn

from lib.core.device import is_cuda

# Ranks wait in a collective while rank 0 validates or caches features, which on a large gallery takes far longer
# than the default timeout (10-30 minutes); a dead rank is caught by torchrun, not by this timeout.
COLLECTIVE_TIMEOUT = _dt.timedelta(hours=3)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_rank0(self) -> bool:
        """Whether this process is rank 0: the one that validates, prints and writes the run folder."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def main_first(self, make):
        """make() on rank 0, then on the others: for work rank 0 caches on disk (the pooled features) that the others
        then read, or make again where their disk lacks it."""
        value = make() if self.is_rank0 else None
        self.barrier()
        return value if self.is_rank0 else make()

    def main_only(self, make):
        """make() on rank 0 alone, and its value on every rank: for state rank 0 reads from its own disk (the
        checkpoint a run resumes from), so ranks on machines without a shared file system still agree on it. The
        value travels pickled, once, through the process group."""
        return self.from_main(make() if self.is_rank0 else None)

    def from_main(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.active:
            return value
        box = [value if self.is_rank0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over the ranks."""
        if not self.active:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.size


def join_world(device: str) -> tuple[World, str]:
    """(this process's World, the device it trains on) from torchrun's environment; without it, one process.
    `device` is what the run asked for ('auto', 'cpu', 'cuda'): on CUDA each rank takes its local GPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = is_cuda(device)
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                             "use nproc <= the number of GPUs")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return World(rank, size, local_rank), device


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm normalising over all ranks' images (SyncBatchNorm), converted in place.

    timm's converter, not torch's nn.SyncBatchNorm.convert_sync_batchnorm: torch's turns timm's BatchNormAct2d
    (every EfficientNet's norm + activation) into a plain SyncBatchNorm that keeps the act and drop submodules but
    never calls them, so every activation after a BatchNorm would vanish."""
    return timm.layers.convert_sync_batchnorm(model)


def leave_world(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Under DDP every rank draws its own augmentations, from generators seeded by (seed, epoch, rank) at each epoch's
    start: a resumed run, with the same number of processes, draws what the uninterrupted one drew, without a
    checkpoint holding every rank's generator states."""
    seeds = np.random.SeedSequence([seed, epoch, rank]).generate_state(3)
    random.seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))
    torch.manual_seed(int(seeds[2]))
