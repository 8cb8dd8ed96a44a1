from types import SimpleNamespace

import pytest
import torch

from lib.core.device import auto_settings, gpu_profile


MEMORY_GB = [8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 141]
CAPABILITIES = [(6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0)]


@pytest.mark.parametrize("cpus", [1, 2, 6, 64])
def test_gpu_table_rules(cpus):
    """The rules the table encodes, over every card size and generation rather than its rows: precision and TF32
    from the capability alone (bf16 and TF32 from Ampere, cc >= 8), never more workers than cores, and a card with
    less memory never gets fewer workers' worth of accumulation or more workers than a larger one."""
    for cc in CAPABILITIES:
        rows = [gpu_profile(gb, cc, cpu_count=cpus) for gb in MEMORY_GB]
        for gb, got in zip(MEMORY_GB, rows):
            assert got["precision"] == ("bf16" if cc[0] >= 8 else "fp16"), (gb, cc)
            assert got["tf32"] == (cc[0] >= 8), (gb, cc)
            assert 1 <= got["num_workers"] <= cpus, (gb, cc, cpus)
            assert got["accum_steps"] >= 1 and isinstance(got["accum_steps"], int)
        for small, large in zip(rows, rows[1:]):
            assert small["accum_steps"] >= large["accum_steps"], "more memory, more accumulation"
            assert small["num_workers"] <= large["num_workers"], "more memory, fewer workers"
        assert rows[0]["accum_steps"] > rows[-1]["accum_steps"], "memory changes the accumulation somewhere"
    # the memory alone sets the accumulation: one card size either side of Ampere
    assert gpu_profile(24, (7, 5), cpus)["accum_steps"] == gpu_profile(24, (8, 6), cpus)["accum_steps"]


def fake_gpu(monkeypatch, memory_gb, major, minor):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: major >= 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(
        name="FakeGPU", total_memory=memory_gb * 2**30, major=major, minor=minor))
    monkeypatch.setattr("lib.core.device.usable_cpus", lambda: 32)


def test_auto_settings_on_a_mocked_a100_and_overrides(monkeypatch):
    fake_gpu(monkeypatch, 80, 8, 0)
    s = auto_settings()
    assert (s.device, s.precision, s.num_workers, s.accum_steps) == ("cuda", "bf16", 16, 1)
    assert s.pin_memory and s.tf32 and s.cudnn_benchmark and s.channels_last
    assert not s.grad_scaler().is_enabled()
    o = auto_settings(precision="fp16", num_workers=3, accum_steps=2)
    assert (o.precision, o.num_workers, o.accum_steps) == ("fp16", 3, 2)


def test_pre_ampere_gets_fp16_with_scaler_and_refuses_bf16(monkeypatch):
    fake_gpu(monkeypatch, 16, 7, 0)
    s = auto_settings()
    assert s.precision == "fp16" and not s.tf32
    with pytest.raises(ValueError, match="no bf16"):
        auto_settings(precision="bf16")


def test_cpu_fallback_and_refusals(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = auto_settings()
    assert (s.device, s.precision, s.pin_memory, s.channels_last) == ("cpu", "fp32", False, False)
    with pytest.raises(ValueError, match="MPS"):
        auto_settings(device="mps")
    with pytest.raises(ValueError, match="no CUDA"):
        auto_settings(device="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        auto_settings(precision="bf16")


def test_workers_follow_the_cores_this_process_may_use_not_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert auto_settings().num_workers == 0  # 2 allowed cores: loading in the main process beats a competing worker
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert auto_settings().num_workers == 2


def test_loader_workers_divide_the_machines_cores_among_its_torchrun_ranks(monkeypatch):
    fake_gpu(monkeypatch, 80, 8, 0)  # 32 usable cores; the table's 16 workers for one process
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto_settings().num_workers == 16
    for ranks, workers in ((2, 16), (4, 8), (8, 4), (64, 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert auto_settings().num_workers == workers, f"{ranks} ranks on 32 cores"


def test_bf16_is_judged_on_the_chosen_card_not_the_current_one(monkeypatch):
    cards = {0: SimpleNamespace(name="V100", total_memory=16 * 2**30, major=7, minor=0),
             1: SimpleNamespace(name="A100", total_memory=80 * 2**30, major=8, minor=0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: cards[torch.device(dev).index or 0])
    # torch's own answer: about the current device (0 here), and yes where bf16 is only emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert auto_settings("cuda:1", precision="bf16").precision == "bf16"
    assert auto_settings("cuda:1").precision == "bf16" and auto_settings("cuda:0").precision == "fp16"
    with pytest.raises(ValueError, match="no bf16"):
        auto_settings("cuda:0", precision="bf16")
