"""Every knob of a training run, in one typed dataclass per section; a flat parameter (a notebook's parameters cell)
belongs to exactly one section. A RunConfig goes into every checkpoint, the metrics log and MLflow as a plain nested
dict (as_dict), and comes back typed from one (from_dict), old checkpoints included, so a run describes itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pandas as pd

from lib.data.transforms import build_transforms
from lib.retrieval.embed import EMBED_BATCH_SIZE
from lib.train.losses import LossConfig, MarginSchedule
from lib.train.model import ModelConfig

SAMPLERS = ("pk", "context_pk")


@dataclass
class TrainConfig:
    # The defaults are the real-photo recipe the benchmark chose (bench/bench_training_recipes.py, docs/benchmarks.md:
    # packaged Lite0 at 320 px, 30 head epochs on 4 cached views, then the last backbone stage at lr_decay 0.5);
    # notebook 02's parameters cell holds the same literals (tests/test_train.py holds them equal).
    epochs: int = 10               # of the backbone phase, after the head phase
    # head phase: the embedding head trained on the frozen backbone's features, computed once per view and cached
    head_epochs: int = 30
    cached_views: int = 4          # per train photo: the eval transform, then seeded draws of the augmentation
    head_init: str = "pca"         # pca: the head starts as the features' principal directions | random
    # backbone phase: "all" trains the whole backbone; N its last N stages (timm feature_info), 0 none: the run ends
    # after the head phase
    unfreeze: str = "1"
    lr_decay: float = 0.5          # < 1: each earlier backbone stage learns lr_decay times slower than the next
    # frozen: the backbone's BatchNorm layers keep their pretrained statistics while it trains | train: batch
    # statistics | auto: frozen for pretrained weights, train for a random init (whose statistics mean nothing)
    backbone_bn: str = "auto"
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3          # the head starts from random, so it may move faster than pretrained features
    weight_decay: float = 1e-4
    scheduler: str = "cosine_restarts"
    t0: int = 10                   # CosineAnnealingWarmRestarts: first cycle length in epochs
    t_mult: int = 2
    plateau_patience: int = 5      # ReduceLROnPlateau on val Recall@1
    plateau_factor: float = 0.5
    early_stop_patience: int = 10  # epochs without a better val Recall@1
    ema_decay: float = 0.0         # 0 = off; else the EMA model is validated too and drives model selection
    grad_clip: float = 0.0         # 0 = off; max gradient norm
    checkpoint_every: int = 10     # checkpoint_epoch_N.pt for ensembles and overfitting analysis
    eval_batch_size: int = EMBED_BATCH_SIZE
    seed: int = 0
    # gallery: train photos are the gallery, val photos the queries; loo: each val photo queries the other
    # val photos (open-set: val individuals are not in train); auto: loo when no val label occurs in train
    val_protocol: str = "auto"
    # for data with a `context` column (camera site, street address), where look-alikes share a context:
    context_margin: float = 0.0    # extra ArcFace margin for classes that share a context with another (0.7 vs 0.5)
    mining_warmup_epochs: int = -1  # -1 off; N: uniform context sampling for N epochs, then by per-context val error


@dataclass
class DataConfig:
    data_dir: str = "data/photos"
    splits_dir: str = "splits"
    cache_dir: str = ""        # resize cache from notebook 01 / data_prep/resize_cache.py; "" = originals
    fold: int = -1             # -1: the train/val split; k >= 0: fold k of a K-fold split


@dataclass
class AugConfig:
    # above the default backbone's native 224 px: identity lives in fine detail, and 320 px won every trained recipe
    # of the benchmark (docs/benchmarks.md, "Training recipes") at twice the backbone cost; EfficientNetV2-L wants 480
    img_size: int = 320
    augment: str = "light"     # none | light | strong
    hflip: bool = True         # off where left and right flanks differ (a jaguar's two sides are two patterns)
    # how a photo becomes square (lib.data.transforms.RESIZES): crop (shorter side, centre crop: cuts the edges) |
    # squash (whole photo, aspect ignored) | pad (whole photo, mean-colour bars); bench/bench_resize_modes.py
    resize: str = "squash"
    aug_backend: str = "torchvision"  # torchvision | albumentations: the same presets (lib.data.transforms.BACKENDS)
    # batch mixing (Beta(alpha, alpha) weights; 0: off) for loss="ce", as the marmoset pipeline trains: it mixes
    # images, so it acts in the backbone phase only (the head phase trains on cached features)
    mixup: float = 0.0
    cutmix: float = 0.0

    def transforms(self, data_config: dict):
        """(train_tf, eval_tf) of these settings for a model of timm's `data_config` (its mean and std)."""
        return build_transforms(self.img_size, data_config["mean"], data_config["std"], preset=self.augment,
                                hflip=self.hflip, resize=self.resize, backend=self.aug_backend)


@dataclass
class SamplerConfig:
    sampler: str = "pk"        # pk | context_pk
    p: int = 16                # classes per batch
    k: int = 4                 # images per class, notebook 02's images_per_class (4-5: enough positives for
                               # the miners)
    batches_per_epoch: int = 0  # 0 = about one pass over the training images


@dataclass
class DeviceConfig:
    device: str = "auto"
    precision: str = "auto"    # auto | bf16 | fp16 | fp32
    num_workers: int = -1      # -1 = from the device table
    # micro-batches each P x K step is cut into (memory only: the step's batch, loss and gradients stay the recipe's;
    # lib.train.step.train_step); 0 = from the device table
    accum_steps: int = 0
    sync_bn: bool = False      # under DDP: BatchNorm statistics over all processes' images (SyncBatchNorm)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "schedule": MarginSchedule,
            "train": TrainConfig, "aug": AugConfig, "sampler": SamplerConfig, "device": DeviceConfig}
# settings older checkpoints record that no longer exist: ignored when they load and when a run resumes.
# loss.m: ArcFace's margin comes from the schedule (warmup_margin, then margin) every epoch; m never acted.
RETIRED = {"loss": ("m",)}
# what a checkpoint records inside a section beside the settings: device.resolved, what the machine chose for "auto"
RECORDED = {"device": ("resolved",)}
# settings added later whose default is not what the runs before them did: a stored config without one takes this
# value, not the dataclass default, when it loads and when a run resumes, so an old run evaluates as it was trained.
# aug.resize: runs before it existed cropped (shorter side to img_size, centre crop); train.backbone_bn: they
# trained BatchNorm on batch statistics. The recipe's knobs keep the defaults they had before the dataclasses took
# the recipe's values: a run from before head_epochs / unfreeze / lr_decay existed had no head phase and trained
# the whole backbone at one rate (every stored config records s, margin, warmup_epochs, p and epochs; those entries
# speak only for a partial one).
PREDATES = {"aug": {"resize": "crop"},
            "train": {"backbone_bn": "train", "head_epochs": 0, "unfreeze": "all", "lr_decay": 1.0, "epochs": 30},
            "loss": {"s": 64.0}, "schedule": {"warmup_epochs": 5, "margin": 0.5}, "sampler": {"p": 8}}


def with_predated(config: dict) -> dict:
    """A stored config with the PREDATES value of every such setting it does not record."""
    return {**config, **{name: {**values, **(config.get(name) or {})} for name, values in PREDATES.items()}}


def _field_owner() -> dict[str, str]:
    owner: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owner, f"parameter {f.name} in both {owner[f.name]} and {section}"
            owner[f.name] = section
    return owner


FIELD_OWNER = _field_owner()
# notebook 02's name for a field whose own name says too little ({parameter: field}): P x K's k is the number of photos
# per class, where other notebooks' k meant voting neighbours or photos shown. build_config takes either name.
ALIASES = {"images_per_class": "k"}
# the flat parameters notebook 02 declares, one per field: the alias where a field has one
PARAMETERS = [name for name in FIELD_OWNER if name not in ALIASES.values()] + list(ALIASES)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: MarginSchedule = field(default_factory=MarginSchedule)
    train: TrainConfig = field(default_factory=TrainConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def as_dict(self) -> dict[str, dict]:
        """{section: {field: value}}: what checkpoints, metrics logs and MLflow store."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> RunConfig:
        """The typed config of a stored one (a checkpoint's config, whose other top-level keys are ignored).

        A section or field the stored config predates takes its default (its PREDATES value where there is one); a
        RETIRED field is dropped; any other unknown field is an error naming it (a config from a newer version of
        this code).
        """
        config = with_predated(config)
        sections = {}
        for name, section in SECTIONS.items():
            stored = dict(config.get(name) or {})
            for key in (*RETIRED.get(name, ()), *RECORDED.get(name, ())):
                stored.pop(key, None)
            unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(section)})
            if unknown:
                raise ValueError(f"config section {name!r} has unknown setting(s) {unknown}; "
                                 f"valid: {sorted(f.name for f in dataclasses.fields(section))}")
            sections[name] = section(**stored)
        return cls(**sections)


def build_config(**params) -> RunConfig:
    """Flat parameters (a field by its own name or by its ALIASES name) -> RunConfig; every field not given keeps its
    dataclass default."""
    unknown = sorted(set(params) - set(FIELD_OWNER) - set(ALIASES))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; valid: {sorted(PARAMETERS)}")
    twice = [f"{alias} and {name}" for alias, name in ALIASES.items() if alias in params and name in params]
    if twice:
        raise ValueError(f"{', '.join(twice)} name the same setting: give one")
    grouped: dict[str, dict] = {s: {} for s in SECTIONS}
    for name, value in params.items():
        name = ALIASES.get(name, name)
        grouped[FIELD_OWNER[name]][name] = value
    return RunConfig(**{s: SECTIONS[s](**grouped[s]) for s in SECTIONS})


def config_parameters(namespace: dict) -> dict:
    """The run-config knobs among a namespace's names (PARAMETERS): notebook 02 hands build_config its parameters
    cell's values this way (from globals()), so no knob is typed twice and a new one needs only its line in the
    cell."""
    return {name: namespace[name] for name in PARAMETERS if name in namespace}


def comparable_config(config: dict) -> dict:
    """What must match to resume: everything but the epoch budget, freshness and the machine it ran on."""
    out = {k: v for k, v in config.items() if k not in ("device", "fresh", "run")}
    for section, names in RETIRED.items():
        if section in out:
            out[section] = {k: v for k, v in out[section].items() if k not in names}
    if "train" in out:
        out["train"] = {k: v for k, v in out["train"].items() if k not in ("epochs", "eval_batch_size")}
    return out


def settings_diff(now: RunConfig | dict, then: RunConfig | dict, defaults: RunConfig | dict) -> list[str]:
    """Dotted names of the settings that differ between two run configs. A setting `then` does not record (its
    checkpoint predates the setting) counts as its default (its PREDATES value where there is one); one with no
    default either (derived) is not compared; a RETIRED one is not compared."""
    now, then, defaults = (c.as_dict() if isinstance(c, RunConfig) else c for c in (now, then, defaults))
    then = with_predated(then) if then else then
    now, then, defaults = (pd.json_normalize(comparable_config(c)).iloc[0].to_dict() if c else {}
                           for c in (now, then, defaults))
    missing = object()
    diff = []
    for key in sorted(now.keys() | then.keys()):
        old = then.get(key, defaults.get(key, missing))
        if old is not missing and str(now.get(key)) != str(old):
            diff.append(key)
    return diff
