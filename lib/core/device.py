"""Device choice and GPU auto-tuning (precision, loader workers, gradient accumulation), every value overridable by a parameter."""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

# PyTorch and Faiss each bring an OpenMP runtime; on CPU-only machines two runtimes in one process can abort or
# oversubscribe. These must be set before either library starts its thread pool, so importing lib.core.device first helps.
os.environ.setdefault("KMP_DUPLICATE_LIB_OK", "TRUE")

import torch  # noqa: E402

from lib.core.cpus import usable_cpus  # noqa: E402

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class DeviceSettings:
    device: str = "cpu"
    precision: str = "fp32"      # autocast dtype; fp16 also turns the GradScaler on
    num_workers: int = 0
    accum_steps: int = 1
    pin_memory: bool = False
    channels_last: bool = False
    tf32: bool = False
    cudnn_benchmark: bool = False
    gpu: str = ""
    # images per backbone pass inside a training step (0: the whole micro-batch): on the CPU, smaller passes keep a
    # pass's activations in cache (lib.core.cpu_probe); the head and the loss still see the whole micro-batch
    backbone_chunk: int = 0
    # what chose channels_last and backbone_chunk for the backbone phase on the CPU ('probe: ...'); '' where nothing
    # did: a GPU, or a run begun without a backbone phase (epochs=0), whose resume with backbone epochs chooses then
    backbone_choice: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # bf16 keeps fp32's exponent range, so only fp16 needs loss scaling.
        return torch.amp.GradScaler(self.device.split(":")[0], enabled=self.precision == "fp16")


def gpu_profile(total_memory_gb: float, capability: tuple[int, int], cpu_count: int) -> dict:
    """The GPU auto-tuning table as a pure function of the card's memory and compute capability.

    Precision follows the capability (bf16 from Ampere, cc >= 8.0, on every card including the RTX 3090, usually
    tuned for fp16: it supports bf16, and bf16 needs no GradScaler); workers and gradient accumulation follow memory.
    """
    precision = "bf16" if capability[0] >= 8 else "fp16"
    if total_memory_gb >= 70:
        workers, accum = 16, 1
    elif total_memory_gb >= 35:
        workers, accum = 8, 2
    else:
        workers, accum = 4, 4
    return {"precision": precision, "num_workers": min(workers, cpu_count), "accum_steps": accum,
            "tf32": capability[0] >= 8}


def cores_per_rank() -> int:
    """Cores for this process's loader workers: the cores it may use, shared among the processes torchrun started on
    this machine (LOCAL_WORLD_SIZE; 1 without torchrun), so N ranks with the table's workers each do not start N
    times the workers the machine has cores for."""
    return max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a card of this compute capability has bf16 tensor cores (Ampere, 8.0, on). Not
    torch.cuda.is_bf16_supported(): it asks about the current device rather than the chosen one, and by default
    also says yes where bf16 is only emulated (a V100), far slower than fp16."""
    return capability[0] >= 8


def pick_device(device: str = "auto") -> str:
    """CUDA when there is one; Apple MPS is refused rather than half-working (auto picks the CPU on a Mac)."""
    if device == "mps":
        raise ValueError("Apple MPS is not supported (Faiss has no MPS backend); use device='cpu'")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but PyTorch sees no CUDA GPU here; use device='auto' or 'cpu'")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device={device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
    return device


def is_cuda(device: str) -> bool:
    """Whether `device` ('auto', 'cpu', 'cuda', 'cuda:N', or one already picked) means a CUDA GPU: the one answer the
    run assembly, DDP's backend and the device table share."""
    return pick_device(device).startswith("cuda")


def auto_settings(device: str = "auto", precision: str = "auto", num_workers: int = -1, accum_steps: int = 0,
                  channels_last: bool | None = None) -> DeviceSettings:
    """Settings from the device, each replaced by the caller's value when given (-1 / 0 / 'auto' / None = choose).

    On CPU: no autocast (fp32), no pinned memory, workers from the core count.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    dev = pick_device(device)
    cpus = cores_per_rank()
    if dev == "cpu":
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision={precision!r} is for CUDA; on the CPU training runs in fp32")
        chosen = {"precision": "fp32", "num_workers": min(2, cpus - 1) if cpus > 2 else 0, "accum_steps": 1,
                  "tf32": False}
        gpu = ""
    else:
        props = torch.cuda.get_device_properties(dev)
        chosen = gpu_profile(props.total_memory / 2**30, (props.major, props.minor), cpus)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GB, cc {props.major}.{props.minor})"
    if precision != "auto":
        chosen["precision"] = precision
    if precision == "bf16" and dev != "cpu" and not native_bf16((props.major, props.minor)):
        raise ValueError("precision='bf16' asked for, but this GPU has no bf16 support; use 'fp16'")
    return DeviceSettings(
        device=dev, precision=chosen["precision"],
        num_workers=chosen["num_workers"] if num_workers < 0 else num_workers,
        accum_steps=chosen["accum_steps"] if accum_steps <= 0 else accum_steps,
        pin_memory=dev != "cpu", channels_last=(dev != "cpu") if channels_last is None else channels_last,
        tf32=chosen["tf32"], cudnn_benchmark=dev != "cpu", gpu=gpu)


def apply_settings(settings: DeviceSettings) -> None:
    """Process-wide switches: TF32 matmuls/convolutions (Ampere+), cudnn autotuning for fixed input sizes."""
    if is_cuda(settings.device):
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
        torch.backends.cudnn.allow_tf32 = settings.tf32
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
