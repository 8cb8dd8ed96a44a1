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

from lib.train.weights import RANDOM_INIT, load_backbone_weights

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


def backbone_stages(backbone: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The backbone's parameters by stage, input to output, from timm's feature_info (the modules at each downsampling
    step): the stem joins the first stage and the layers after the last one (e.g. EfficientNet's conv_head) the last.
    A model without feature_info is one stage."""
    starts = [f["module"] for f in getattr(backbone, "feature_info", None) or []]
    stages: list[list] = [[] for _ in starts] or [[]]
    current = 0
    for name, param in backbone.named_parameters():
        hit = [i for i, start in enumerate(starts) if name.startswith(start + ".")]
        current = hit[-1] if hit else current
        stages[current].append((name, param))
    return [stage for stage in stages if stage]


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
        self.stages = backbone_stages(self.backbone)
        self.trainable_stages: int | None = None  # None: the whole backbone trains; n: only its last n stages
        self.frozen_bn = False  # True: every backbone BatchNorm keeps its pretrained statistics (see train())
        self.random_init = True  # create_model says whether the backbone's weights were loaded

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_features) pooled backbone features: what the head turns into an embedding."""
        return self.pool(self.backbone(x))

    def embed_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head on pooled features (e.g. cached ones): L2-normalised embeddings."""
        return F.normalize(self.head(pooled), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.pooled(x))

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Pooling (GeM p) + embedding layer + BatchNorm: the new parts, usually given a higher learning rate."""
        return list(self.pool.parameters()) + list(self.head.parameters())

    @property
    def backbone_frozen(self) -> bool:
        return self.trainable_stages == 0

    def set_trainable_stages(self, n: int | None) -> None:
        """Train only the backbone's last `n` stages (None: all of it; 0: none), freezing the rest.

        A frozen stage gets no gradient, so autograd records nothing for it and a step costs its forward pass only;
        its modules also stay in eval mode through later train() calls: in train mode BatchNorm would still update
        its running statistics from every batch (requires_grad does not stop that), so the "frozen" features would
        drift towards the new data's statistics and no longer match the pretrained weights, and dropout would add
        noise that nothing downstream can learn around.
        """
        if n is not None and not 0 <= n:
            raise ValueError(f"trainable stages must be >= 0 or None (all), got {n}")
        self.trainable_stages = n
        first = 0 if n is None else max(len(self.stages) - n, 0)
        for i, params in enumerate(self.stages):
            for _, p in params:
                p.requires_grad_(i >= first)
        self.train(self.training)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """The whole backbone trains, or none of it (see set_trainable_stages)."""
        self.set_trainable_stages(None if trainable else 0)

    def train(self, mode: bool = True) -> "EmbeddingModel":
        """With frozen_bn, training stages' BatchNorm layers normalise by their pretrained running statistics too
        (their scale and shift still learn): a P x K batch of a few individuals has statistics far from the
        pretraining data's, so batch statistics would shift every feature the head was trained on (on the lions they
        undid the head phase's gain before any step: docs/benchmarks.md, "The head phase and BatchNorm")."""
        super().train(mode)
        if mode and self.frozen_bn:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        if mode and self.trainable_stages is not None:
            for module in self.backbone.modules():
                own = list(module.parameters(recurse=False))
                if own and not any(p.requires_grad for p in own):
                    module.eval()
            if self.trainable_stages == 0:
                self.backbone.eval()  # parameter-free layers (dropout) too
        return self

    @torch.no_grad()
    def init_head_pca(self, features: torch.Tensor) -> None:
        """Start the head where the frozen features are: its layer projects the centred pooled features onto their
        top principal directions (BatchNorm's running mean takes the centring), so before any training the
        embedding ranks photos as the features themselves do, instead of through a random projection that blurs them.
        Directions beyond what the features span get small random rows."""
        x = features.double()
        mean = x.mean(dim=0)
        _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
        fc, bn = self.head.fc, self.head.bn
        k = min(fc.out_features, v.shape[0])
        fc.weight[:k] = v[:k].to(fc.weight.dtype)
        fc.weight[k:] *= 1e-2
        bn.reset_parameters()
        bn.running_mean.copy_(fc.weight.double() @ mean)
        # unit running variance: eval mode then keeps the projection's geometry
        bn.running_var.fill_(1.0)

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
    model.random_init = not cfg.pretrained or model.weights_source.startswith(RANDOM_INIT)
    logger.info("backbone weights: %s", model.weights_source)
    return model
