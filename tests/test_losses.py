import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss

from lib.core.errors import DataError
from lib.train.losses import (
    ArcFaceHead,
    CombinedLoss,
    LossConfig,
    MarginSchedule,
    build_loss,
    class_context_matrix,
    context_margins,
)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # head weights are initialised from the global RNG


def _batch(n=12, d=8, n_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, n_classes, (n,), generator=g)


def _reference_arcface_rows(emb, weight, labels, s, m):
    """Per-row ArcFace loss from angles, in float64: the textbook definition with the threshold rule."""
    cos = F.normalize(emb.double(), dim=1) @ F.normalize(weight.double(), dim=1).T
    theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1, 1))
    widened = torch.where(theta + m <= math.pi, torch.cos(theta + m), torch.cos(theta) - m * math.sin(m))
    logits = cos.scatter(1, labels[:, None], widened) * s
    return F.cross_entropy(logits, labels, reduction="none")


def _rows(head, emb, labels, margins=None):
    return F.cross_entropy(head.logits(emb, labels, margins), labels, reduction="none")


def test_zero_margin_is_cross_entropy_on_scaled_cosine():
    emb, labels = _batch()
    head = ArcFaceHead(8, 5, s=30.0, m=0.5)
    head.margin = 0.0  # the schedule's way of changing the margin
    cos = (emb / emb.norm(dim=1, keepdim=True)) @ (head.weight / head.weight.norm(dim=1, keepdim=True)).T
    expected = F.cross_entropy(30.0 * cos, labels)
    assert torch.allclose(head(emb, labels), expected, atol=1e-6)
    # m = 0 leaves the true-class logit bit-for-bit untouched
    assert torch.equal(head.logits(emb, labels), 30.0 * head.cosine(emb))


def test_matches_angle_reference_and_pytorch_metric_learning():
    emb, labels = _batch(n=16)
    head = ArcFaceHead(8, 5, s=16.0, m=0.5)
    # rows 0-3 point almost opposite their class centre, so theta + m > pi takes the threshold branch
    emb[:4] = -head.weight.detach()[labels[:4]] + 0.01 * emb[:4]
    expected = _reference_arcface_rows(emb, head.weight.detach(), labels, 16.0, 0.5)
    assert torch.allclose(_rows(head, emb, labels).double(), expected, atol=1e-4)

    pml = ArcFaceLoss(num_classes=5, embedding_size=8, margin=math.degrees(0.5), scale=16.0)
    pml.W.data = head.weight.detach().T.clone()
    assert torch.allclose(head(emb, labels), pml(emb, labels), atol=1e-4)


def test_target_logit_decreases_monotonically_in_angle():
    head = ArcFaceHead(2, 2, s=1.0, m=0.5)
    theta = torch.linspace(0, math.pi, 2001)
    emb = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    head.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = head.logits(emb, torch.zeros(len(emb), dtype=torch.long))[:, 0]
    assert (target.diff() < 0).all()


def test_larger_margin_raises_every_rows_loss():
    emb, labels = _batch()
    head = ArcFaceHead(8, 5, s=8.0)  # small s: no row's loss rounds to 0 in float32
    losses = [_rows(head, emb, labels, torch.full((len(emb),), m)) for m in (0.0, 0.2, 0.5)]
    assert (losses[0] < losses[1]).all() and (losses[1] < losses[2]).all()


def test_per_sample_margins_apply_row_by_row():
    emb, labels = _batch(n=6)
    head = ArcFaceHead(8, 5, s=30.0)
    margins = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7, 0.5])
    rows = _rows(head, emb, labels, margins)
    for i, m in enumerate(margins.tolist()):
        head.margin = m
        assert torch.allclose(rows[i], _rows(head, emb, labels)[i], atol=1e-6)
    assert torch.allclose(head(emb, labels, margins), rows.mean())


def test_subcenters_equal_to_the_plain_centre_give_plain_arcface():
    emb, labels = _batch()
    plain = ArcFaceHead(8, 5, s=30.0, m=0.5)
    sub = ArcFaceHead(8, 5, s=30.0, m=0.5, k_subcenters=3)
    sub.weight.data = plain.weight.detach().repeat_interleave(3, dim=0)
    assert torch.allclose(sub(emb, labels), plain(emb, labels), atol=1e-6)


def test_subcenter_cosine_is_the_nearest_subcenter():
    # 2-D, 2 classes x 2 sub-centres at known angles; embedding at 80 degrees.
    angles = torch.tensor([0.0, 90.0, 170.0, 300.0])  # class 0: 0, 90; class 1: 170, 300
    head = ArcFaceHead(2, 2, s=10.0, m=0.3, k_subcenters=2)
    head.weight.data = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], dim=1)
    emb = torch.tensor([[math.cos(math.radians(80)), math.sin(math.radians(80))]])
    cos0, cos1 = math.cos(math.radians(10)), math.cos(math.radians(90))  # nearest: 90 (class 0), 170 (class 1)
    assert torch.allclose(head.cosine(emb), torch.tensor([[cos0, cos1]]), atol=1e-6)
    target = math.cos(math.radians(10) + 0.3)
    expected = -math.log(math.exp(10 * target) / (math.exp(10 * target) + math.exp(10 * cos1)))
    assert head(emb, torch.tensor([0])).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("m", [0.0, 0.5])
@pytest.mark.parametrize("k", [1, 2])
def test_gradients_finite_at_cos_plus_and_minus_one(m, k):
    head = ArcFaceHead(8, 4, s=64.0, m=m, k_subcenters=k)
    # axis vectors (a class's sub-centres alike): cosines come out exactly +1 and -1, not 1 - 1e-7
    head.weight.data = torch.eye(8)[:4].repeat_interleave(k, dim=0)
    labels = torch.tensor([0, 1, 2, 3])
    centres = head.weight.detach()[labels * k]
    emb = torch.cat([centres[:2], -centres[2:]]).clone().requires_grad_(True)
    target_cos = head.cosine(emb).gather(1, labels[:, None]).squeeze(1)
    assert target_cos.tolist() == [1.0, 1.0, -1.0, -1.0]
    loss = head(emb, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_head_runs_in_fp32_under_autocast():
    emb, labels = _batch()
    head = ArcFaceHead(8, 5, s=64.0, m=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp_loss = head(emb, labels)
    assert head.cosine(emb).dtype == torch.float32
    assert torch.allclose(amp_loss, head(emb, labels), atol=1e-6)


def test_margin_schedule_phases():
    step = MarginSchedule(warmup_epochs=2, warmup_margin=0.0, margin=0.5)
    assert [step.margin_at(e) for e in range(4)] == [0.0, 0.0, 0.5, 0.5]
    assert [step.backbone_frozen_at(e) for e in range(4)] == [True, True, False, False]
    ramp = MarginSchedule(warmup_epochs=1, warmup_margin=0.1, margin=0.5, ramp_epochs=4)
    assert [ramp.margin_at(e) for e in range(7)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5])
    assert not MarginSchedule(warmup_epochs=3, freeze_backbone_in_warmup=False).backbone_frozen_at(0)
    with pytest.raises(ValueError):
        MarginSchedule(warmup_epochs=-1)


def _batch_hard_triplet(emb, labels, margin):
    """Hardest positive and negative per anchor on unit embeddings, averaged over anchors with a nonzero loss."""
    dist = torch.cdist(F.normalize(emb), F.normalize(emb))
    same = labels[:, None] == labels[None]
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos = dist.masked_fill(~same | eye, -1).amax(1)
    neg = dist.masked_fill(same, float("inf")).amin(1)
    valid = (same & ~eye).any(1) & (~same).any(1)
    losses = F.relu(pos - neg + margin)[valid]
    return losses[losses > 0].mean()


def test_combined_loss_parts_sum_to_total():
    emb, labels = _batch(n=16, n_classes=4)
    emb.requires_grad_(True)
    cfg = LossConfig(s=30.0, triplet_weight=0.3, triplet_margin=0.2, ms_weight=0.7)
    loss = build_loss(cfg, embed_dim=8, n_classes=4)
    loss.head.margin = 0.3  # as MarginSchedule sets it each epoch
    total, parts = loss(emb, labels)
    parts = {name: float(value) for name, value in parts.items()}
    assert set(parts) == {"arcface", "triplet", "ms"}
    assert total.item() == pytest.approx(parts["arcface"] + 0.3 * parts["triplet"] + 0.7 * parts["ms"], rel=1e-6)
    assert parts["arcface"] == pytest.approx(loss.head(emb, labels).item())
    assert parts["triplet"] == pytest.approx(_batch_hard_triplet(emb, labels, 0.2).item(), rel=1e-5)
    assert parts["ms"] > 0
    total.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0

    arc_only = CombinedLoss(loss.head)
    total, parts = arc_only(emb, labels)
    assert set(parts) == {"arcface"} and total.item() == pytest.approx(float(parts["arcface"]))
    assert not parts["arcface"].requires_grad


def test_context_margins_mark_classes_with_a_neighbour_at_their_context():
    # class 0 and 1 share A; class 2 alone at B; class 3 at C and D, class 4 at D.
    class_idx = [0, 0, 1, 2, 2, 3, 3, 4]
    contexts = ["A", "A", "A", "B", "B", "C", "D", "D"]
    matrix = class_context_matrix(class_idx, contexts, n_classes=5)
    assert matrix.tolist() == [[True, False, False, False], [True, False, False, False],
                               [False, True, False, False], [False, False, True, True],
                               [False, False, False, True]]
    margins = context_margins(torch.tensor([2, 0, 1, 3, 4, 2]), matrix, base=0.5, same_context=0.7)
    assert margins.tolist() == pytest.approx([0.5, 0.7, 0.7, 0.7, 0.7, 0.5])


def test_class_context_matrix_names_the_row_without_context():
    with pytest.raises(DataError, match="image 1"):
        class_context_matrix([0, 1], ["A", None], n_classes=2)
