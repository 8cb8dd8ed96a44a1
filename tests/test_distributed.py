"""DDP training on the CPU (gloo, 2 processes): the rank-sharded P×K sampler, gradients equal to one process on the
same global batch, kill/resume under torchrun, notebook 02's nproc=2 path, and a dying rank ending the run."""
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import torch.multiprocessing as mp
from test_notebooks import ROOT, run

from lib.core.errors import DataError
from lib.data.samplers import ContextPKSampler, PKSampler
from lib.train.checkpoint import load_checkpoint
from lib.train.config import build_config
from lib.train.launch import torchrun_command, write_config
from lib.train.run import train_run

LABELS = np.repeat(np.arange(10), [3, 5, 4, 2, 6, 4, 3, 5, 4, 1])
CONTEXTS = np.array([f"site{c % 3}" for c in LABELS])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("contexts", [False, True])
def test_ranks_share_no_photo_within_a_step_and_together_draw_the_one_process_plan(world, contexts):
    def sampler(p, rank=0, world=1):
        if contexts:
            return ContextPKSampler(LABELS, CONTEXTS, p, 2, seed=5, rank=rank, world=world)
        return PKSampler(LABELS, p, 2, seed=5, rank=rank, world=world)

    one = sampler(p=2 * world)
    ranks = [sampler(2, r, world) for r in range(world)]
    for epoch in (1, 2):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        steps = list(zip(one, *ranks))
        assert len(steps) == len(one) == len(ranks[0])
        seen = set()
        for whole, *shares in steps:
            assert sum(shares, []) == whole  # together, in rank order, exactly one process's batch
            classes = [set(LABELS[s]) for s in shares]
            assert all(len(c) == 2 for c in classes)
            assert all(not (a & b) for i, a in enumerate(classes) for b in classes[i + 1:]), "ranks share a class"
            seen |= set(whole)
        assert set(LABELS[list(seen)]) == set(LABELS), "the epoch visits every class"


def test_more_processes_than_classes_is_refused():
    with pytest.raises(DataError, match="3 processes need at least 3 classes"):
        PKSampler([0, 0, 1, 1], 1, 2, rank=0, world=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(rank: int, world: int, port: int, out: str) -> None:
    """One step of a tiny model + Sub-center ArcFace with per-photo margins on this rank's share of the first P×K
    step; writes the (averaged) gradients and the weights after one step of SGD and, from the same start, one step
    of the project's AdamW."""
    if world > 1:  # as torchrun would set them; one process (this test's own) runs without
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    from lib.train.config import LossConfig
    from lib.train.distributed import join_world, leave_world
    from lib.train.optim import build_optimizer
    from lib.train.step import StepRunner, TrainStep
    from lib.train.losses import build_loss
    from lib.train.model import ModelConfig, create_model

    world_, device = join_world("cpu")
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="resnet10t", pretrained="", embed_dim=8))
    criterion = build_loss(LossConfig(k_subcenters=2), 8, 10)
    images = torch.randn(len(LABELS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    runner = StepRunner(TrainStep(model, criterion), world_, device)
    runner.prepare(pooled=False)
    # BatchNorm in eval mode: batch statistics are the one thing per-rank batches change (SyncBatchNorm, which
    # would share them, has no CPU kernel), and they are not what this test is about
    model.eval()
    sampler = PKSampler(LABELS, 4 // world, 2, seed=3, rank=rank, world=world)
    batch, mine = next(sampler.steps())
    idx = batch[mine]
    y = torch.as_tensor(LABELS[idx])
    loss, _ = runner(images[idx], y, margins=0.2 + 0.1 * (y % 2))
    loss.backward()
    params = dict(model.named_parameters()) | {f"criterion.{k}": v for k, v in criterion.named_parameters()}
    grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    start = {k: p.detach().clone() for k, p in params.items()}
    weights, cfg = {}, build_config().train
    for name, optimizer in [("sgd", lambda: torch.optim.SGD(params.values(), lr=0.1)),
                            ("adamw", lambda: build_optimizer(model, criterion, device, lr_backbone=1e-3, lr_head=1e-2,
                                                              lr_decay=cfg.lr_decay, weight_decay=cfg.weight_decay))]:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])
        optimizer().step()
        weights[name] = {k: p.detach().clone() for k, p in params.items()}
    torch.save({"grads": grads, "weights": weights}, f"{out}/{rank}.pt")
    leave_world(world_)


def test_two_processes_give_the_gradients_and_weights_of_one_process_on_the_same_global_batch(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    _one_step(0, 1, 0, str(tmp_path / "one"))
    mp.spawn(_one_step, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    one = torch.load(tmp_path / "one" / "0.pt")
    two = [torch.load(tmp_path / "two" / f"{r}.pt") for r in (0, 1)]
    assert one["grads"].keys() == two[0]["grads"].keys() and "criterion.head.weight" in one["grads"]
    # DDP's all-reduce sums the ranks' float32 gradients in another order than one process's backward: equal to
    # float32 rounding of the sum (rtol 1e-4 over a few dozen terms), and identical on the two ranks (one buffer)
    for key, g in one["grads"].items():
        assert torch.equal(two[0]["grads"][key], two[1]["grads"][key]), f"ranks disagree on {key}"
        torch.testing.assert_close(two[0]["grads"][key], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {key}")
    for optimizer in ("sgd", "adamw"):
        for key, w in one["weights"][optimizer].items():
            assert torch.equal(two[0]["weights"][optimizer][key], two[1]["weights"][optimizer][key]), \
                f"ranks' weights differ after {optimizer}: {key}"
    # SGD moves each weight by lr x gradient, so the weights after its step inherit the gradients' tolerance
    for key, w in one["weights"]["sgd"].items():
        torch.testing.assert_close(two[0]["weights"]["sgd"][key], w, rtol=1e-4, atol=1e-6, msg=f"SGD: {key}")
    # AdamW's first step is lr x g/|g|: a gradient within float noise of zero (GeM's p, say) steps a whole lr of
    # either sign, so compare it only where the gradient is 100x the gradients' tolerance, or exactly zero on both
    # (a weight-decay step alone; resnet10t's zero-initialised last BatchNorms leave whole convolutions at zero)
    compared = {}
    for key, g in one["grads"].items():
        kept = (g.abs() > 100 * (1e-6 + 1e-4 * g.abs())) | ((g == 0) & (two[0]["grads"][key] == 0))
        torch.testing.assert_close(two[0]["weights"]["adamw"][key][kept], one["weights"]["adamw"][key][kept],
                                   rtol=1e-4, atol=1e-6, msg=f"AdamW: {key}")
        compared[key] = float(kept.float().mean())
    assert min(compared["criterion.head.weight"], compared["head.fc.weight"]) > 0.2, f"AdamW compared: {compared}"


def _world_calls(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from lib.train.distributed import join_world, leave_world

    w, _ = join_world("cpu")
    decided = w.from_main({"weights": {"site1": 2.0 + rank}})
    mean = float(w.mean(torch.tensor(float(rank))))
    marker = Path(out) / "made_by"
    # rank 0 writes first; the others find its file, whatever their own make() would write
    made = w.main_first(lambda: marker.read_text() if marker.exists() else marker.write_text(str(rank)) and str(rank))
    (Path(out) / f"{rank}.json").write_text(json.dumps({"decided": decided, "mean": mean, "made": made}))
    leave_world(w)


def test_what_rank_0_decides_reaches_every_rank(tmp_path):
    mp.spawn(_world_calls, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == {"decided": {"weights": {"site1": 2.0}}, "mean": 0.5, "made": "0"}, f"rank {rank}: {got}"


TINY = dict(backbone="resnet10t", pretrained="", embed_dim=16, img_size=32, head_epochs=2, cached_views=2,
            epochs=2, unfreeze="all", batches_per_epoch=2, p=3, k=2, num_workers=0, device="cpu", ema_decay=0.9,
            lr_backbone=1e-3, lr_head=3e-3)


def _torchrun(config_file, *extra) -> subprocess.CompletedProcess:
    cmd = torchrun_command(config_file, nproc=2) + list(extra)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_notebook_nproc_2_trains_and_a_killed_two_process_run_resumes_to_where_it_ends(demo, tmp_path):
    data, splits = demo
    whole = tmp_path / "whole"
    nb = run("02_train", tmp_path, **TINY, nproc=2, data_dir=str(data), splits_dir=str(splits), run_dir=str(whole),
             figures_dir=str(tmp_path / "figures"), mlflow_uri="")
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "2 processes (DDP), 3 x 2 images each per step" in text, "torchrun's output streams into the notebook"
    history = pd.read_csv(whole / "metrics.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3, 4]
    assert load_checkpoint(whole / "latest_model.pt")["config"]["device"]["resolved"]["world_size"] == 2

    parts = tmp_path / "parts"  # the notebook's run, killed twice
    parts.mkdir()
    config_file = parts / "run_config.json"
    config_file.write_text((whole / "run_config.json").read_text())
    for stop in ("1", "3"):  # in the head phase, then in the backbone phase
        assert _torchrun(config_file, "--stop-after-epoch", stop).returncode == 0
        assert pd.read_csv(parts / "metrics.csv")["epoch"].max() == int(stop)
    # the same run resumed by one process instead of two: it goes on from where the two left off
    other = tmp_path / "other"
    shutil.copytree(parts, other)
    alone = train_run(str(other), json.loads(config_file.read_text()), progress=False)
    assert list(alone["epoch"]) == [0, 1, 2, 3, 4]
    before = ["val_recall@1", "val_mAP"]
    pd.testing.assert_frame_equal(alone.iloc[:4][before], history.iloc[:4][before])
    _resume_and_compare(config_file, whole)


def _resume_and_compare(config_file, whole) -> None:
    """Resume the stopped 2-process run of config_file's folder to its end: the weights and per-epoch scores of the
    uninterrupted run in `whole`."""
    resumed = _torchrun(config_file)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    parts = config_file.parent
    a, b = load_checkpoint(whole / "latest_model.pt"), load_checkpoint(parts / "latest_model.pt")
    for part in ("model", "criterion", "ema"):
        for key, w in (a[part] or {}).items():
            assert torch.equal(w, b[part][key]), f"{part}.{key} differs from the uninterrupted run"
    assert a["context_weights"] == b["context_weights"]
    history = pd.read_csv(whole / "metrics.csv")
    scores = [c for c in history.columns if c.startswith(("val_", "ema_val_", "train_loss", "best_", "worst_"))]
    pd.testing.assert_frame_equal(history[scores], pd.read_csv(parts / "metrics.csv")[scores])


def test_context_margins_and_hard_context_mining_under_two_processes_resume_exactly(demo_with_context, tmp_path):
    """Context P×K shares, context margins and rank 0's mined context weights under 2 processes: the run mines
    weights every epoch, and stopped and resumed it ends with the uninterrupted run's weights and scores. (That rank
    1 receives what rank 0 decides is World.from_main's test below: the demo's mined weights are too near uniform,
    0.91-1.02, for a withheld set to change rank 1's draws.)"""
    data, splits = demo_with_context
    config = build_config(**{**TINY, "head_epochs": 0, "epochs": 4, "ema_decay": 0.0}, data_dir=str(data),
                          splits_dir=str(splits), sampler="context_pk", context_margin=0.2, mining_warmup_epochs=1,
                          warmup_epochs=1)
    whole = tmp_path / "whole"
    assert _torchrun(write_config(whole, config)).returncode == 0
    history = pd.read_csv(whole / "metrics.csv")
    assert history["worst_contexts"].iloc[1:].notna().all()
    assert load_checkpoint(whole / "latest_model.pt")["context_weights"]
    config_file = write_config(tmp_path / "parts", config)
    assert _torchrun(config_file, "--stop-after-epoch", "2").returncode == 0
    _resume_and_compare(config_file, whole)


def test_a_rank_that_dies_ends_the_run_instead_of_hanging(demo, tmp_path):
    data, splits = demo
    config_file = write_config(tmp_path, build_config(**{**TINY, "epochs": 200}, data_dir=str(data),
                                                      splits_dir=str(splits)))
    proc = subprocess.Popen(torchrun_command(config_file, nproc=2), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "latest_model.pt").exists() and time.time() < deadline:
        time.sleep(0.5)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert ranks, "rank 1 not found among torchrun's processes"
    ranks[0].kill()
    t0 = time.time()
    # ending, not hanging: a hang waits out the 3-hour collective timeout; 180 s leaves room for loaded cores
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 180
    assert "FAILED" in out and "rank" in out, out[-2000:]
