"""The cross-entropy classifier baseline (loss="ce"): its head and loss, mixup/cutmix, the albumentations backend, a
whole run through the same phases and evaluation, and old configs that predate it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lib.data.transforms import batch_mix, build_transforms
from lib.evaluate.classification import add_classification_metrics
from lib.evaluate.record import load_evaluation, save_evaluation
from lib.evaluate.run_eval import evaluate_run
from lib.train.checkpoint import load_checkpoint
from lib.train.config import RunConfig, build_config, settings_diff
from lib.train.losses import ArcFaceHead, LossConfig, SoftmaxHead, build_loss
from lib.train.run import train_run

TINY = dict(backbone="resnet10t", pretrained="", embed_dim=16, img_size=32, s=10.0, warmup_epochs=1, p=6, k=4,
            lr_backbone=1e-3, lr_head=3e-3, num_workers=0, device="cpu", batches_per_epoch=2)


def test_softmax_head_is_label_smoothed_cross_entropy_by_hand():
    torch.manual_seed(0)
    head = SoftmaxHead(8, 5, s=10.0, label_smoothing=0.2)
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    logits = head.fc(10.0 * emb / emb.norm(dim=1, keepdim=True))
    target = 0.8 * F.one_hot(labels, 5) + 0.2 / 5
    by_hand = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert head(emb, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)
    soft = torch.softmax(torch.randn(6, 5), dim=1)  # mixed labels: class weights
    by_hand = -((0.8 * soft + 0.2 / 5) * logits.log_softmax(dim=1)).sum(dim=1).mean()
    assert head(emb, soft).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert torch.allclose(head.probabilities(emb).sum(dim=1), torch.ones(6))


def test_loss_choice_and_refusals():
    assert isinstance(build_loss(LossConfig(), 8, 3).head, ArcFaceHead), "the default stays ArcFace"
    ce = build_loss(LossConfig(loss="ce"), 8, 3)
    total, parts = ce(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    assert set(parts) == {"ce"} and total.item() == pytest.approx(float(parts["ce"]))
    with pytest.raises(ValueError, match="valid: arcface, ce"):
        build_loss(LossConfig(loss="softmax"), 8, 3)
    with pytest.raises(ValueError, match="no miner"):
        build_loss(LossConfig(loss="ce", triplet_weight=0.5), 8, 3)(torch.randn(4, 8), torch.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="no margin"):
        ce(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]), torch.full((4,), 0.5))


def _mix_partners(mixed: torch.Tensor, x: torch.Tensor) -> tuple[float, list[tuple[int, int]]]:
    """(lam, [(a, b)] per mixed image): the two batch images each mixed image is lam * x[a] + (1 - lam) * x[b] of,
    found by least squares over every pair (mixup uses one lam per batch)."""
    fits = []
    for a in range(len(x)):
        for b in range(len(x)):
            if a != b:
                d = (x[a] - x[b]).flatten()
                lam = float(d @ (mixed[0] - x[b]).flatten() / (d @ d))
                fits.append(((mixed[0] - lam * x[a] - (1 - lam) * x[b]).abs().max().item(), lam))
    lam = min(fits)[1]
    pairs = [next((a, b) for a in range(len(x)) for b in range(len(x)) if a != b and
                  torch.allclose(m, lam * x[a] + (1 - lam) * x[b], atol=1e-5)) for m in mixed]
    return lam, pairs


def test_mixup_and_cutmix_give_class_weights_that_sum_to_one():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 8, 8), torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])  # a P x K batch: classes side by side
    mixup = batch_mix(0.4, 0.0, 5)
    same_class = 0
    for _ in range(20):
        mixed, weights = mixup(x.clone(), y)
        assert weights.shape == (8, 5) and torch.allclose(weights.sum(dim=1), torch.ones(8)) and (weights >= 0).all()
        # each mixed image blends two batch images in the proportion its class weights give their classes
        lam, pairs = _mix_partners(mixed, x)
        for w, (a, b) in zip(weights, pairs):
            assert torch.allclose(w, lam * F.one_hot(y[a], 5) + (1 - lam) * F.one_hot(y[b], 5), atol=1e-5)
        assert sorted(a for a, _ in pairs) == list(range(8)), "every photo is mixed in once"
        same_class += sum(int(y[a] == y[b]) for a, b in pairs)
    # shuffled first: unshuffled, torchvision pairs each photo with the one before it, 5 of 8 of one class here
    assert same_class / (20 * 8) < 0.45
    both = batch_mix(0.4, 1.0, 5)
    for _ in range(5):
        _, weights = both(x.clone(), y)
        assert torch.allclose(weights.sum(dim=1), torch.ones(8))
    assert batch_mix(0.0, 0.0, 5) is None
    with pytest.raises(ValueError, match="alphas >= 0"):
        batch_mix(-1.0, 0.0, 5)


@pytest.mark.parametrize("preset", ["light", "strong"])
@pytest.mark.parametrize("resize", ["crop", "squash", "pad"])
def test_albumentations_backend_draws_the_preset_from_torchs_rng(preset, resize):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    train_tf, eval_tf = build_transforms(32, [0.5] * 3, [0.25] * 3, preset=preset, resize=resize,
                                         backend="albumentations")
    _, tv_eval = build_transforms(32, [0.5] * 3, [0.25] * 3, preset=preset, resize=resize)
    assert repr(eval_tf) == repr(tv_eval), "the eval transform does not depend on the backend"
    torch.manual_seed(3)
    first = train_tf(img)
    torch.manual_seed(3)
    assert torch.equal(first, train_tf(img)), "a seeded view is the same view"
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, train_tf(img)), "unseeded draws differ"
    with pytest.raises(ValueError, match="valid: \\['torchvision', 'albumentations'\\]"):
        build_transforms(32, [0.5] * 3, [0.25] * 3, backend="alb")


def test_a_config_from_before_the_ce_baseline_loads_as_arcface_and_resumes():
    old = build_config().as_dict()
    for section, names in (("loss", ("loss", "label_smoothing")), ("aug", ("aug_backend", "mixup", "cutmix"))):
        for name in names:
            del old[section][name]
    cfg = RunConfig.from_dict(old)
    assert (cfg.loss.loss, cfg.aug.aug_backend, cfg.aug.mixup, cfg.aug.cutmix) == ("arcface", "torchvision", 0, 0)
    assert settings_diff(build_config(), old, build_config()) == []
    assert settings_diff(build_config(loss="ce"), old, build_config()) == ["loss.loss"]


def test_mixup_with_arcface_is_refused(demo, tmp_path):
    data, splits = demo
    cfg = build_config(data_dir=str(data), splits_dir=str(splits), **TINY, mixup=0.2)
    with pytest.raises(ValueError, match="set loss='ce'"):
        train_run(str(tmp_path), cfg, progress=False)


def test_a_ce_run_trains_through_the_phases_and_evaluates_with_probabilities(demo, tmp_path):
    data, splits = demo
    # frozen-backbone epochs (the marmoset pipeline's freeze_epochs) are the schedule's warm-up, counted from the head
    # phase's first epoch
    cfg = build_config(data_dir=str(data), splits_dir=str(splits), **{**TINY, "warmup_epochs": 2}, loss="ce",
                       head_epochs=1, epochs=2, mixup=0.2, cutmix=1.0, ema_decay=0.5)
    history = train_run(str(tmp_path), cfg, progress=False)
    assert list(history["phase"]) == ["untrained", "head", "warmup", "finetune"]
    assert (history["margin"].dropna() == 0).all(), "the softmax head has no margin"
    assert np.isfinite(history["train_loss"].dropna()).all()

    ev = evaluate_run(tmp_path, k=5, device="cpu")
    add_classification_metrics(ev)
    save_evaluation(ev, tmp_path / "eval" / "val")
    ev = load_evaluation(tmp_path / "eval" / "val")
    probs = ev.class_probs.to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    pred = ev.class_probs.columns[probs.argmax(axis=1)]
    assert (pred == ev.queries["softmax_pred"]).all()
    softmax = ev.metrics["classification"]["softmax"]
    assert softmax["accuracy"] == pytest.approx(np.mean(pred == ev.queries["label"]))
    votes = ev.metrics["classification"]["votes"]
    assert votes["accuracy"] == pytest.approx(ev.metrics["vote_accuracy"])
    # the probabilities, recomputed from the checkpoint's classifier weights and the saved embeddings
    ckpt = load_checkpoint(tmp_path / "best_model.pt")
    w, b = ckpt["criterion"]["head.fc.weight"].numpy(), ckpt["criterion"]["head.fc.bias"].numpy()
    q = ev.query_emb / np.linalg.norm(ev.query_emb, axis=1, keepdims=True)
    logits = 10.0 * q @ w.T + b
    by_hand = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, by_hand / by_hand.sum(axis=1, keepdims=True), atol=1e-5)
    order = sorted(ckpt["config"]["class_to_idx"], key=ckpt["config"]["class_to_idx"].get)
    assert list(ev.class_probs.columns) == order
