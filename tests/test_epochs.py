"""One optimizer step of each phase: gradient accumulation that keeps the recipe's batch, and clipping that bounds
every parameter the optimizer steps (the loss's class centres included)."""
from dataclasses import replace

import pytest
import torch

from lib.core.device import auto_settings
from lib.data.samplers import PKSampler
from lib.train.checkpoint import seed_everything
from lib.train.config import build_config
from lib.train.feature_cache import CachedFeatures
from lib.train.losses import LossConfig, build_loss
from lib.train.model import ModelConfig, create_model
from lib.train.phases import cached_batches
from lib.train.state import TrainState
from lib.train.step import train_step

P, K = 6, 4
LABELS = torch.arange(P).repeat_interleave(K)  # one P x K batch, class by class as the sampler gives it


def _state(accum: int = 1, grad_clip: float = 0.0, chunk: int = 0, ms_weight: float = 0.0) -> TrainState:
    seed_everything(0)
    model = create_model(ModelConfig(backbone="resnet10t", pretrained="", embed_dim=8))
    criterion = build_loss(LossConfig(k_subcenters=2, ms_weight=ms_weight), 8, P)
    criterion.head.margin = 0.3
    cfg = build_config(lr_backbone=1e-3, lr_head=1e-2, grad_clip=grad_clip).train
    settings = replace(auto_settings(device="cpu", num_workers=0, accum_steps=accum), backbone_chunk=chunk)
    return TrainState.build(model, criterion, cfg, settings)


def _named(state: TrainState) -> dict:
    return dict(state.model.named_parameters()) | {f"criterion.{k}": v for k, v in state.criterion.named_parameters()}


def _spy(state: TrainState) -> tuple[dict, list]:
    """(the gradients the optimizer steps with, the size of each forward pass), filled as the step runs."""
    grads, sizes = {}, []
    step, forward = state.optimizer.step, state.runner.wrapped

    def stepping(*args, **kwargs):
        grads.update({k: p.grad.clone() for k, p in _named(state).items() if p.grad is not None})
        return step(*args, **kwargs)

    def counting(x, *args, **kwargs):
        sizes.append(len(x))
        return forward(x, *args, **kwargs)

    state.optimizer.step, state.runner.wrapped = stepping, counting
    return grads, sizes


def _one_step(accum: int, grad_clip: float = 0.0):
    state = _state(accum, grad_clip)
    grads, sizes = _spy(state)
    x = torch.randn(P * K, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # BatchNorm in eval mode: its batch statistics are the one thing a micro-batch changes (stated in train_step)
    state.model.eval()
    loss = train_step(state, x, LABELS, margins_for=lambda y: 0.2 + 0.1 * (y % 2))
    return loss, grads, sizes


@pytest.mark.parametrize("accum", [2, 3, 4])
def test_accumulation_splits_the_recipes_batch_and_gives_its_loss_and_gradients(accum):
    loss, grads, sizes = _one_step(1)
    loss_acc, grads_acc, sizes_acc = _one_step(accum)
    assert sizes == [P * K] and len(sizes_acc) == accum and sum(sizes_acc) == P * K, "the card splits, not adds"
    assert max(sizes_acc) - min(sizes_acc) <= 1
    # float32 sums of the same per-photo terms in another order: ~1e-6 relative per addition, through the conv
    # layers' backward sums; the DDP test compares its partial-gradient sums at the same tolerance
    torch.testing.assert_close(loss_acc, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_acc.keys() and "criterion.head.weight" in grads
    for key, g in grads.items():
        torch.testing.assert_close(grads_acc[key], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {key}")


def _step_in_train_mode(accum: int = 1, chunk: int = 0):
    """One step with a Multi-Similarity term, the backbone's BatchNorm frozen (as for pretrained weights) and the
    head's training on batch statistics: (loss, gradients, forward sizes, the head BatchNorm's running mean)."""
    state = _state(accum, chunk=chunk, ms_weight=0.5)
    grads, sizes = _spy(state)
    state.model.frozen_bn = True
    state.model.train()
    x = torch.randn(P * K, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = train_step(state, x, LABELS)
    return loss, grads, sizes, state.model.head.bn.running_mean.clone()


@pytest.mark.parametrize("chunk", [4, 8, 16])
def test_backbone_passes_in_chunks_give_the_one_pass_steps_loss_and_gradients(chunk):
    """The CPU's backbone_chunk: the backbone runs `chunk` images at a time, the head's BatchNorm and the miner see
    the whole batch, so the step is the one-pass step to float rounding (the tolerance of the accumulation test);
    accumulation, which cuts the step itself, gives another loss here."""
    loss, grads, _, running = _step_in_train_mode()
    loss_c, grads_c, sizes_c, running_c = _step_in_train_mode(chunk=chunk)
    assert sizes_c == [P * K], "one step over the whole batch"
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(running_c, running, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_c.keys() and "backbone.conv1.0.weight" in grads
    for key, g in grads.items():
        # the embeddings differ by float rounding (another blocking of the convolutions, ~1e-7), which ArcFace's
        # s=30 logits and Multi-Similarity's exp(50 x) scale up in the gradients: seen up to 3.4e-5 of a tensor's
        # largest value at one thread (head.fc), and for GeM's p, one scalar summed over every image and channel,
        # 1e-6 between sums of order 1 that nearly cancel
        torch.testing.assert_close(grads_c[key], g, rtol=1e-4, atol=1e-4 * max(g.abs().max().item(), 0.1),
                                   msg=f"gradient of {key}")
    loss_acc, *_ = _step_in_train_mode(accum=3)
    assert abs(loss_acc.item() - loss.item()) > 1e-3


def _total_norm(grads: dict) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))


def test_clipping_scales_every_stepped_gradient_the_class_centres_included():
    clip = 1e-3
    _, free, _ = _one_step(1)
    _, clipped, _ = _one_step(1, grad_clip=clip)
    assert free.keys() == clipped.keys() and "criterion.head.weight" in free
    # by hand: one factor clip / (total norm + 1e-6) (clip_grad_norm_'s) over the model's and the loss's gradients
    factor = clip / (_total_norm(free) + 1e-6)
    assert factor < 0.01
    for key, g in free.items():
        # the same float32 products as clip_grad_norm_'s, the norm summed in another order
        torch.testing.assert_close(clipped[key], g * factor, rtol=1e-5, atol=1e-12, msg=key)


def test_the_head_phase_clips_the_class_centres_too():
    clip = 1e-3
    state = _state(grad_clip=clip)
    dim = state.model.eval().pooled(torch.zeros(2, 3, 32, 32)).shape[1]
    features = CachedFeatures(torch.randn(1, P * K, dim, generator=torch.Generator().manual_seed(2)),
                              torch.zeros(1, dim))
    grads, _ = _spy(state)
    state.model.set_trainable_stages(0)
    for x, y in cached_batches(features, LABELS, PKSampler(LABELS.numpy(), P, K, batches_per_epoch=1), 0, "cpu")(1):
        train_step(state, x, y, pooled=True)
    assert "criterion.head.weight" in grads
    assert _total_norm(grads) <= clip * (1 + 1e-5)  # clip_grad_norm_ leaves it at clip * norm / (norm + 1e-6)
