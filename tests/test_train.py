import pandas as pd
import pytest
import torch

from lib.core.errors import DataError
from lib.train.checkpoint import load_checkpoint, save_checkpoint
from lib.train.config import RunConfig, build_config, settings_diff
from lib.train.loop import TrainingDiverged
from lib.train.run import train_run

TINY = dict(backbone="resnet10t", embed_dim=32, img_size=32, s=30.0, margin=0.3, warmup_epochs=1, p=6, k=4,
            lr_backbone=1e-3, lr_head=3e-3, num_workers=0, device="cpu")


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
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 1


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
