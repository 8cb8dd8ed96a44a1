import numpy as np
import pytest
import torch

from lib.train.model import EmbeddingModel, GeM, ModelConfig, create_model

X = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def tiny(backbone: str = "test_efficientnet", seed: int = 0, **kw) -> EmbeddingModel:
    torch.manual_seed(seed)
    return create_model(ModelConfig(backbone=backbone, embed_dim=16, **kw))


def weighted_sum(out: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient reaches every embedding dimension (a plain sum of unit vectors may not)."""
    return (out * torch.linspace(-1, 1, out.shape[1])).sum()


@pytest.mark.parametrize("backbone", ["test_efficientnet", "resnet10t"])
@pytest.mark.parametrize("pooling", ["gem", "avg"])
def test_output_is_one_unit_vector_per_image(backbone, pooling):
    out = tiny(backbone, pooling=pooling).eval()(X)
    assert out.shape == (4, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_gem_matches_the_formula_and_its_limits():
    x = torch.rand(2, 5, 3, 4, generator=torch.Generator().manual_seed(1)).double() + 0.1
    p = 2.5
    expected = np.power(np.power(x.numpy(), p).mean(axis=(2, 3)), 1 / p)
    torch.testing.assert_close(GeM(p)(x), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(GeM(1.0)(x), x.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)  # p=1: average pooling
    peak, high_p = x.amax(dim=(2, 3)), GeM(80.0)(x)  # large p: tends to max pooling from below
    assert torch.all(high_p <= peak + 1e-6) and torch.all(high_p > 0.95 * peak)


def test_gem_keeps_fp16_activations_from_overflowing():
    x = torch.full((1, 2, 4, 4), 100.0, dtype=torch.float16)  # 100**3 overflows fp16 (max 65504)
    torch.testing.assert_close(GeM(3.0)(x), torch.full((1, 2), 100.0, dtype=torch.float16))


def test_parameters_split_into_backbone_and_head_with_gem_p_learned_in_the_head():
    model = tiny().train()
    head, backbone = model.head_parameters(), model.backbone_parameters()
    assert {id(p) for p in head}.isdisjoint({id(p) for p in backbone})
    assert {id(p) for p in head} | {id(p) for p in backbone} == {id(p) for p in model.parameters()}
    assert any(p is model.pool.p for p in head)
    weighted_sum(model(X)).backward()
    assert model.pool.p.grad is not None and model.pool.p.grad.abs() > 0


def _bn_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def test_frozen_backbone_gets_no_grads_and_keeps_its_batchnorm_statistics():
    model = tiny()
    model.set_backbone_trainable(False)
    model.train()  # the call a training loop makes each epoch must not unfreeze the statistics
    backbone_before, head_before = _bn_stats(model.backbone), _bn_stats(model.head)
    weighted_sum(model(X * 3 + 1)).backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(p.grad is not None for p in model.head_parameters())
    for k, v in _bn_stats(model.backbone).items():
        torch.testing.assert_close(v, backbone_before[k], msg=k)
    assert not torch.equal(_bn_stats(model.head)["bn.running_mean"], head_before["bn.running_mean"])  # head trains

    model.set_backbone_trainable(True)
    assert model.backbone.training and all(p.requires_grad for p in model.backbone_parameters())
    model(X * 3 + 1)
    assert any(not torch.equal(v, backbone_before[k]) for k, v in _bn_stats(model.backbone).items())


def test_unknown_backbone_and_pooling_list_valid_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet5O'.*resnet50"):
        create_model(ModelConfig(backbone="resnet5O"))
    with pytest.raises(ValueError, match="gem, avg"):
        create_model(ModelConfig(backbone="test_efficientnet", pooling="max"))


def test_channels_last_gives_the_same_embeddings():
    model = tiny().eval()
    expected = model(X)
    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(X.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5, rtol=1e-4)


def test_config_rebuilds_the_same_architecture():
    model = tiny("resnet10t", pooling="avg", drop_rate=0.2)
    rebuilt = EmbeddingModel(ModelConfig(**model.config))
    rebuilt.load_state_dict(model.state_dict())  # strict: same names and shapes
    torch.testing.assert_close(rebuilt.eval()(X), model.eval()(X))


@pytest.mark.parametrize(
    "backbone, mean", [("tf_efficientnet_lite0", (0.5, 0.5, 0.5)), ("resnet10t", (0.485, 0.456, 0.406))]
)
def test_data_config_is_timms_for_the_backbone(backbone, mean):
    config = EmbeddingModel(ModelConfig(backbone=backbone)).data_config
    assert config["mean"] == pytest.approx(mean) and config["interpolation"] == "bicubic"
