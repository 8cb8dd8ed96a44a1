"""A model's inference forward through ONNX Runtime on the CPU: exported once per weights and input size
(lib.retrieval.embed keeps the last export; torch.onnx, the TorchScript exporter: no onnxscript needed), run in
ORT's own thread pool at torch's intra-op thread count.

Faster than eager PyTorch at its best layout and batch on a CPU (docs/benchmarks.md, "CPU extraction"), with the same
embeddings to 1e-7 in cosine. The export (seconds) is paid once per weights, so lib.retrieval.embed takes this engine
only for jobs large enough to repay it. The same graph, written to a file, is the deployable model of an export
(lib.train.export), run by OnnxForward.from_onnx without the PyTorch model.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn


INPUT, OUTPUT = "x", "y"  # the exported graph's input and output names


def onnx_bytes(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """The model's inference forward as an ONNX graph (opset 17): input INPUT, a float32 (N, *input_shape) batch with
    a dynamic N; output OUTPUT, the model's float32 output."""
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    # the exporter traces, which inference mode (extraction's) forbids
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(2, *input_shape),), buffer, dynamo=False, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "n"}, OUTPUT: {0: "n"}}, opset_version=17)
    model.train(was_training)
    return buffer.getvalue()


class OnnxForward:
    """Callable like the model in inference mode: a float32 (N, C, H, W) tensor in, the model's float32 output
    out. The batch dimension is dynamic; H and W are fixed at those of `input_shape`."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], threads: int | None = None):
        self.session = _session(onnx_bytes(model, input_shape), threads)

    @classmethod
    def from_onnx(cls, data: bytes, threads: int | None = None) -> OnnxForward:
        """An exported graph (onnx_bytes, e.g. read from an export's model.onnx) run without its PyTorch model."""
        self = cls.__new__(cls)
        self.session = _session(data, threads)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {INPUT: np.ascontiguousarray(x.detach().float().cpu().numpy())})[0]
        return torch.from_numpy(out)


def _session(data: bytes, threads: int | None):
    import onnxruntime as ort  # imported here: only a CPU extraction or an exported model needs it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401  (the exporter's dependency)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
