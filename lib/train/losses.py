"""ArcFace family (plain, sub-centre, per-sample margins), its margin schedule, a plain softmax classifier head (the
cross-entropy baseline), and auxiliary metric-learning terms.

Each loss head is a class that says what the training loop and evaluation need of it (its `name` in the config, whether
the margin schedule drives it, whether it takes mixup/cutmix class weights, whether it gives class probabilities, its
name in the results table); `LOSSES` is the one registry of them, so adding a loss touches this file alone."""

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from lib.core.errors import DataError

# Floor under 1 - cos^2 before the square root: keeps d(sin)/d(cos) finite when an embedding sits exactly on
# (or opposite to) a class centre, where the true derivative is infinite.
_SIN_EPS = 1e-7


def _cos_plus_margin(cos: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """cos(theta + m) for theta = acos(cos), kept monotonically decreasing in theta over [0, pi].

    Uses the standard threshold trick (insightface, pytorch-metric-learning), not "easy margin": where
    theta + m would pass pi, cos(theta + m) would start rising again and reward moving away from the
    class, so there the logit is the linear continuation cos - m*sin(m) (= cos - sin(pi - m) * m).
    With m = 0 this returns cos exactly (cos*1 - sin*0).
    """
    sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=_SIN_EPS))
    cos_m, sin_m = torch.cos(m), torch.sin(m)
    threshold = torch.cos(math.pi - m)
    return torch.where(cos > threshold, cos * cos_m - sin * sin_m, cos - sin_m * m)


class ArcFaceHead(nn.Module):
    """Additive angular margin softmax with k sub-centres per class (k=1: ArcFace, k>1: Sub-center ArcFace).

    Written here because pytorch-metric-learning's ArcFaceLoss has no per-sample margins and no margin schedule.
    `margin` is a plain attribute so a schedule can change it between epochs without touching the weights.
    """

    name = "arcface"
    scheduled_margin = True  # MarginSchedule sets `margin` every epoch; context margins widen it photo by photo
    mixed_labels = False     # its target logit needs one class per photo: no mixup/cutmix
    classifier = False       # no class probabilities: votes over the neighbours are its scores

    @classmethod
    def from_config(cls, cfg: "LossConfig", embed_dim: int, n_classes: int) -> "ArcFaceHead":
        return cls(embed_dim, n_classes, s=cfg.s, k_subcenters=cfg.k_subcenters)

    @staticmethod
    def label(cfg: "LossConfig") -> str:
        return "arcface" if cfg.k_subcenters <= 1 else f"subcenter-arcface(k={cfg.k_subcenters})"

    def __init__(self, embed_dim: int, n_classes: int, s: float = 64.0, m: float = 0.5, k_subcenters: int = 1):
        super().__init__()
        if k_subcenters < 1:
            raise ValueError(f"k_subcenters must be >= 1, got {k_subcenters}")
        self.n_classes, self.k_subcenters = n_classes, k_subcenters
        self.s = s
        self.margin = m
        # Rows [c*k, (c+1)*k) are class c's sub-centres.
        self.weight = nn.Parameter(torch.empty(n_classes * k_subcenters, embed_dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, n_classes) cosine to each class: the nearest of its sub-centres."""
        # fp32 even under AMP: bf16 keeps ~3 digits, so cos 0.995 and 0.999 (where the margin acts) would merge;
        # the head is one small matmul, so this costs nothing that matters. TF32 (on from Ampere) is meant to act
        # here too: it rounds the inputs to 10 mantissa bits but sums and returns fp32, so the cosine keeps fp32's
        # steps near 1 and errs by ~1e-4 (512-d, emulated on the CPU; tests/test_cuda.py checks it), bf16 by ~2e-3.
        with torch.autocast(device_type=emb.device.type, enabled=False):
            cos = F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        return cos.view(len(emb), self.n_classes, self.k_subcenters).amax(dim=2)

    def logits(self, emb: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor | None = None) -> torch.Tensor:
        """s * cos for every class, with the true class's angle widened by its row's margin."""
        cos = self.cosine(emb)
        if margins is None:
            margins = torch.full((len(emb),), float(self.margin), dtype=cos.dtype, device=cos.device)
        target = cos.gather(1, labels[:, None])
        widened = _cos_plus_margin(target, margins.to(cos)[:, None])
        return self.s * cos.scatter(1, labels[:, None], widened)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over the batch; `margins` (B,) overrides `self.margin` row by row."""
        return F.cross_entropy(self.logits(emb, labels, margins), labels)


class SoftmaxHead(nn.Module):
    """A linear softmax classifier on the embedding, trained with label-smoothed cross-entropy: the classifier
    baseline (jaguar notes v02, marmoset pipeline) whose embedding goes through the same retrieval as ArcFace's and
    whose softmax gives class probabilities directly.

    It sees the unit embedding times `s`: the BatchNorm output it comes from has a norm near sqrt(embed_dim), so a
    linear layer on a unit vector alone would start with near-uniform logits and learn slowly. No margin: the
    schedule's margin is ignored (`margin` stays 0).
    """

    name = "ce"
    scheduled_margin = False  # no margin: `margin` stays 0 whatever the schedule says
    mixed_labels = True       # cross-entropy takes mixup/cutmix class weights as targets
    classifier = True         # its softmax gives class probabilities (lib.train.trained_run)
    margin = 0.0

    @classmethod
    def from_config(cls, cfg: "LossConfig", embed_dim: int, n_classes: int) -> "SoftmaxHead":
        return cls(embed_dim, n_classes, s=cfg.s, label_smoothing=cfg.label_smoothing)

    @staticmethod
    def label(cfg: "LossConfig") -> str:
        return f"ce(ls={cfg.label_smoothing:g})"

    def __init__(self, embed_dim: int, n_classes: int, s: float = 30.0, label_smoothing: float = 0.1):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.n_classes, self.s, self.label_smoothing = n_classes, s, label_smoothing
        self.fc = nn.Linear(embed_dim, n_classes)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.fc(self.s * F.normalize(emb.float(), dim=1))

    def probabilities(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, n_classes) softmax; rows sum to 1."""
        return self.logits(emb).softmax(dim=1)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy; `labels` are class indices (B,) or, after mixup/cutmix, class weights (B, n_classes).
        `margins` is accepted for CombinedLoss's sake and must be None."""
        if margins is not None:
            raise ValueError(f"the softmax head has no margin: context margins need loss="
                             f"{' or '.join(repr(n) for n, h in LOSSES.items() if h.scheduled_margin)}")
        return F.cross_entropy(self.logits(emb), labels, label_smoothing=self.label_smoothing)


@dataclass
class MarginSchedule:
    """Warm-up phase (small margin, backbone frozen: the head first learns class centres from stable features),
    then the full margin, optionally reached by a linear ramp. Epochs are 0-based.

    With ramp_epochs = R > 0 the margin rises in R equal steps over the first R unfrozen epochs and is
    `margin` from epoch warmup_epochs + R - 1 on; R = 0 (or 1) is a step.
    """

    # the recipe's (config.py): one softmax epoch, then a moderate margin for ~8 photos per individual
    warmup_epochs: int = 1
    warmup_margin: float = 0.0
    margin: float = 0.3
    ramp_epochs: int = 0
    freeze_backbone_in_warmup: bool = True

    def __post_init__(self):
        if self.warmup_epochs < 0 or self.ramp_epochs < 0:
            raise ValueError(f"warmup_epochs and ramp_epochs must be >= 0, "
                             f"got {self.warmup_epochs} and {self.ramp_epochs}")

    def margin_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_margin
        if self.ramp_epochs == 0:
            return self.margin
        fraction = min(1.0, (epoch - self.warmup_epochs + 1) / self.ramp_epochs)
        return self.warmup_margin + fraction * (self.margin - self.warmup_margin)

    def backbone_frozen_at(self, epoch: int) -> bool:
        return self.freeze_backbone_in_warmup and epoch < self.warmup_epochs


def class_context_matrix(class_idx, contexts, n_classes: int) -> torch.Tensor:
    """(n_classes, n_contexts) bool: True where class c has at least one image at that context.

    `class_idx` and `contexts` are per image (e.g. the training index's class indices and `context` column);
    context columns follow the sorted unique context values.
    """
    context_idx, _ = pd.factorize(pd.Series(contexts), sort=True)
    if (context_idx < 0).any():
        raise DataError(f"context is missing for image {int(np.flatnonzero(context_idx < 0)[0])} (0-based row); "
                        "every image needs a context to build context margins")
    matrix = torch.zeros(n_classes, int(context_idx.max()) + 1, dtype=torch.bool)
    matrix[torch.as_tensor(class_idx, dtype=torch.long), torch.as_tensor(context_idx)] = True
    return matrix


def context_margins(labels: torch.Tensor, class_contexts: torch.Tensor, base: float = 0.5,
                    same_context: float = 0.7) -> torch.Tensor:
    """Per-sample margins (B,): `same_context` for a sample whose class shares a context with at least one
    other class (a confusable neighbour at the same site), else `base`.

    `class_contexts` is the (n_classes, n_contexts) bool matrix from `class_context_matrix` (built once from
    the training index); a class seen at several contexts is crowded if any of them holds another class.
    """
    classes_per_context = class_contexts.sum(dim=0)
    crowded = (class_contexts & (classes_per_context >= 2)).any(dim=1)
    return torch.where(crowded.to(labels.device)[labels], same_context, base).float()


class CombinedLoss(nn.Module):
    """ArcFace (or softmax) head plus optional weighted pytorch-metric-learning terms on the same embeddings:
    BatchHard triplet and Multi-Similarity (each with its own miner). Needs P×K batches for the miners."""

    def __init__(self, head: ArcFaceHead | SoftmaxHead, triplet_weight: float = 0.0, triplet_margin: float = 0.2,
                 ms_weight: float = 0.0, ms_alpha: float = 2.0, ms_beta: float = 50.0, ms_base: float = 0.5,
                 ms_miner_epsilon: float = 0.1):
        super().__init__()
        self.head = head
        self.name = head.name  # the head's term in `parts`
        self.weights = {"triplet": triplet_weight, "ms": ms_weight}
        self.triplet = pml_losses.TripletMarginLoss(margin=triplet_margin)
        self.triplet_miner = pml_miners.BatchHardMiner()
        self.ms = pml_losses.MultiSimilarityLoss(alpha=ms_alpha, beta=ms_beta, base=ms_base)
        self.ms_miner = pml_miners.MultiSimilarityMiner(epsilon=ms_miner_epsilon)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor,
                margins: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(total, parts): total = arcface + sum(weight * term); parts holds each unweighted term, detached.

        Parts stay 0-dim tensors on the device (read with float()): converting here would sync the GPU every step.
        """
        terms = {self.name: self.head(emb, labels, margins)}
        if labels.ndim > 1 and any(w > 0 for w in self.weights.values()):
            raise ValueError("mixed labels (mixup/cutmix) have no miner: set triplet_weight and ms_weight to 0")
        if self.weights["triplet"] > 0:
            terms["triplet"] = self.triplet(emb, labels, self.triplet_miner(emb, labels))
        if self.weights["ms"] > 0:
            terms["ms"] = self.ms(emb, labels, self.ms_miner(emb, labels))
        total = terms[self.name] + sum(self.weights[name] * value for name, value in terms.items() if name != self.name)
        return total, {name: value.detach() for name, value in terms.items()}


@dataclass
class LossConfig:
    """Knobs of `build_loss` (s, k_subcenters as in ArcFaceHead; auxiliary terms off at weight 0). The margin is not
    here: MarginSchedule sets it on the head every epoch."""

    loss: str = "arcface"         # a name in LOSSES: arcface | ce, the softmax classifier baseline (s scales its input)
    label_smoothing: float = 0.1  # ce only
    s: float = 30.0               # 64 for many classes, ~30-48 for few (the recipe's 94 lions: 30)
    k_subcenters: int = 1
    triplet_weight: float = 0.0
    triplet_margin: float = 0.2
    ms_weight: float = 0.0
    ms_alpha: float = 2.0
    ms_beta: float = 50.0
    ms_base: float = 0.5
    ms_miner_epsilon: float = 0.1


# The loss heads by config name. A new head is a class with the attributes and methods the two above define (name,
# scheduled_margin, mixed_labels, classifier, from_config, label) added here: the loop, the run assembly, the trained
# run and the results table read it through this registry alone.
LOSSES: dict[str, type[ArcFaceHead] | type[SoftmaxHead]] = {head.name: head for head in (ArcFaceHead, SoftmaxHead)}


def loss_head(name: str) -> type[ArcFaceHead] | type[SoftmaxHead]:
    """The head class of a config's `loss` name; an unknown name raises, listing the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"loss={name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_label(cfg: LossConfig) -> str:
    """The loss of a config as the results table names it: the head (with its own settings), its scale and any
    auxiliary terms, e.g. 'subcenter-arcface(k=3)(s=30)+ms0.5'."""
    extras = [f"+{term}{getattr(cfg, f'{term}_weight'):g}" for term in ("triplet", "ms")
              if getattr(cfg, f"{term}_weight")]
    return f"{loss_head(cfg.loss).label(cfg)}(s={cfg.s:g})" + "".join(extras)


def build_loss(cfg: LossConfig, embed_dim: int, n_classes: int) -> CombinedLoss:
    head = loss_head(cfg.loss).from_config(cfg, embed_dim, n_classes)
    return CombinedLoss(head, triplet_weight=cfg.triplet_weight, triplet_margin=cfg.triplet_margin,
                        ms_weight=cfg.ms_weight, ms_alpha=cfg.ms_alpha, ms_beta=cfg.ms_beta, ms_base=cfg.ms_base,
                        ms_miner_epsilon=cfg.ms_miner_epsilon)
