"""PyTorch as an engine: CUDA-graph replay on a GPU (fp32, fp16 or bf16, channels-last), eager on CPU.

BatchNorm is folded into the preceding convolutions before timing, as deployment engines
do (``torch.fx`` fusion, checked against the unfolded module on a random input; a module
that cannot be traced or does not match keeps its BatchNorm layers).

On a GPU, inputs live on the device, the forward pass is captured once into a CUDA graph
and replayed; device time comes from CUDA events (see :mod:`profilers.engines.cuda`). On CPU
the module runs eagerly in fp32 with ``threads`` intra-op threads (default 1, set while a
runner is open and restored when it closes; torch's thread count is process-wide).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdp_common.errors import EngineError
from profilers.engines.base import EngineIdentity, HostRunner, identity_of, require_cuda

PRECISIONS = ("fp32", "fp16", "bf16")


def _dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def fold_batchnorm(module: nn.Module, example: torch.Tensor) -> tuple[nn.Module, bool]:
    """``module`` (eval mode) with each Conv+BatchNorm pair folded into one convolution.

    Returns the folded module and whether folding happened. The folded module must match
    the original on ``example`` (fp32, relative tolerance 1e-3); otherwise the original is
    returned unchanged.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module, False
    from torch.fx.experimental.optimization import fuse

    module.eval()
    try:
        folded = fuse(module, inplace=False)
    except Exception:  # fx tracing fails on data-dependent control flow: keep the module as is
        return module, False
    with torch.no_grad():
        ref, out = module(example), folded(example)
    if not (isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor)):
        return module, False
    scale = float(ref.abs().max()) or 1.0
    if float((ref - out).abs().max()) > 1e-3 * scale:
        return module, False
    return folded, True


class TorchEngine:
    """PyTorch with BatchNorm folded; CUDA graphs on GPU, eager on CPU."""

    name = "torch"
    precisions = PRECISIONS

    def __init__(self, precision: str | None = None, batch_size: int = 1, resolution: int | None = 224,
                 threads: int | None = None, device: str | None = None, cuda_graphs: bool = True,
                 channels_last: bool = True) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            precision = precision or "fp32"
            if precision != "fp32":
                raise EngineError(f"the torch engine runs fp32 only on CPU (asked for {precision}); "
                                  "fp16 and bf16 need a CUDA GPU")
            self.device = "cpu"
            self.threads: int | None = 1 if threads is None else int(threads)
            if self.threads < 1:
                raise EngineError(f"threads must be >= 1 for the torch engine on CPU, got {threads}")
        else:
            precision = precision or "fp16"
            self.device = f"cuda:{require_cuda(self.name, device)}"
            if threads is not None:
                raise EngineError("threads apply to the torch engine on CPU only")
            self.threads = None
        if precision not in PRECISIONS:
            raise EngineError(f"precision {precision!r} is not one of {PRECISIONS}")
        self.precision = precision
        self.batch_size = batch_size
        self.resolution = resolution
        self.cuda_graphs = cuda_graphs
        self.channels_last = channels_last

    def identity(self) -> EngineIdentity:
        on_gpu = self.device != "cpu"
        version = f"{torch.__version__}/{'cuda-graphs' if on_gpu and self.cuda_graphs else 'eager'}"
        return identity_of(self, version, self.threads)

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> Any:
        """Fold BatchNorm, move to the device and precision, capture a CUDA graph on GPU."""
        shape = tuple(int(s) for s in input_shape)
        dev = torch.device(self.device)
        m = copy.deepcopy(module).eval().to(device=dev, dtype=torch.float32)
        m, _ = fold_batchnorm(m, torch.randn(shape, device=dev))
        if self.device == "cpu":
            return self._prepare_cpu(m, shape)
        fmt = torch.channels_last if self.channels_last and len(shape) == 4 else torch.contiguous_format
        dtype = _dtype(self.precision)
        m = m.to(dtype=dtype).to(memory_format=fmt)
        x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
        return self._prepare_cuda(m, x)

    def _prepare_cpu(self, m: nn.Module, shape: tuple[int, ...]) -> HostRunner:
        x = torch.randn(shape)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads or 1)

        def run() -> None:
            with torch.inference_mode():
                m(x)

        def close() -> None:
            torch.set_num_threads(previous)

        return HostRunner(run, close)

    def _prepare_cuda(self, m: nn.Module, x: torch.Tensor) -> Any:
        from profilers.engines.cuda import CudaRunner, capture_graph

        stream = torch.cuda.Stream(device=x.device)
        out: list[Any] = []

        def forward() -> None:
            with torch.no_grad():
                out[:] = [m(x)]

        if not self.cuda_graphs:
            stream.wait_stream(torch.cuda.current_stream(x.device))
            return CudaRunner(forward, stream, keep=(m, x, out))
        graph = capture_graph(forward, stream)
        return CudaRunner(graph.replay, stream, keep=(m, x, out, graph))

    def prepare_onnx(self, model: str | Path | bytes, input_shape: Sequence[int] | None = None) -> Any:
        raise EngineError("the torch engine runs torch modules, not ONNX files; "
                          "use --engine onnxruntime or --engine tensorrt for .onnx files")
