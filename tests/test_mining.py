import numpy as np
import pandas as pd
import pytest
import torch

from lib.data.samplers import ContextPKSampler
from lib.train.checkpoint import load_checkpoint
from lib.train.config import build_config
from lib.train.mining import context_error, mining_weights
from lib.train.run import train_run


def test_weights_move_toward_failing_contexts():
    contexts = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 2)
    hits = np.array([1, 1, 1, 1, 0, 0, 0, 1, 1, 0], dtype=bool)
    errors = context_error(contexts, hits)
    assert errors.to_dict() == pytest.approx({"a": 0.0, "b": 0.75, "c": 0.5})
    w = mining_weights(errors, floor=0.25)
    assert w["b"] > w["c"] > w["a"] == pytest.approx(0.25)
    assert np.mean(list(w.values())) == pytest.approx(1.0)
    assert mining_weights(context_error(["a", "b"], [True, True])) == {"a": 1.0, "b": 1.0}


def test_context_margins_and_mining_run_and_resume(demo_with_context, tmp_path, monkeypatch):
    data, splits = demo_with_context
    import lib.train.epochs

    seen = []
    original = lib.train.epochs.context_margins

    def spy(*a, **k):
        seen.append(original(*a, **k))
        return seen[-1]

    cfg = build_config(data_dir=str(data), splits_dir=str(splits), backbone="resnet10t", embed_dim=32, img_size=32,
                       s=30.0, warmup_epochs=1, margin=0.3, context_margin=0.2, mining_warmup_epochs=1,
                       sampler="context_pk", p=6, k=2, batches_per_epoch=2, epochs=3, num_workers=0, device="cpu",
                       head_epochs=0, unfreeze="all", lr_decay=1.0)
    monkeypatch.setattr(lib.train.epochs, "context_margins", spy)
    drawn_with = {}  # epoch -> the context weights its batches are drawn by
    set_epoch = ContextPKSampler.set_epoch
    monkeypatch.setattr(ContextPKSampler, "set_epoch", lambda self, epoch: drawn_with.__setitem__(
        epoch, self.context_weights.copy()) or set_epoch(self, epoch))
    history = train_run(str(tmp_path / "whole"), cfg, progress=False)
    assert history["worst_contexts"].iloc[-1]
    ckpt = load_checkpoint(tmp_path / "whole" / "latest_model.pt")
    weights = ckpt["context_weights"]
    assert weights and np.mean(list(weights.values())) == pytest.approx(1.0)
    assert ckpt["config"]["train"]["context_margin"] == 0.2
    # Two fine-tune epochs x 2 batches; none in the m=0 warm-up. Every demo site holds several individuals,
    # so every sample gets the larger same-context margin.
    assert len(seen) == 4
    assert torch.cat(seen).unique().tolist() == pytest.approx([0.5])

    # killed after the first mined epoch: the resumed run samples by the weights it mined, and ends where the
    # uninterrupted one does (one machine, one code path: equal up to the loop's own resume tolerance)
    whole_margins, seen[:] = list(seen), []
    whole_draws, drawn_with = dict(drawn_with), {}
    assert sorted(whole_draws) == [1, 2, 3] and not np.allclose(whole_draws[3], 1.0), "epoch 3 draws by mined weights"
    train_run(str(tmp_path / "cut"), cfg, progress=False, stop_after_epoch=2)
    assert load_checkpoint(tmp_path / "cut" / "latest_model.pt")["context_weights"] != {}
    resumed = train_run(str(tmp_path / "cut"), cfg, progress=False)
    np.testing.assert_allclose(drawn_with[3], whole_draws[3], rtol=1e-6, err_msg="the resumed epoch 3 draws as before")
    cols = ["epoch", "train_loss", "val_recall@1", "val_mAP"]
    pd.testing.assert_frame_equal(resumed[cols], history[cols], atol=1e-5, rtol=1e-4)
    assert resumed["worst_contexts"].tolist() == history["worst_contexts"].tolist()
    again = load_checkpoint(tmp_path / "cut" / "latest_model.pt")["context_weights"]
    assert again.keys() == weights.keys()
    assert list(again.values()) == pytest.approx(list(weights.values()), rel=1e-6)
    assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(seen, whole_margins))
