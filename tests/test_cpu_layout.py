"""The CPU's layout and batch choice (lib.core.cpu_probe) and the extraction that uses it (lib.retrieval.embed)."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

import lib.core.cpu_probe as cpu_probe
import lib.retrieval.embed as embed
from lib.core.cpu_probe import ForwardChoice, cpu_forward_choice
from lib.core.device import auto_settings
from lib.retrieval.embed import extract_embeddings, intra_op_threads
from lib.train.model import ModelConfig, create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(ModelConfig(backbone="test_efficientnet", pretrained="", embed_dim=32)).eval()


def images(n, size=48, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("engine, channels_last, batch", [
    ("eager", False, 1), ("eager", False, 8), ("eager", True, 1), ("eager", True, 3), ("eager", True, 8),
    ("onnxruntime", False, 3), ("onnxruntime", True, 8)])
def test_embeddings_at_any_engine_layout_and_batch_equal_the_nchw_reference(model, monkeypatch, engine,
                                                                            channels_last, batch):
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    x = images(12)
    with torch.inference_mode():
        reference = model(x).numpy()  # the old setting: NCHW, all images in one batch
    monkeypatch.setattr(embed, "forward_choice",
                        lambda *a, **k: ForwardChoice(channels_last, batch, "test", engine))
    emb = extract_embeddings(model, [(xi, 0) for xi in x], auto_settings("cpu"), batch_size=8)
    # float32 convolutions summed in another order (oneDNN's NHWC kernels, other blockings per batch): each value
    # moves by rounding, ~1e-6 relative; the bound is 1e-5 in cosine
    cosine = (emb * reference).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(reference, axis=1)
    assert emb.shape == reference.shape
    assert np.abs(1 - cosine).max() < 1e-5
    np.testing.assert_allclose(emb, reference, atol=1e-5, rtol=1e-4)


def test_extraction_takes_the_probes_choice(model, tmp_path, monkeypatch):
    seen = []
    real_forward = model.forward

    def spy(x):
        seen.append((len(x), x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))
        return real_forward(x)

    monkeypatch.setattr(model, "forward", spy)
    monkeypatch.setattr(embed, "forward_choice", lambda *a, **k: ForwardChoice(True, 4, "test"))
    extract_embeddings(model, [(xi, 0) for xi in images(10)], auto_settings("cpu"), batch_size=8)
    assert seen == [(4, True), (4, True), (2, True)]  # loader batches of 8, 2, each split into passes of 4 at most


def test_probe_result_is_cached_and_keyed_by_model_size_and_threads(model, tmp_path, monkeypatch):
    path = tmp_path / "cpu_probe.json"
    first = cpu_forward_choice(model, (3, 32, 32), batches=(1, 2), path=path)
    assert first.why.startswith("probe:") and first.batch_size in (1, 2)
    stored = json.loads(path.read_text())
    assert len(stored) == 1 and set(next(iter(stored.values()))["all"]) == {
        "nchw/1", "nchw/2", "channels_last/1", "channels_last/2"}

    def no_probe(*a, **k):
        raise AssertionError("probed again")

    monkeypatch.setattr(cpu_probe, "probe", no_probe)
    again = cpu_forward_choice(model, (3, 32, 32), batches=(1, 2), path=path)
    assert (again.channels_last, again.batch_size) == (first.channels_last, first.batch_size)
    assert again.why.startswith("cached probe:")
    monkeypatch.undo()
    # another input size, another thread count, another model: each its own probe
    cpu_forward_choice(model, (3, 40, 40), batches=(1, 2), path=path)
    with intra_op_threads(1 if torch.get_num_threads() > 1 else 2):
        cpu_forward_choice(model, (3, 32, 32), batches=(1, 2), path=path)
    other = create_model(ModelConfig(backbone="test_efficientnet", pretrained="", embed_dim=16)).eval()
    cpu_forward_choice(other, (3, 32, 32), batches=(1, 2), path=path)
    assert len(json.loads(path.read_text())) == 4


def test_a_large_cpu_job_takes_onnx_runtime_and_a_small_one_eager(model, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(embed, "cpu_forward_choice", lambda *a, **k: ForwardChoice(True, 8, "test"))
    settings = auto_settings("cpu")
    assert embed.forward_choice(model, settings, (3, 32, 32), cpu_probe.PROBE_MIN_IMAGES).engine == "onnxruntime"
    assert embed.forward_choice(model, settings, (3, 32, 32), cpu_probe.PROBE_MIN_IMAGES - 1).engine == "eager"


def test_a_small_job_takes_the_rule_without_probing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_probe, "probe", lambda *a, **k: pytest.fail("probed a 10-image job"))
    choice = cpu_forward_choice(model, (3, 32, 32), n_images=10, path=tmp_path / "p.json")
    assert (choice.channels_last, choice.batch_size) == (cpu_probe.RULE["channels_last"], cpu_probe.RULE["batch_size"])
    assert choice.why.startswith("rule:") and not (tmp_path / "p.json").exists()


def test_training_probe_leaves_the_model_as_it_was(model):
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    speeds = cpu_probe.probe(model, (3, 32, 32), train=True, batches=(2,), repeats=1)
    model.eval()
    assert set(speeds) == {(False, 2), (True, 2)}
    for k, v in model.state_dict().items():  # BatchNorm's running statistics too
        assert torch.equal(v, before[k]) and v.is_contiguous(), k
    assert all(p.grad is None for p in model.parameters())


def test_the_choice_says_engine_layout_batch_and_why():
    assert ForwardChoice(True, 8, "probe: 20 img/s").describe() == "eager, channels_last, batch 8 (probe: 20 img/s)"
    onnx = ForwardChoice(True, 4, "rule: x", "onnxruntime")
    assert onnx.describe() == "onnxruntime, NCHW in, batch 4 (rule: x)"
    assert onnx.memory_format == torch.contiguous_format  # ONNX Runtime takes NCHW


def test_training_choice_probes_divisors_of_the_effective_batch(model, tmp_path):
    choice = cpu_probe.cpu_train_choice(model, (3, 32, 32), effective_batch=12, min_chunk=4, path=tmp_path / "p.json")
    entry = next(iter(json.loads((tmp_path / "p.json").read_text()).values()))
    assert entry["train"] and {k.split("/")[1] for k in entry["all"]} == {"4", "6", "12"}
    assert 12 % choice.batch_size == 0


def test_training_choice_without_split_probes_the_whole_batch(model, tmp_path):
    choice = cpu_probe.cpu_train_choice(model, (3, 32, 32), effective_batch=12, split=False, min_chunk=4,
                                        path=tmp_path / "p.json")
    entry = next(iter(json.loads((tmp_path / "p.json").read_text()).values()))
    assert {k.split("/")[1] for k in entry["all"]} == {"12"} and choice.batch_size == 12


def test_cpu_training_settings_take_the_probes_layout_and_pass_and_a_resume_what_it_recorded(model, monkeypatch):
    from lib.train import phases

    asked = []
    monkeypatch.setattr(phases, "cpu_train_choice",
                        lambda m, shape, effective, split: asked.append(split) or ForwardChoice(True, 8, "test"))
    s, line = phases.cpu_training_settings(auto_settings("cpu"), model, 64, step_batch=32)
    assert (s.channels_last, s.backbone_chunk, s.accum_steps) == (True, 8, 1) and asked == [True]
    assert line == "backbone phase channels_last, passes of 8 images per step of 32 (test)"
    assert s.backbone_choice == "test"
    # a resumed run takes what its checkpoint recorded, whatever the probe would say now
    recorded = {**auto_settings("cpu").as_dict(), "channels_last": False, "backbone_chunk": 16,
                "backbone_choice": "probe: earlier"}
    s, line = phases.cpu_training_settings(auto_settings("cpu"), model, 64, 32, recorded=recorded)
    assert (s.channels_last, s.backbone_chunk, s.backbone_choice) == (False, 16, "probe: earlier") and asked == [True]
    assert line.startswith("backbone phase NCHW, passes of 16 images per step of 32 (as the run began")
    # a checkpoint from before the choice was recorded trained at what it holds: kept too
    legacy = {k: v for k, v in recorded.items() if k != "backbone_choice"}
    s, _ = phases.cpu_training_settings(auto_settings("cpu"), model, 64, 32, recorded=legacy)
    assert (s.channels_last, s.backbone_chunk) == (False, 16) and asked == [True]
    # one whose run began without a backbone phase recorded no choice: nothing trained at it, so the probe chooses
    s, _ = phases.cpu_training_settings(auto_settings("cpu"), model, 64, 32, recorded={**recorded, "backbone_choice": ""})
    assert (s.channels_last, s.backbone_chunk) == (True, 8) and asked == [True, True]
    # the probe's pick of the whole batch: one pass
    monkeypatch.setattr(phases, "cpu_train_choice", lambda m, shape, effective, split: ForwardChoice(True, 32, "t"))
    assert phases.cpu_training_settings(auto_settings("cpu"), model, 64, 32)[0].backbone_chunk == 0


def test_onnx_export_is_reused_for_the_same_weights_and_redone_when_they_change(model, monkeypatch):
    pytest.importorskip("onnxruntime")
    exports = []
    real = embed.OnnxForward

    def counting(m, shape):
        exports.append(shape)
        return real(m, shape)

    monkeypatch.setattr(embed, "OnnxForward", counting)
    monkeypatch.setattr(embed, "_exports", {})  # not another test's export
    monkeypatch.setattr(embed, "forward_choice", lambda *a, **k: ForwardChoice(True, 8, "test", "onnxruntime"))
    data = [(xi, 0) for xi in images(6)]
    first = extract_embeddings(model, data, auto_settings("cpu"))
    again = extract_embeddings(model, data, auto_settings("cpu"))
    assert len(exports) == 1 and np.array_equal(first, again)
    weight = model.head.fc.weight
    with torch.no_grad():
        weight.mul_(-1)  # in place: the same module, only the hash of its weights can tell
    try:
        flipped = extract_embeddings(model, data, auto_settings("cpu"))
        with torch.inference_mode():
            expected = model(torch.stack([x for x, _ in data])).numpy()
    finally:
        with torch.no_grad():
            weight.mul_(-1)
    assert len(exports) == 2
    np.testing.assert_allclose(flipped, expected, atol=1e-5)
    assert np.abs(flipped - first).max() > 0.1


@pytest.mark.parametrize("engine, channels_last, batch", [
    ("eager", True, 4), ("eager", False, 8), ("onnxruntime", False, 4)])
def test_the_recipes_backbone_on_real_photos_embeds_alike_at_the_probes_choices(lions, monkeypatch, engine,
                                                                                channels_last, batch):
    """The recipe's model (Lite0, packaged ImageNet weights, 320 px, its eval transform) on lion photos: the
    embeddings of each engine, layout and batch the probe picks from equal the old setting's (eager NCHW, the
    loader's whole batch in one pass) to 1e-5 in cosine, the bound issue 29 set."""
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    from lib.data.dataset import IndexDataset
    from lib.data.transforms import build_transforms
    from lib.train.config import build_config

    cfg = build_config()
    torch.manual_seed(0)
    recipe = create_model(dataclasses.replace(cfg.model, pretrained="lite0-imagenet")).eval()
    dc = recipe.data_config
    eval_tf = build_transforms(cfg.aug.img_size, dc["mean"], dc["std"], preset="none", resize=cfg.aug.resize)[1]
    photos = sorted(p.relative_to(lions) for p in (lions / "val").rglob("*.png"))[:8]
    dataset = IndexDataset(pd.DataFrame({"path": [str(p) for p in photos], "label": "x"}), lions, eval_tf, {"x": 0})
    with torch.inference_mode():
        reference = recipe(torch.stack([dataset[i][0] for i in range(len(dataset))])).numpy()
    monkeypatch.setattr(embed, "forward_choice", lambda *a, **k: ForwardChoice(channels_last, batch, "test", engine))
    monkeypatch.setattr(embed, "_exports", {})  # this model's own export
    emb = extract_embeddings(recipe, dataset, auto_settings("cpu"))
    cosine = (emb * reference).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(reference, axis=1)
    assert emb.shape == reference.shape == (8, cfg.model.embed_dim)
    assert np.abs(1 - cosine).max() < 1e-5
