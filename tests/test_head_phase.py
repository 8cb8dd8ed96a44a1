"""The head phase on cached frozen features, partial unfreezing, and epoch 0 as a candidate for the best model."""
import pandas as pd
import pytest
import torch

import lib.train.epochs
import lib.train.selection
from lib.core.device import auto_settings
from lib.data.dataset import IndexDataset
from lib.data.splits import load_split_index
from lib.data.transforms import build_transforms
from lib.evaluate.run_eval import evaluate_run
from lib.retrieval.exclusion import leave_one_out
from lib.retrieval.ranking import evaluate_retrieval
from lib.train.checkpoint import load_checkpoint, seed_everything
from lib.train.config import build_config
from lib.train.feature_cache import cache_features
from lib.train.losses import LossConfig, build_loss
from lib.train.model import ModelConfig, create_model
from lib.train.run import run_summary, train_run
from lib.train.trained_run import embed_rows, load_trained, rows_in_split, split_rows

TINY = dict(backbone="resnet10t", pretrained="", embed_dim=32, img_size=32, s=30.0, margin=0.3, warmup_epochs=0,
            p=6, k=4, lr_backbone=1e-3, lr_head=3e-3, num_workers=0, device="cpu", batches_per_epoch=3, head_epochs=0,
            unfreeze="all", lr_decay=1.0)


def config(demo, **overrides):
    data, splits = demo
    return build_config(data_dir=str(data), splits_dir=str(splits), **{**TINY, **overrides})


def test_cached_features_give_the_loss_of_the_full_forward_pass(demo, tmp_path):
    data, splits = demo
    index, info = load_split_index(splits)
    train = index[index["split"] == "train"].head(24)
    seed_everything(0)
    model = create_model(ModelConfig(backbone="resnet10t", pretrained="", embed_dim=16))
    train_tf, eval_tf = build_transforms(32, model.data_config["mean"], model.data_config["std"])
    gallery = IndexDataset(train, data, eval_tf, info.class_to_idx)
    settings = auto_settings(device="cpu", num_workers=0)
    model.eval()
    features = cache_features(model, IndexDataset(train, data, train_tf, info.class_to_idx), gallery, gallery, 2,
                              settings, tmp_path)
    assert features.train.shape[:2] == (2, 24) and not torch.equal(features.train[0], features.train[1])
    criterion = build_loss(LossConfig(s=30.0), 16, len(info.class_to_idx))
    model.set_trainable_stages(0)
    model.train()
    idx = torch.arange(0, 24, 2)
    x = torch.stack([gallery[int(i)][0] for i in idx])
    y = gallery.targets[idx]
    full, _ = criterion(model(x), y)
    cached, _ = criterion(model.embed_features(features.train[0, idx]), y)
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)
    again = cache_features(model, IndexDataset(train, data, train_tf, info.class_to_idx), gallery, gallery, 2,
                           settings, tmp_path)
    assert torch.equal(again.train, features.train), "a second pass reads the same views from the cache"


def test_unfreezing_the_last_stage_leaves_earlier_stages_bit_identical(demo, tmp_path):
    cfg = config(demo, head_epochs=1, epochs=2, unfreeze="1", lr_decay=0.5)
    history = train_run(str(tmp_path), cfg, progress=False)
    assert list(history["phase"]) == ["untrained", "head", "finetune", "finetune"]
    # best epoch, recomputed: the highest (Recall@1, mAP) pair, the earliest of equal pairs
    scores = list(zip(history["val_recall@1"], history["val_mAP"]))
    assert history["best_epoch"].iloc[-1] == history["epoch"].iloc[scores.index(max(scores))]
    seed_everything(cfg.train.seed)  # as train_run builds its model
    start = create_model(cfg.model).backbone.state_dict()
    trained = {k[len("backbone."):]: v for k, v in load_checkpoint(tmp_path / "latest_model.pt")["model"].items()
               if k.startswith("backbone.")}
    stages = create_model(cfg.model).stages
    # each parameter and buffer (BatchNorm statistics) by the stage of its module
    stage_of = {name.rsplit(".", 1)[0]: i for i, stage in enumerate(stages) for name, _ in stage}
    last = len(stages) - 1
    moved = {key: not torch.equal(value, trained[key]) for key, value in start.items()}
    for key, changed in moved.items():
        if stage_of[key.rsplit(".", 1)[0]] < last:
            assert not changed, f"{key} is in a frozen stage but changed"
    assert any(changed for key, changed in moved.items() if stage_of[key.rsplit(".", 1)[0]] == last)


# auto: the tiny test backbone starts from random weights, whose statistics are worth nothing, so they train
@pytest.mark.parametrize("backbone_bn,stats_move", [("frozen", False), ("train", True), ("auto", True)])
def test_frozen_backbone_bn_keeps_the_pretrained_statistics_while_the_weights_train(demo, tmp_path, backbone_bn,
                                                                                     stats_move):
    cfg = config(demo, epochs=1, unfreeze="all", backbone_bn=backbone_bn)
    train_run(str(tmp_path), cfg, progress=False)
    seed_everything(cfg.train.seed)  # as train_run builds its model
    start = create_model(cfg.model).state_dict()
    trained = load_checkpoint(tmp_path / "latest_model.pt")["model"]
    stats = [k for k in start if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))]
    weights = [k for k in start if k.startswith("backbone.") and k.endswith("conv1.weight")]
    assert stats and weights
    assert all(not torch.equal(start[k], trained[k]) for k in weights)
    moved = [k for k in stats if not torch.equal(start[k], trained[k])]
    assert bool(moved) == stats_move, moved[:3]


def test_auto_backbone_bn_knows_pretrained_weights_from_a_random_init():
    assert create_model(ModelConfig(backbone="resnet10t", pretrained="")).random_init
    assert create_model(ModelConfig(backbone="resnet10t", pretrained="auto")).random_init  # nothing packaged for it
    assert not create_model(ModelConfig(backbone="tf_efficientnet_lite0", pretrained="lite0-imagenet")).random_init


def test_a_tie_in_recall_at_1_goes_to_the_higher_map():
    history = [{"epoch": 0, "val_recall@1": 0.5, "val_mAP": 0.30, "best_epoch": 0}]
    row = lambda r1, m: {"val_recall@1": r1, "val_mAP": m, "ema_val_recall@1": r1, "ema_val_mAP": m}  # noqa: E731
    assert lib.train.selection.improves(row(0.5, 0.31), history, "val_recall@1", 0.5)
    # a full tie keeps the earlier
    assert not lib.train.selection.improves(row(0.5, 0.30), history, "val_recall@1", 0.5)
    assert not lib.train.selection.improves(row(0.49, 0.90), history, "val_recall@1", 0.5)
    assert lib.train.selection.improves(row(0.51, 0.01), history, "val_recall@1", 0.5)
    # with EMA the epoch-0 row holds the model's scores only (the EMA starts as a copy)
    assert lib.train.selection.improves(row(0.5, 0.31), history, "ema_val_recall@1", 0.5)
    assert not lib.train.selection.improves(row(0.5, 0.29), history, "ema_val_recall@1", 0.5)


def test_a_run_whose_training_only_hurts_keeps_epoch_0(demo, tmp_path, monkeypatch):
    def scramble(state, *args, **kwargs):
        with torch.no_grad():
            state.model.head.fc.weight.normal_()
        return 1.0, 0
    monkeypatch.setattr(lib.train.epochs, "epoch_steps", scramble)
    history = train_run(str(tmp_path), config(demo, head_epochs=3, unfreeze="0"), progress=False)
    assert history["val_recall@1"].iloc[1:].max() < history["val_recall@1"].iloc[0]
    assert list(history["best_epoch"]) == [0, 0, 0, 0]
    best = load_checkpoint(tmp_path / "best_model.pt")
    assert best["epoch"] == 0 and best["best_metric"] == history["val_recall@1"].iloc[0]
    assert "best_model.pt is epoch 0" in run_summary(history)


def test_the_pca_head_starts_near_the_frozen_features_and_the_head_phase_resumes_exactly(demo, tmp_path):
    cfg = config(demo, head_epochs=4, unfreeze="0", cached_views=2, ema_decay=0.9)
    whole = train_run(str(tmp_path / "whole"), cfg, progress=False)
    start = whole.iloc[0]
    # a random head blurs the frozen features; the principal directions keep their ranking
    assert start["val_recall@1"] >= start["frozen_val_recall@1"] - 0.05
    assert list(whole["phase"]) == ["untrained"] + ["head"] * 4
    train_run(str(tmp_path / "cut"), cfg, progress=False, stop_after_epoch=2)
    resumed = train_run(str(tmp_path / "cut"), cfg, progress=False)
    cols = ["epoch", "train_loss", "val_recall@1", "val_mAP", "ema_val_recall@1", "best_epoch"]
    pd.testing.assert_frame_equal(whole[cols], resumed[cols], atol=1e-6, rtol=1e-5)
    a = load_checkpoint(tmp_path / "whole" / "latest_model.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "latest_model.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_leave_one_out_validation_scores_the_val_photos_under_the_rule_evaluation_scores_by(demo, tmp_path):
    history = train_run(str(tmp_path), config(demo, head_epochs=1, epochs=1, unfreeze="1", val_protocol="loo"),
                        progress=False)
    last = history.iloc[-1]
    # the demo's encounters are finer than its individuals: each val photo's own encounter is junk, as in evaluation
    assert (last["val_protocol"], last["val_loo_rule"]) == ("loo", "group")
    run = load_trained(tmp_path, "latest")
    val = rows_in_split(split_rows(run), "val")
    emb, _ = embed_rows(run, val, auto_settings(device="cpu", num_workers=0))
    labels = val["label"].to_numpy()
    m = evaluate_retrieval(emb, labels, emb, labels, leave_one_out(len(val), val["group"].to_numpy()), ks=(1, 5))
    assert (last["val_recall@1"], last["val_mAP"]) == pytest.approx((m["recall@1"], m["mAP"]), abs=1e-6)
    ev = evaluate_run(tmp_path, checkpoint="latest", protocol="loo", device="cpu")
    assert ev.config["loo_rule"] == "group"
    assert (last["val_recall@1"], last["val_mAP"]) == pytest.approx((ev.metrics["recall@1"], ev.metrics["mAP"]),
                                                                    abs=1e-6)
