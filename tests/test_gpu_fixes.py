"""The GPU paths' logic, on the CPU: SyncBatchNorm keeps timm's norm+activation layers; Faiss GPU placement (one
resources object per GPU and process, the index on the model's own GPU) through a stand-in faiss-gpu; and a
2-process resume where rank 1's machine has no copy of the run (no shared file system); bench/gpu_check.sh without a
GPU."""
import os
import subprocess
import sys
from collections import Counter
from datetime import timedelta

import faiss
import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import TINY, _free_port
from test_notebooks import ROOT
from timm.layers import BatchNormAct2d

from lib.retrieval import faiss_index
from lib.retrieval.ann_index import IndexSpec, build_search_index
from lib.retrieval.faiss_index import build_index, faiss_device_for, gpu_id, search, search_within
from lib.retrieval.ranking import evaluate_retrieval
from lib.train.config import build_config
from lib.train.distributed import sync_batchnorm
from lib.train.model import ModelConfig, create_model
from lib.train.run import train_run

SYNCED = {"BatchNormAct2d": "SyncBatchNormAct", "BatchNorm2d": "SyncBatchNorm", "BatchNorm1d": "SyncBatchNorm"}


def test_sync_batchnorm_keeps_the_model_and_every_activation_of_timm_norm_act_layers():
    model = create_model(ModelConfig(backbone="test_efficientnet", pretrained="", embed_dim=16)).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    norm_acts = [name for name, m in model.named_modules() if isinstance(m, BatchNormAct2d)]
    assert len(norm_acts) > 5
    synced = sync_batchnorm(model).eval()
    # every BatchNorm became its synchronised twin at its own place, with its act and drop children; nothing else moved
    assert {name: type(m).__name__ for name, m in synced.named_modules()} == {n: SYNCED.get(k, k) for n, k in kinds.items()}
    calls = Counter()
    modules = dict(synced.named_modules())
    for name in norm_acts:
        modules[f"{name}.act"].register_forward_hook(lambda m, i, o, name=name: calls.update([name]))
    with torch.no_grad():
        after = synced(x)
    assert calls == Counter(norm_acts), "a norm+act layer's activation was not called"
    # eval mode: both normalise by the same running statistics through the same F.batch_norm call, then act
    assert torch.equal(after, before)


@pytest.fixture
def fake_faiss_gpus(monkeypatch):
    """faiss as faiss-gpu on a 2-GPU machine would act, recording where each index goes; the 'GPU' indexes stay CPU
    ones so they still search. Returns (resources made, placements as (resources, gpus))."""
    made, placed = [], []

    class Resources:
        def __init__(self):
            made.append(self)

    def to_gpu(resources, gpu, index):
        placed.append(((resources,), (gpu,)))
        return index

    def to_gpus(resources, index, options, gpus):
        placed.append((tuple(resources), tuple(gpus)))
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", type("Options", (), {}), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", to_gpus, raising=False)
    monkeypatch.setattr(faiss_index, "_GPU_RESOURCES", {})
    return made, placed


def unit_vectors(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_one_gpu_resources_object_per_gpu_serves_every_index_of_the_process(fake_faiss_gpus):
    made, placed = fake_faiss_gpus
    g, labels = unit_vectors(300), np.arange(300) % 7
    for _ in range(2):  # two validations
        evaluate_retrieval(g, labels, g[:40], labels[:40], device="cuda:1")
        search(build_index(g, "cuda:1"), g[:40], 1)
    search_within(g, labels % 3, g[:40], labels[:40] % 3, k=5, device="cuda:1")  # one index per context
    build_search_index(unit_vectors(3000), IndexSpec(index="ivf"), "cuda:1")
    assert len(placed) == 2 * 2 + 3 + 1
    assert len(made) == 1 and all(res == (made[0],) and gpus == (1,) for res, gpus in placed)
    build_search_index(unit_vectors(3000), IndexSpec(index="ivf"), "auto")  # sharded over both GPUs
    build_search_index(unit_vectors(3000), IndexSpec(index="ivf"), "auto")
    assert len(made) == 2 and placed[-1] == placed[-2] == ((made[1], made[0]), (0, 1))


@pytest.mark.parametrize("torch_device, gpu", [("cpu", None), ("cuda:1", 1), ("cuda:0", 0), ("cuda", 0)])
def test_the_index_goes_to_the_models_own_device(fake_faiss_gpus, torch_device, gpu):
    """settings.device 'cuda:N' is also each DDP rank's (lib.train.distributed.join_world); 'cpu' keeps Faiss off
    the GPUs that faiss-gpu sees."""
    _, placed = fake_faiss_gpus
    build_index(unit_vectors(50), faiss_device_for(torch_device))
    assert [gpus for _, gpus in placed] == ([] if gpu is None else [(gpu,)])


def test_faiss_cpu_beside_a_cuda_model_searches_on_the_cpu_without_a_warning(recwarn):
    if faiss.get_num_gpus():
        pytest.skip("this faiss build sees a GPU")
    assert faiss_device_for("cuda:1") == "cpu" and not recwarn.list


def test_a_gpu_faiss_does_not_see_is_refused_by_name(fake_faiss_gpus):
    with pytest.raises(ValueError, match=r"'cuda:2' but faiss sees 2 GPU\(s\): cuda:0 to cuda:1"):
        gpu_id("cuda:2")


def _resume_rank(rank: int, world: int, port: int, run_dirs: list[str], config: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import lib.train.distributed as distributed

    # ranks that disagree meet in mismatched collectives: fail within a minute instead of waiting out 3 hours
    distributed.COLLECTIVE_TIMEOUT = timedelta(seconds=60)
    history = train_run(run_dirs[rank], config, progress=False)
    history.to_csv(f"{out}/history{rank}.csv", index=False)
    torch.distributed.destroy_process_group()


def test_ranks_without_a_shared_disk_resume_from_rank_0s_checkpoint(demo, tmp_path):
    data, splits = demo
    config = build_config(**{**TINY, "head_epochs": 0, "epochs": 2, "ema_decay": 0.0}, data_dir=str(data),
                          splits_dir=str(splits)).as_dict()
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # rank 1's machine holds no copy of the run
    stopped = train_run(str(node0), config, progress=False, stop_after_epoch=1)
    mp.spawn(_resume_rank, args=(2, _free_port(), [str(node0), str(node1)], config, str(tmp_path)), nprocs=2,
             join=True)
    ranks = [pd.read_csv(tmp_path / f"history{r}.csv") for r in (0, 1)]
    assert list(ranks[0]["epoch"]) == list(ranks[1]["epoch"]) == [0, 1, 2]
    agreed = ["epoch", "val_recall@1", "val_mAP", "train_loss", "best_epoch"]
    pd.testing.assert_frame_equal(ranks[1][agreed], ranks[0][agreed])
    # epochs 0 and 1 come from the checkpoint, not trained again
    pd.testing.assert_frame_equal(ranks[0][agreed].iloc[:2], stopped[agreed].iloc[:2], check_dtype=False)
    assert not (node1 / "latest_model.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: bench/gpu_check.sh measures instead")
def test_the_gpu_check_runs_to_its_end_without_a_gpu_and_skips_every_gpu_row():
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = dict(line[4:].split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("ROW "))
    gpu_rows = {name: text for name, text in rows.items() if name not in ("python", "packages", "wheels", "gpu_check")}
    assert set(gpu_rows) == {"cuda tests", "train Lite0 320 px", "train V2-L 480 px", "embedding Lite0 320 px",
                             "faiss 100k x 512", "peak GPU memory"}
    assert all(text.startswith("skipped: no CUDA") for text in gpu_rows.values()), gpu_rows
    assert rows["gpu_check"].startswith("done in")


@pytest.mark.parametrize("torch_device, gpu", [("cpu", None), ("cuda:1", 1)])
def test_training_validation_searches_on_the_models_own_device(fake_faiss_gpus, torch_device, gpu):
    """Validation during training places its Faiss indexes where its settings put the model: a CPU run leaves the
    GPUs faiss-gpu sees alone, a DDP rank on cuda:1 uses cuda:1 (not faiss's default GPU 0)."""
    from lib.retrieval.retrieval_split import retrieval_split
    from lib.train.validation import retrieval_metrics

    _, placed = fake_faiss_gpus
    g, rows = unit_vectors(60), pd.DataFrame({"label": np.arange(60) % 5})
    metrics, hits = retrieval_metrics(g, g, retrieval_split(rows, rows, "loo"), "val_", faiss_device_for(torch_device))
    assert hits.shape == (60,) and 0 <= metrics["val_recall@1"] <= 1
    assert [gpus for _, gpus in placed] == ([] if gpu is None else [(gpu,)] * len(placed)) and (gpu is None or placed)
