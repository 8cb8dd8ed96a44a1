"""The phases of a run as data: the head phase on cached pooled features (no backbone stage trains), then the backbone
phase on images (its last N stages, or all), each with its epochs and the source of its batches; and the facts every
phase reads, resolved once: the backbone's BatchNorm setting, the stages `unfreeze` trains, and on the CPU the layout
and backbone pass the backbone phase trains at.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader

from lib.core.cpu_probe import cpu_train_choice
from lib.core.device import DeviceSettings
from lib.train.feature_cache import CachedFeatures

BACKBONE_BN = ("auto", "frozen", "train")
Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch -> this rank's (x, y) on the device


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
class Phase:
    name: str                     # "head" | "backbone"
    epochs: range                 # the run's epochs it trains, 1-based
    stages: int | None            # backbone stages it trains: 0 none, None all
    pooled: bool                  # its batches are cached pooled features, not images
    batches: Batches | None = None  # set once the source exists (the features are cached after a resume)

    def label(self, backbone_frozen: bool) -> str:
        """Its name in the metrics log; the backbone phase's epochs say whether the warm-up keeps the backbone
        frozen."""
        return self.name if self.stages == 0 else "warmup" if backbone_frozen else "finetune"


def plan_phases(head_epochs: int, epochs: int, unfreeze) -> list[Phase]:
    """The run's phases in order, those with epochs only: `head_epochs` on cached features, then `epochs` on images
    training `unfreeze` stages (none with unfreeze=0: the run ends after the head phase)."""
    stages = trainable_stages(unfreeze)
    head = Phase("head", range(1, head_epochs + 1), 0, pooled=True)
    backbone = Phase("backbone", range(head_epochs + 1, head_epochs + 1 + (epochs if stages != 0 else 0)), stages,
                     pooled=False)
    return [phase for phase in (head, backbone) if phase.epochs]


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    return next(phase for phase in phases if epoch in phase.epochs)


def cached_batches(features: CachedFeatures, targets: torch.Tensor, batch_sampler, seed: int, device: str) -> Batches:
    """The head phase's batches: the sampler's P x K steps, each photo in one of its cached views, drawn from a
    generator seeded by the epoch (exact resume, global RNG untouched); under DDP the views are drawn for the step's
    whole batch, so a rank's photos get the views one process would give."""
    def batches(epoch: int):
        views = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for batch, own in batch_sampler.steps():
            idx = torch.as_tensor(batch[own])  # this rank's share of the step
            view = torch.randint(len(features.train), (len(batch),), generator=views)[own]
            yield features.train[view, idx].to(device), targets[idx].to(device)
    return batches


def image_batches(loader: DataLoader, device: str, memory_format: torch.memory_format, batch_mix=None) -> Batches:
    """The backbone phase's batches: the loader's P x K image batches, mixed by `batch_mix` (lib.data.transforms:
    mixup/cutmix, images and labels -> images and class weights) where asked for."""
    return lambda epoch: _ImagePass(loader, device, memory_format, batch_mix)


@dataclass
class _ImagePass:
    """One pass over the loader, on the device. Each iter() starts a pass at once, as a DataLoader's does (and draws
    the loader's seed from torch's RNG then): a progress bar that calls iter() twice draws as it did on the loader."""
    loader: DataLoader
    device: str
    memory_format: torch.memory_format
    batch_mix: Callable | None

    def __iter__(self):
        return self._on_device(iter(self.loader))

    def _on_device(self, batches):
        for x, y in batches:
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            yield self.batch_mix(x, y) if self.batch_mix is not None else (x, y)


def image_loader(train_set, batch_sampler, settings: DeviceSettings) -> DataLoader:
    """The backbone phase's loader of P x K image batches."""
    return DataLoader(train_set, batch_sampler=batch_sampler, num_workers=settings.num_workers,
                      pin_memory=settings.pin_memory, persistent_workers=settings.num_workers > 0,
                      prefetch_factor=4 if settings.num_workers > 0 else None)


def cpu_training_settings(settings: DeviceSettings, model: torch.nn.Module, img_size: int, step_batch: int,
                          split: bool = True, recorded: dict | None = None) -> tuple[DeviceSettings, str]:
    """On the CPU, the backbone phase's layout and backbone pass (backbone_chunk), and a line saying what chose
    them: `recorded` (the resolved settings of the checkpoint a run resumes from, so that it trains on as it
    began), else the probe of `model` as that phase trains it (lib.core.cpu_probe.cpu_train_choice); split=False
    keeps the whole batch of step_batch images and chooses the layout alone. Other devices' settings come back
    unchanged, with an empty line."""
    if settings.device != "cpu":
        return settings, ""
    # a checkpoint that records no choice ('') began without a backbone phase: nothing has trained at its layout, so
    # the choice is made now; one from before choices were recorded (no key) trained at what it records
    chose = recorded.get("backbone_choice", "recorded before reasons were") if recorded and recorded.get(
        "device") == "cpu" else ""
    if chose:
        chunk, channels_last = recorded.get("backbone_chunk", 0), recorded["channels_last"]
        why = "as the run began: its checkpoint's"
    else:
        choice = cpu_train_choice(model, (3, img_size, img_size), step_batch, split)
        chunk = choice.batch_size if choice.batch_size < step_batch else 0
        channels_last, why = choice.channels_last, choice.why
        chose = why
    passes = f"passes of {chunk} images" if chunk else "one pass"
    return (replace(settings, channels_last=channels_last, backbone_chunk=chunk, backbone_choice=chose),
            f"backbone phase {'channels_last' if channels_last else 'NCHW'}, {passes} per step of {step_batch} ({why})")


def backbone_phase_settings(settings: DeviceSettings, model, phase: Phase, img_size: int, step_batch: int,
                            recorded: dict | None, ddp: bool) -> tuple[DeviceSettings, str]:
    """The device settings with the backbone phase's CPU layout and pass chosen (cpu_training_settings), probed on a
    copy of the model as that phase trains it; `recorded` is the resumed checkpoint's choice. Smaller passes leave
    the step as it was only where the backbone's BatchNorm keeps its statistics, so only then are they tried."""
    if settings.device != "cpu":
        return settings, ""
    if ddp:
        # processes timing at once on one machine would measure each other; recorded, so that a resume by one
        # process trains on at what the backbone epochs so far trained at
        return replace(settings, backbone_choice="DDP: the device settings, not probed"), ""
    phase_model = copy.deepcopy(model)
    phase_model.set_trainable_stages(phase.stages)
    return cpu_training_settings(settings, phase_model, img_size, -(-step_batch // settings.accum_steps),
                                 split=model.frozen_bn, recorded=recorded)
