"""What a training run holds between steps: the parts that train (model, loss, optimizer, scheduler, loss scaler,
EMA, the DDP step) and its progress (history, selection, mined context weights), built once per run, written into
every checkpoint and read back on resume."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.utils import ModelEmaV3, NativeScaler
from torch import nn

from lib.core.device import DeviceSettings
from lib.train.checkpoint import fp32_state_dict, rng_state, set_rng_state
from lib.train.config import TrainConfig
from lib.train.distributed import World
from lib.train.losses import CombinedLoss
from lib.train.optim import build_optimizer, build_scheduler
from lib.train.selection import Selection
from lib.train.step import StepRunner, TrainStep


class LossScaler(NativeScaler):
    """timm's NativeScaler (scaled backward, then on the last micro-batch unscale, clip, step, update) around the
    device's own GradScaler, which is enabled for fp16 only: bf16 and fp32 need no loss scaling."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self._scaler = scaler


@dataclass
class TrainState:
    model: nn.Module
    criterion: CombinedLoss
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    scaler: LossScaler
    ema: ModelEmaV3 | None
    runner: StepRunner
    settings: DeviceSettings
    cfg: TrainConfig
    memory_format: torch.memory_format = torch.contiguous_format
    selection: Selection = field(default_factory=Selection)
    history: list[dict] = field(default_factory=list)
    run_id: str | None = None          # MLflow's, so a resumed run logs into the same one
    record: dict = field(default_factory=dict)  # the full config every checkpoint carries (lib.train.run)
    context_weights: dict | None = None  # what this epoch's hard-context mining decided

    @classmethod
    def build(cls, model, criterion: CombinedLoss, cfg: TrainConfig, settings: DeviceSettings,
              world: World = World(), record: dict | None = None) -> TrainState:
        """The parts on the device: AdamW and the scheduler of cfg, the device's loss scaler, the EMA (ema_decay > 0,
        which then drives selection) and the model+loss step DDP wraps under several processes; `record` is the
        config as every checkpoint carries it."""
        memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        model.to(settings.device, memory_format=memory_format)
        criterion.to(settings.device)
        # the optimizer and scheduler take the values they read, not the config (timm's optimizer_kwargs)
        optimizer = build_optimizer(model, criterion, settings.device, lr_head=cfg.lr_head,
                                    lr_backbone=cfg.lr_backbone, lr_decay=cfg.lr_decay, weight_decay=cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg.scheduler, t0=cfg.t0, t_mult=cfg.t_mult,
                                    plateau_patience=cfg.plateau_patience, plateau_factor=cfg.plateau_factor)
        ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        step = TrainStep(model, criterion, settings.backbone_chunk)
        return cls(model, criterion, optimizer, scheduler, LossScaler(settings.grad_scaler()), ema,
                   StepRunner(step, world, settings.device), settings, cfg, memory_format,
                   Selection("ema_val_recall@1" if ema is not None else "val_recall@1"), record=record or {})

    @property
    def stepped_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer steps, the loss's own (ArcFace's centres) included: what gradient clipping
        bounds."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def checkpoint(self, epoch: int) -> dict:
        """Everything a resume needs, weights in fp32."""
        return {"epoch": epoch, "config": self.record, "best_metric": self.selection.best,
                "since_best": self.selection.since_best, "history": self.history,
                "model": fp32_state_dict(self.model), "criterion": fp32_state_dict(self.criterion),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "ema": fp32_state_dict(self.ema) if self.ema is not None else None,
                "rng": rng_state(), "mlflow_run_id": self.run_id, "class_to_idx": self.record.get("class_to_idx"),
                "context_weights": self.context_weights}

    def load(self, ckpt: dict) -> None:
        """The state of `ckpt` (a checkpoint of the same settings), RNG included."""
        self.model.load_state_dict(ckpt["model"])
        self.criterion.load_state_dict(ckpt["criterion"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        self.history, self.run_id = ckpt["history"], ckpt.get("mlflow_run_id")
        self.selection.best, self.selection.since_best = ckpt["best_metric"], ckpt["since_best"]
        self.context_weights = ckpt.get("context_weights")
