"""The CUDA paths on a real GPU (marker `cuda`; bench/gpu_check.sh runs them): AMP steps against fp32, the device
table's choices on the card present, faiss-gpu against faiss-cpu, one NCCL DDP step, channels_last with
cudnn.benchmark, TF32 in the ArcFace cosine. Each skips with a one-line reason where CUDA or faiss-gpu is absent.
Their tolerances were set before they first ran on a GPU (none was lent when they were written): docs/gpus.md,
"What has run on a GPU", says what has run where."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import assert_neighbours_match, score_tolerance

from lib.core.device import apply_settings, auto_settings, cores_per_rank, native_bf16

try:
    import faiss

    FAISS_GPUS = faiss.get_num_gpus()
except ImportError:  # a device machine without the project's environment
    FAISS_GPUS = 0

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA")]
ampere = CUDA and native_bf16(torch.cuda.get_device_capability(0))


def needs(ok: bool, reason: str):
    """Skip unless `ok`; without CUDA the reason is that one, whatever else is missing too."""
    return pytest.mark.skipif(not (CUDA and ok), reason=reason if CUDA else "no CUDA")


needs_faiss_gpu = needs(FAISS_GPUS > 0, "faiss has no GPU (faiss-cpu build, or no faiss)")
needs_ampere = needs(ampere, "bf16 and TF32 need compute capability >= 8.0")


@pytest.fixture(autouse=True)
def process_switches():
    """apply_settings changes process-wide switches: each test gets them back as they were."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def tiny_step(precision: str, seed: int = 0):
    """A test_efficientnet + ArcFace model (the same init for every precision) and its one training step's parts."""
    from lib.train.step import TrainStep
    from lib.train.losses import LossConfig, build_loss
    from lib.train.model import ModelConfig, create_model

    torch.manual_seed(seed)
    model = create_model(ModelConfig(backbone="test_efficientnet", pretrained="", embed_dim=32)).cuda()
    criterion = build_loss(LossConfig(s=30.0), 32, 8).cuda()
    settings = dataclasses.replace(auto_settings("cuda:0", precision=precision), tf32=False)
    apply_settings(settings)  # fp32 without TF32: the reference the half precisions are held to
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 96, 96, generator=g).cuda(), torch.arange(8).repeat(2).cuda()
    return TrainStep(model, criterion), settings, x, y


def amp_gradients(precision: str):
    """(loss, flat gradient, optimizer steps GradScaler skipped) of the first step whose gradients are finite."""
    step, settings, x, y = tiny_step(precision)
    optimizer = torch.optim.AdamW(step.parameters(), lr=1e-3)
    scaler = settings.grad_scaler()
    for skipped in range(20):  # fp16's scaler starts at 2**16 and halves it after each step that overflowed
        optimizer.zero_grad(set_to_none=True)
        loss, _ = step(x, y, autocast=settings.autocast)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = torch.cat([p.grad.flatten() for p in step.parameters() if p.grad is not None])
        if torch.isfinite(grads).all():
            return loss.item(), grads.float(), skipped
        scaler.step(optimizer)  # skipped by the scaler: the weights stay the first step's
        scaler.update()
    raise AssertionError(f"{precision}: 20 steps in a row overflowed")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_an_amp_step_is_finite_and_close_to_fp32(precision):
    if precision == "bf16" and not ampere:
        pytest.skip("bf16 needs compute capability >= 8.0")
    ref_loss, ref_grads, _ = amp_gradients("fp32")
    loss, grads, skipped = amp_gradients(precision)
    assert np.isfinite(loss) and skipped < 20
    # fp16 keeps ~3 significant digits per op, bf16 ~2. The same test under CPU autocast gave a loss off by 1e-3
    # (bf16) and 2e-4 (fp16) and gradient cosines of 0.998 and 0.99998; the bounds leave ~20x for other kernels
    bound, direction = (0.02, 0.98) if precision == "bf16" else (0.01, 0.99)
    assert abs(loss - ref_loss) <= bound * abs(ref_loss), (loss, ref_loss)
    cosine = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item()
    assert cosine > direction, f"{precision} gradient direction vs fp32: {cosine:.4f}"


def test_the_device_table_on_this_card():
    props = torch.cuda.get_device_properties(0)
    s = auto_settings("cuda:0")
    assert s.precision == ("bf16" if native_bf16((props.major, props.minor)) else "fp16")
    assert s.tf32 == native_bf16((props.major, props.minor))
    assert s.grad_scaler().is_enabled() == (s.precision == "fp16")
    assert 0 < s.num_workers <= cores_per_rank() and s.accum_steps >= 1
    assert s.pin_memory and s.channels_last and s.cudnn_benchmark and s.gpu.startswith(props.name)
    a = torch.randn(64, 64, device="cuda:0")
    with s.autocast():
        assert (a @ a).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[s.precision]
    apply_settings(s)
    assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == s.tf32
    assert torch.backends.cudnn.benchmark


@needs_faiss_gpu
def test_faiss_gpu_flat_and_ivf_find_what_faiss_cpu_finds():
    from lib.retrieval import faiss_index
    from lib.retrieval.ann_index import IndexSpec, build_search_index, searchable
    from lib.retrieval.faiss_index import build_index, search, unit_rows

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, 128))
    gallery = (centres[rng.integers(0, 200, 20_000)] + 0.3 * rng.normal(size=(20_000, 128))).astype(np.float32)
    queries = gallery[rng.choice(20_000, 500, replace=False)] + 0.05 * rng.normal(size=(500, 128)).astype(np.float32)
    g, q = unit_rows(gallery, "g").astype(np.float64), unit_rows(queries, "q").astype(np.float64)
    reference = 2 - 2 * q @ g.T  # squared L2 of the unit vectors, in float64
    # d² = 2 - 2 cos: twice the cosine's float32 rounding (faiss-gpu keeps cuBLAS at full fp32, no TF32)
    tol = 2 * score_tolerance(128)

    flat = build_index(gallery, "cuda:0")
    assert type(flat).__name__.startswith("Gpu")
    (d_cpu, i_cpu), (d_gpu, i_gpu) = search(build_index(gallery, "cpu"), queries, 10), search(flat, queries, 10)
    assert_neighbours_match(i_gpu, i_cpu, reference, tol)
    np.testing.assert_allclose(d_gpu, d_cpu, rtol=0, atol=tol)

    spec = IndexSpec(index="ivf", nprobe=8)
    ivf_cpu, info = build_search_index(gallery, spec, "cpu")
    ivf_gpu, placed = searchable(faiss.clone_index(ivf_cpu), spec, "cuda:0")  # the same trained lists, on the GPU
    assert info["placement"] == "cpu" and placed["placement"] == "cuda:0"
    (d_cpu, i_cpu), (d_gpu, i_gpu) = search(ivf_cpu, queries, 10), search(ivf_gpu, queries, 10)
    # the same lists, but a query near the boundary of its 8th-nearest list may visit another one there
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_cpu, i_gpu)])
    assert same >= 0.99, f"IVF: {same:.4f} of the neighbours agree"
    found = i_cpu == i_gpu
    np.testing.assert_allclose(d_gpu[found], d_cpu[found], rtol=0, atol=tol)
    assert list(faiss_index._GPU_RESOURCES) == [0], "every index on GPU 0 shares one resources object"


def test_one_nccl_process_ddp_step_gives_the_plain_steps_gradients(tmp_path):
    from lib.train.distributed import World
    from lib.train.step import StepRunner

    class OneRank(World):
        active = True  # DDP with one process: NCCL's path, which a 1-process World skips

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        grads = []
        for world in (World(), OneRank()):
            step, settings, x, y = tiny_step("fp32")
            runner = StepRunner(step, world, "cuda:0")
            runner.prepare(pooled=False)
            assert isinstance(runner.wrapped, torch.nn.parallel.DistributedDataParallel) == world.active
            loss, _ = runner(x, y)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in step.parameters() if p.grad is not None]))
    finally:
        dist.destroy_process_group()
    # the all-reduce over one rank divides by 1; cuDNN may pick other kernels for the second model: 1e-4 relative
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_channels_last_with_cudnn_benchmark_matches_contiguous_and_trains():
    step, settings, x, y = tiny_step("fp32")
    assert settings.channels_last and settings.cudnn_benchmark and torch.backends.cudnn.benchmark
    model = step.model.eval()
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # other conv algorithms sum in another order: fp32 agrees to ~1e-5 relative after a dozen layers
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    model.train()
    loss, _ = step(x.to(memory_format=torch.channels_last), y)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@needs_ampere
def test_tf32_leaves_the_arcface_cosine_within_its_stated_error():
    from lib.train.losses import ArcFaceHead

    torch.manual_seed(0)
    head = ArcFaceHead(512, 2000).cuda()
    emb = torch.randn(256, 512, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    exact = head.cosine(emb)
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = head.cosine(emb)
    assert tf32.dtype == torch.float32
    # losses.py: ~1e-4 for 512-d (10-bit inputs, fp32 sums); bf16's output steps near 1 are 4e-3
    assert (tf32 - exact).abs().max().item() < 5e-4
