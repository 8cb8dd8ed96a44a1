"""One training run from flat parameters (a notebook's parameters cell): config sections, data, parts, fit.

Every knob belongs to exactly one config dataclass; the nested config dict goes into every checkpoint, the
metrics log and MLflow, so a run describes itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lib.core.device import auto_settings
from lib.core.errors import DataError
from lib.data.dataset import IndexDataset
from lib.data.samplers import ContextPKSampler, PKSampler
from lib.data.splits import load_split_index
from lib.data.transforms import build_transforms
from lib.train.checkpoint import seed_everything
from lib.train.loop import TrainConfig, fit
from lib.train.losses import LossConfig, MarginSchedule, build_loss
from lib.train.model import ModelConfig, create_model
from lib.train.tracking import MetricsLog

SAMPLERS = ("pk", "context_pk")


@dataclass
class DataConfig:
    data_dir: str = "data/demo"
    splits_dir: str = "splits"
    cache_dir: str = ""        # resize cache from notebook 01 / data_prep/resize_cache.py; "" = originals
    fold: int = -1             # -1: the train/val split; k >= 0: fold k of a K-fold split


@dataclass
class AugConfig:
    img_size: int = 224        # the default backbone's (tf_efficientnet_lite0); seed 000's EfficientNetV2-L wants 480
    augment: str = "light"     # none | light | strong
    hflip: bool = True         # off where left and right flanks differ (seed 003)


@dataclass
class SamplerConfig:
    sampler: str = "pk"        # pk | context_pk
    p: int = 8                 # classes per batch
    k: int = 4                 # images per class (seed 000: 4-5)
    batches_per_epoch: int = 0  # 0 = about one pass over the training images


@dataclass
class DeviceConfig:
    device: str = "auto"
    precision: str = "auto"    # auto | bf16 | fp16 | fp32
    num_workers: int = -1      # -1 = from the device table
    accum_steps: int = 0       # 0 = from the device table


SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "schedule": MarginSchedule,
            "train": TrainConfig, "aug": AugConfig, "sampler": SamplerConfig, "device": DeviceConfig}


def _field_owner() -> dict[str, str]:
    owner: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owner, f"parameter {f.name} in both {owner[f.name]} and {section}"
            owner[f.name] = section
    return owner


FIELD_OWNER = _field_owner()


def build_config(**params) -> dict[str, dict]:
    """Flat parameters -> {section: dict}; every field not given keeps its dataclass default."""
    unknown = sorted(set(params) - set(FIELD_OWNER))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; valid: {sorted(FIELD_OWNER)}")
    grouped: dict[str, dict] = {s: {} for s in SECTIONS}
    for name, value in params.items():
        grouped[FIELD_OWNER[name]][name] = value
    return {s: dataclasses.asdict(SECTIONS[s](**grouped[s])) for s in SECTIONS}


def load_run_data(config: dict) -> tuple[pd.DataFrame, dict[str, int], dict]:
    d = config["data"]
    index, splits = load_split_index(d["splits_dir"], fold=None if d["fold"] < 0 else d["fold"])
    return index, splits.class_to_idx, splits.report


def train_run(run_dir: str, config: dict, fresh: bool = False, mlflow_uri: str = "", progress: bool = True,
              stop_after_epoch: int | None = None):
    """Build data, model, loss, sampler and device settings from `config` and train; returns the history."""
    index, class_to_idx, report = load_run_data(config)
    train_index = index[index["split"] == "train"]
    val_index = index[index["split"] == "val"]
    if val_index.empty:
        raise DataError(f"the split in {config['data']['splits_dir']} has no val images; validation needs some")
    seed_everything(config["train"]["seed"])  # the head's random init must not depend on what ran before
    model = create_model(ModelConfig(**config["model"]))
    data_cfg = model.data_config
    aug = config["aug"]
    train_tf, eval_tf = build_transforms(aug["img_size"], data_cfg["mean"], data_cfg["std"], preset=aug["augment"],
                                         hflip=aug["hflip"])
    root, cache = config["data"]["data_dir"], config["data"]["cache_dir"] or None
    train_set = IndexDataset(train_index, root, train_tf, class_to_idx, cache)
    gallery_set = IndexDataset(train_index, root, eval_tf, class_to_idx, cache)
    query_set = IndexDataset(val_index, root, eval_tf, class_to_idx, cache)

    s = config["sampler"]
    if s["sampler"] not in SAMPLERS:
        raise ValueError(f"sampler={s['sampler']!r}; valid: {', '.join(SAMPLERS)}")
    seed = config["train"]["seed"]
    if s["sampler"] == "context_pk":
        if "context" not in train_index.columns:
            raise DataError("sampler='context_pk' needs a context column in the index (notebook 01: context_col)")
        sampler = ContextPKSampler(train_index["label"].to_numpy(), train_index["context"].to_numpy(), s["p"], s["k"],
                                   seed=seed, batches_per_epoch=s["batches_per_epoch"] or None)
    else:
        sampler = PKSampler(train_index["label"].to_numpy(), s["p"], s["k"], seed=seed,
                            batches_per_epoch=s["batches_per_epoch"] or None)
    criterion = build_loss(LossConfig(**config["loss"]), config["model"]["embed_dim"], len(class_to_idx))
    settings = auto_settings(**config["device"])
    full = {**config, "class_to_idx": class_to_idx, "weights_source": model.weights_source,
            "data_fingerprint": report.get("data_fingerprint"),
            "device": {**config["device"], "resolved": settings.as_dict()}}
    print(f"backbone {config['model']['backbone']}: {model.weights_source}")
    print(f"device: {settings.device} {settings.gpu} precision={settings.precision} workers={settings.num_workers} "
          f"accum={settings.accum_steps}; {len(train_set)} train / {len(query_set)} val images, "
          f"{len(class_to_idx)} classes")
    log = MetricsLog(Path(run_dir), mlflow_uri=mlflow_uri)
    return fit(run_dir, model, criterion, MarginSchedule(**config["schedule"]), TrainConfig(**config["train"]),
               settings, train_set, sampler, gallery_set, query_set, full, fresh=fresh, log=log, progress=progress,
               stop_after_epoch=stop_after_epoch, defaults=build_config())
