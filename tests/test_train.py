import ast
import dataclasses
import importlib.util
from pathlib import Path

import jupytext
import pandas as pd
import pytest
import torch

from lib.core.errors import DataError
from lib.train.checkpoint import load_checkpoint, save_checkpoint
from lib.train.config import ALIASES, FIELD_OWNER, RunConfig, build_config, config_parameters, settings_diff
from lib.train.step import TrainingDiverged
from lib.train.run import train_run

ROOT = Path(__file__).resolve().parents[1]
# a random-init model from scratch, as the tests before the recipe became the default trained it
TINY = dict(backbone="resnet10t", embed_dim=32, img_size=32, s=30.0, margin=0.3, warmup_epochs=1, p=6, k=4,
            lr_backbone=1e-3, lr_head=3e-3, num_workers=0, device="cpu", head_epochs=0, unfreeze="all", lr_decay=1.0)


def config(demo, **overrides):
    data, splits = demo
    return build_config(data_dir=str(data), splits_dir=str(splits), **{**TINY, **overrides})


def test_training_beats_the_untrained_model(demo, tmp_path):
    """The synthetic demo is where a from-scratch model must visibly learn: its random init starts near chance."""
    history = train_run(str(tmp_path), config(demo, img_size=64, epochs=5, embed_dim=64), progress=False)
    untrained, best = history["val_recall@1"].iloc[0], history["val_recall@1"].max()
    assert best >= untrained + 0.2, history[["epoch", "val_recall@1", "val_mAP"]]
    assert history["val_mAP"].iloc[-1] > history["val_mAP"].iloc[0]
    assert list(history["phase"][:3]) == ["untrained", "warmup", "finetune"]
    assert list(history["margin"][1:3]) == [0.0, 0.3]
    best_ckpt = load_checkpoint(tmp_path / "best_model.pt")
    assert best_ckpt["best_metric"] == pytest.approx(best)
    assert all(v.dtype == torch.float32 for v in best_ckpt["model"].values() if v.is_floating_point())
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == list(range(6))


def test_resume_equals_uninterrupted(demo, tmp_path):
    cfg = config(demo, epochs=3, batches_per_epoch=3, ema_decay=0.9, checkpoint_every=2)
    whole = train_run(str(tmp_path / "whole"), cfg, progress=False)
    train_run(str(tmp_path / "cut"), cfg, progress=False, stop_after_epoch=2)
    assert load_checkpoint(tmp_path / "cut" / "latest_model.pt")["epoch"] == 2
    resumed = train_run(str(tmp_path / "cut"), cfg, progress=False)
    cols = ["epoch", "train_loss", "val_recall@1", "val_mAP", "ema_val_recall@1"]
    pd.testing.assert_frame_equal(whole[cols], resumed[cols], atol=1e-5, rtol=1e-4)
    a = load_checkpoint(tmp_path / "whole" / "latest_model.pt")
    b = load_checkpoint(tmp_path / "cut" / "latest_model.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-5, rtol=1e-4, msg=key)
    assert (tmp_path / "whole" / "checkpoint_epoch_2.pt").exists()


def test_resume_with_other_settings_is_refused_and_fresh_keeps_old_files(demo, tmp_path):
    cfg = config(demo, epochs=1, batches_per_epoch=2)
    train_run(str(tmp_path), cfg, progress=False)
    with pytest.raises(DataError, match="other settings.*embed_dim"):
        train_run(str(tmp_path), config(demo, epochs=1, batches_per_epoch=2, embed_dim=16), progress=False)
    train_run(str(tmp_path), config(demo, epochs=1, batches_per_epoch=2, embed_dim=16), fresh=True, progress=False)
    backups = list(tmp_path.glob("replaced-*"))
    assert len(backups) == 1 and (backups[0] / "latest_model.pt").exists()
    assert load_checkpoint(backups[0] / "latest_model.pt")["config"]["model"]["embed_dim"] == 32


def test_nan_loss_stops_and_keeps_last_good_checkpoint(demo, tmp_path, monkeypatch):
    cfg = config(demo, epochs=3, batches_per_epoch=2)
    train_run(str(tmp_path), cfg, progress=False, stop_after_epoch=1)
    good = (tmp_path / "latest_model.pt").read_bytes()
    original = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: original(*a, **k) * float("nan"))
    with pytest.raises(TrainingDiverged, match="last good epoch"):
        train_run(str(tmp_path), cfg, progress=False)
    assert (tmp_path / "latest_model.pt").read_bytes() == good
    assert load_checkpoint(tmp_path / "latest_model.pt")["epoch"] == 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "latest_model.pt"
    save_checkpoint(path, {"epoch": 1})

    def dies_mid_write(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]  # the half-written temp file is gone


def test_packaged_imagenet_weights_train_offline(demo, tmp_path):
    """Issue 9's 'done means': tf_efficientnet_lite0 from the pip-packaged ImageNet weights, no network."""
    cfg = config(demo, backbone="tf_efficientnet_lite0", pretrained="lite0-imagenet", img_size=64, epochs=1,
                 batches_per_epoch=2, lr_backbone=1e-4)
    history = train_run(str(tmp_path), cfg, progress=False)
    assert len(history) == 2 and history["train_loss"].iloc[1] > 0
    assert "lite0" in load_checkpoint(tmp_path / "latest_model.pt")["config"]["weights_source"]


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown parameter.*'epochz'.*epochs"):
        build_config(epochz=3)


def test_settings_a_checkpoint_predates_count_as_their_defaults():
    defaults = build_config()
    old = build_config(epochs=3).as_dict()
    del old["train"]["context_margin"]
    assert settings_diff(build_config(epochs=9), old, defaults) == []
    assert settings_diff(build_config(context_margin=0.7), old, defaults) == ["train.context_margin"]
    assert settings_diff({**build_config().as_dict(), "weights_source": "packaged"}, old, defaults) == []
    assert settings_diff(build_config(lr_head=1.0), build_config(), defaults) == ["train.lr_head"]


def test_a_checkpoint_config_round_trips_and_old_ones_still_load():
    config = build_config(epochs=4, margin=0.4, k_subcenters=3, img_size=96)
    stored = {**config.as_dict(), "class_to_idx": {"a": 0}, "data_fingerprint": "f" * 64}
    stored["device"]["resolved"] = {"device": "cpu"}
    assert RunConfig.from_dict(stored) == config
    old = config.as_dict()
    old["loss"]["m"] = 0.5  # a knob older runs stored that never acted: the schedule sets the margin
    del old["aug"]["hflip"]
    assert RunConfig.from_dict(old) == build_config(epochs=4, margin=0.4, k_subcenters=3, img_size=96)
    assert settings_diff(config, old, build_config()) == []
    other_margin = build_config(epochs=4, margin=0.5, k_subcenters=3, img_size=96)
    assert settings_diff(other_margin, old, build_config()) == ["schedule.margin"]
    old["loss"]["s_typo"] = 1.0
    with pytest.raises(ValueError, match="unknown setting.*s_typo"):
        RunConfig.from_dict(old)


def test_a_checkpoint_that_predates_resize_loads_and_resumes_as_the_crop_it_trained_with():
    """aug.resize came later than checkpoints that centre-cropped: their config means 'crop', whatever the default."""
    old = build_config(img_size=96, resize="squash").as_dict()
    del old["aug"]["resize"]
    assert RunConfig.from_dict(old).aug.resize == "crop"
    assert RunConfig.from_dict({"model": {"embed_dim": 8}}).aug.resize == "crop"  # no aug section at all
    assert RunConfig.from_dict(build_config(resize="pad").as_dict()).aug.resize == "pad"
    defaults = build_config(resize="squash")
    assert settings_diff(build_config(img_size=96, resize="squash"), old, defaults) == ["aug.resize"]
    assert settings_diff(build_config(img_size=96, resize="crop"), old, defaults) == []


def _notebook_02_parameters() -> dict:
    """Notebook 02's parameters cell, each name with its literal (the cell holds literals only)."""
    cell = next(c for c in jupytext.read(ROOT / "notebooks" / "02_train.py").cells
                if "parameters" in c.metadata.get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


def test_notebook_02_parameters_are_the_dataclass_defaults():
    """One source of defaults: every run-config knob in notebook 02's parameters cell holds its dataclass default, and
    the cell's values make build_config() exactly (so the notebook passes each one on, by name)."""
    declared = _notebook_02_parameters()
    defaults = build_config()
    flat = {name: getattr(getattr(defaults, FIELD_OWNER[name]), name) for name in FIELD_OWNER}
    flat |= {alias: flat[name] for alias, name in ALIASES.items()}  # notebook 02's names for fields
    differ = [f"{name} = {value!r} (default {flat[name]!r})" for name, value in declared.items()
              if name in flat and value != flat[name]]
    assert not differ, "notebook 02 and lib/train/config.py disagree: " + "; ".join(differ)
    assert build_config(**config_parameters(declared)) == defaults
    assert {"head_epochs", "unfreeze", "lr_decay", "img_size", "s", "margin", "p", "images_per_class"} <= set(
        config_parameters(declared))


def test_the_demo_lists_only_what_it_changes():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "notebooks" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    declared = _notebook_02_parameters()
    same = [name for name, value in run_all.DEMO_TRAIN.items() if declared[name] == value]
    assert not same, f"DEMO_TRAIN repeats notebook 02's defaults: {same}"


def test_an_old_checkpoint_resumes_with_the_config_it_stored(demo, tmp_path, capsys):
    """A run from before the head phase existed (its config has no head_epochs / unfreeze / lr_decay, and trained
    with the defaults of then) resumes as it trained, not with the recipe the dataclasses hold now."""
    old_defaults = dict(s=64.0, margin=0.5, warmup_epochs=5, p=8, head_epochs=0, unfreeze="all", lr_decay=1.0)
    cfg = config(demo, **{**old_defaults, "p": 6, "epochs": 1, "batches_per_epoch": 2})
    train_run(str(tmp_path), cfg, progress=False)
    ckpt = load_checkpoint(tmp_path / "latest_model.pt")
    for name in ("head_epochs", "cached_views", "head_init", "unfreeze", "lr_decay"):
        del ckpt["config"]["train"][name]
    save_checkpoint(tmp_path / "latest_model.pt", ckpt)
    stored = RunConfig.from_dict(ckpt["config"])
    assert (stored.train.head_epochs, stored.train.unfreeze, stored.train.lr_decay) == (0, "all", 1.0)
    # today's defaults for what the old run does not record are not what it trained with
    today = dict(head_epochs=30, unfreeze="1", lr_decay=0.5)
    with pytest.raises(DataError, match=r"other settings \(train.head_epochs, train.lr_decay, train.unfreeze\)"):
        train_run(str(tmp_path), config(demo, **{**old_defaults, **today, "p": 6, "epochs": 2, "batches_per_epoch": 2}),
                  progress=False)
    resumed = train_run(str(tmp_path), {**ckpt["config"], "train": {**ckpt["config"]["train"], "epochs": 2}},
                        progress=False)
    assert "resumed from" in capsys.readouterr().out
    assert list(resumed["phase"]) == ["untrained", "warmup", "warmup"]  # warmup_epochs=5 as stored, no head phase
    assert load_checkpoint(tmp_path / "latest_model.pt")["config"]["loss"]["s"] == 64.0


def test_cpu_backbone_phase_trains_at_the_probes_layout_and_pass_and_a_resume_keeps_them(demo, tmp_path,
                                                                                          monkeypatch, capsys):
    """Pretrained Lite0 (backbone BatchNorm statistics frozen) with a Multi-Similarity term: the probe's
    channels_last backbone passes of 8 images make up the P x K step of 24, whose head BatchNorm and miner see all
    24, so the run learns what one NCHW pass learns, to float rounding; a resumed run keeps the choice its checkpoint
    recorded whatever the probe says when it resumes."""
    from lib.train import phases
    from lib.core.cpu_probe import ForwardChoice

    asked = []

    def pick(choice):
        monkeypatch.setattr(phases, "cpu_train_choice",
                            lambda m, shape, effective, split: asked.append((effective, split)) or choice)

    cfg = config(demo, backbone="tf_efficientnet_lite0", pretrained="lite0-imagenet", img_size=64, epochs=2,
                 batches_per_epoch=2, lr_backbone=1e-4, ms_weight=0.5)
    pick(ForwardChoice(False, 24, "the old setting"))
    reference = train_run(str(tmp_path / "ref"), cfg, progress=False)
    assert "backbone phase NCHW, one pass per step of 24 (the old setting)" in capsys.readouterr().out
    pick(ForwardChoice(True, 8, "test pick"))
    train_run(str(tmp_path / "cut"), cfg, progress=False, stop_after_epoch=1)
    assert "backbone phase channels_last, passes of 8 images per step of 24 (test pick)" in capsys.readouterr().out
    pick(ForwardChoice(False, 24, "another machine's pick"))
    resumed = train_run(str(tmp_path / "cut"), cfg, progress=False)
    assert asked == [(24, True)] * 2
    assert "passes of 8 images per step of 24 (as the run began" in capsys.readouterr().out
    resolved = load_checkpoint(tmp_path / "cut" / "latest_model.pt")["config"]["device"]["resolved"]
    assert (resolved["channels_last"], resolved["backbone_chunk"], resolved["accum_steps"]) == (True, 8, 1)
    cols = ["epoch", "train_loss", "val_recall@1", "val_mAP"]
    pd.testing.assert_frame_equal(reference[cols], resumed[cols], atol=1e-4, rtol=1e-3)
    a = load_checkpoint(tmp_path / "ref" / "latest_model.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "latest_model.pt")["model"]
    # AdamW moves a weight whose gradient is near zero by about lr a step whatever sign rounding gives that
    # gradient, so after 4 steps at lr 1e-4 two roundings of the same run may differ by up to 4e-4 (seen: 1.8e-4);
    # a wrong step (another batch, another loss) moves them by far more
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=4 * 1e-4, rtol=0, msg=key)


def test_a_cpu_run_begun_without_a_backbone_phase_chooses_when_a_resume_adds_one(demo, tmp_path, monkeypatch, capsys):
    """epochs=0 first (the untrained model, or the head phase alone), then resumed with backbone epochs: nothing has
    trained at a layout yet, so the resume takes the probe's choice instead of the unchosen NCHW one pass its
    checkpoint holds; a second resume then keeps what the first chose."""
    from lib.train import phases
    from lib.core.cpu_probe import ForwardChoice

    asked = []
    monkeypatch.setattr(phases, "cpu_train_choice", lambda m, shape, effective, split: asked.append(split)
                        or ForwardChoice(True, effective, "test pick"))

    def resolved():
        return load_checkpoint(tmp_path / "latest_model.pt")["config"]["device"]["resolved"]

    train_run(str(tmp_path), config(demo, epochs=0, head_epochs=1, batches_per_epoch=1), progress=False)
    assert asked == [] and (resolved()["channels_last"], resolved()["backbone_choice"]) == (False, "")
    capsys.readouterr()
    train_run(str(tmp_path), config(demo, epochs=1, head_epochs=1, batches_per_epoch=1), progress=False)
    assert asked == [False] and "backbone phase channels_last, one pass per step of" in capsys.readouterr().out
    assert (resolved()["channels_last"], resolved()["backbone_choice"]) == (True, "test pick")
    train_run(str(tmp_path), config(demo, epochs=2, head_epochs=1, batches_per_epoch=1), progress=False)
    assert asked == [False] and "(as the run began: its checkpoint's)" in capsys.readouterr().out
    assert (resolved()["channels_last"], resolved()["backbone_choice"]) == (True, "test pick")


def test_a_cpu_run_whose_backbone_batchnorm_trains_keeps_one_pass(demo, tmp_path, monkeypatch):
    from lib.train import phases
    from lib.core.cpu_probe import ForwardChoice

    asked = []
    monkeypatch.setattr(phases, "cpu_train_choice", lambda m, shape, effective, split: asked.append(split)
                        or ForwardChoice(True, effective, "test"))
    train_run(str(tmp_path), config(demo, epochs=1, batches_per_epoch=1), progress=False)  # random init: BN trains
    assert asked == [False]
    assert load_checkpoint(tmp_path / "latest_model.pt")["config"]["device"]["resolved"]["backbone_chunk"] == 0


def test_images_per_class_is_the_samplers_k():
    assert build_config(images_per_class=6).sampler.k == build_config(k=6).sampler.k == 6
    assert config_parameters({"images_per_class": 6, "k": 9})["images_per_class"] == 6
    assert "k" not in config_parameters({"images_per_class": 6, "k": 9})  # an old name goes through renamed_parameters
    with pytest.raises(ValueError, match="images_per_class and k name the same setting"):
        build_config(images_per_class=6, k=6)
