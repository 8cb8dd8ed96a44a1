"""The optimizer and the learning-rate schedule of a run: AdamW with the backbone's stages at decaying rates and the
head (with the loss's own weights) at its own, and the scheduler its config names."""
from __future__ import annotations

import torch

from lib.core.device import is_cuda
from lib.train.losses import CombinedLoss

SCHEDULERS = ("cosine_restarts", "plateau", "none")


def build_optimizer(model, criterion: CombinedLoss, device: str, *, lr_head: float, lr_backbone: float,
                    lr_decay: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW: the backbone at lr_backbone (with lr_decay < 1, stage by stage: the last stage at lr_backbone, each
    earlier one lr_decay times the next, since early stages hold generic features that should move least), and the
    head with the loss's own weights at lr_head. Frozen parameters get no gradient, so AdamW leaves them alone."""
    head = {"params": [*model.head_parameters(), *criterion.parameters()], "lr": lr_head, "name": "head"}
    if lr_decay == 1.0:
        groups = [{"params": model.backbone_parameters(), "lr": lr_backbone, "name": "backbone"}, head]
    else:
        last = len(model.stages) - 1
        groups = [{"params": [p for _, p in stage], "lr": lr_backbone * lr_decay ** (last - i),
                   "name": f"backbone.{i}"} for i, stage in enumerate(model.stages)] + [head]
    # fused AdamW: one kernel for all parameters on CUDA instead of a loop of small ones.
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=is_cuda(device))


def build_scheduler(optimizer, scheduler: str, *, t0: int, t_mult: int, plateau_patience: int,
                    plateau_factor: float):
    """The named scheduler: cosine with warm restarts (t0, t_mult), reduce-on-plateau of val recall@1, or none."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if scheduler == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t0, T_mult=t_mult)
    if scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=plateau_patience,
                                                          factor=plateau_factor)
    return None


def group_lr(optimizer, name: str) -> float:
    """The learning rate of a parameter group; for the backbone, its last stage's (the largest)."""
    return [g["lr"] for g in optimizer.param_groups if g["name"].split(".")[0] == name][-1]
