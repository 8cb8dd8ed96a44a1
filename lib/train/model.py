"""Backbone -> pooling -> embedding head: the model every loss, index and decision in the project sees."""

import dataclasses
import difflib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from torch import nn

from lib.train.weights import load_backbone_weights

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"  # any timm name; tiny ones (test_efficientnet, resnet10t) for CPU tests
    # 'auto': packaged offline ImageNet weights where the backbone has them, else random init; '' / None / False:
    # random init; 'hub' / True: timm hub; 'lite0-imagenet': packaged weights; any other string: a weights file
    pretrained: str | bool | None = "auto"
    embed_dim: int = 512
    pooling: str = "gem"  # 'gem' | 'avg'
    gem_p: float = 3.0  # GeM start value; learned with the head
    drop_rate: float = 0.0  # dropout on the pooled features, before the embedding layer


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al. 2018) with a learnable p: p=1 is average, large p tends to max.

    timm 1.0.31 ships no GeM layer, hence this one.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 because x**p of fp16 activations overflows at modest values (p=3, x>40)
        pooled = x.float().clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)
        return pooled.to(x.dtype)


POOLINGS = {
    "gem": lambda cfg: GeM(cfg.gem_p),
    "avg": lambda cfg: SelectAdaptivePool2d(pool_type="avg", flatten=True),
}


def check_backbone_name(name: str) -> None:
    """Raise ValueError with close timm names when `name` is not a timm model."""
    if timm.is_model(name):
        return
    names = timm.list_models()
    arch = name.split(".")[0]
    close = timm.list_models(f"*{arch}*")[:5] + difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    close = list(dict.fromkeys(close))  # keep order, drop repeats
    hint = f"close matches: {', '.join(close)}" if close else "no close matches"
    raise ValueError(f"unknown backbone {name!r}; {hint} (timm.list_models('*part*') lists all {len(names)})")


class EmbeddingModel(nn.Module):
    """Image batch (B, 3, H, W) -> L2-normalised embeddings (B, embed_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {cfg.pooling!r}; valid: {', '.join(POOLINGS)}")
        check_backbone_name(cfg.backbone)
        self.cfg = cfg
        # num_classes=0 and global_pool='' make timm return the feature map; pooling is ours
        self.backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, global_pool="")
        self.pool = POOLINGS[cfg.pooling](cfg)
        self.head = nn.Sequential(OrderedDict(
            drop=nn.Dropout(cfg.drop_rate),
            # no bias: the BatchNorm right after subtracts any constant offset anyway
            fc=nn.Linear(self.backbone.num_features, cfg.embed_dim, bias=False),
            bn=nn.BatchNorm1d(cfg.embed_dim),
        ))
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.pool(self.backbone(x))), dim=1)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Pooling (GeM p) + embedding layer + BatchNorm: the new parts, usually given a higher learning rate."""
        return list(self.pool.parameters()) + list(self.head.parameters())

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the backbone.

        A frozen backbone is also kept in eval mode through later train() calls: in train mode its BatchNorm
        layers would still update their running statistics from every batch (requires_grad does not stop
        that), so the "frozen" features would drift towards the new data's statistics and no longer match
        the pretrained weights; its dropout would also add noise that nothing downstream can learn around.
        """
        self.backbone_frozen = not trainable
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> "EmbeddingModel":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    @property
    def data_config(self) -> dict:
        """timm's input size, interpolation, mean/std and crop for this backbone."""
        return timm.data.resolve_model_data_config(self.backbone)

    @property
    def config(self) -> dict:
        return dataclasses.asdict(self.cfg)


def create_model(cfg: ModelConfig) -> EmbeddingModel:
    """Build the model and load the backbone weights `cfg.pretrained` names (see lib.train.weights)."""
    model = EmbeddingModel(cfg)
    # Kept on the model so the run's config (and so every checkpoint) says where the starting weights came from.
    model.weights_source = load_backbone_weights(model.backbone, cfg.pretrained) if cfg.pretrained else "random init"
    logger.info("backbone weights: %s", model.weights_source)
    return model
