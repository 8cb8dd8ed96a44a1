from types import SimpleNamespace

import pytest
import torch

from lib.core.device import auto_settings, gpu_profile


@pytest.mark.parametrize("memory_gb, cc, expected", [
    (80, (8, 0), ("bf16", 16, 1)),   # A100 80GB
    (40, (8, 0), ("bf16", 8, 2)),    # A100 40GB
    (24, (8, 6), ("bf16", 4, 4)),    # RTX 3090: bf16-capable, so bf16 (an fp16 setting for it predates that rule)
    (48, (8, 9), ("bf16", 8, 2)),    # other Ampere+
    (16, (7, 0), ("fp16", 4, 4)),    # pre-Ampere (V100)
])
def test_gpu_table(memory_gb, cc, expected):
    got = gpu_profile(memory_gb, cc, cpu_count=64)
    assert (got["precision"], got["num_workers"], got["accum_steps"]) == expected
    assert got["tf32"] == (cc[0] >= 8)
    assert gpu_profile(memory_gb, cc, cpu_count=6)["num_workers"] <= 6


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
