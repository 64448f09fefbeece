"""The one ONNX export path, for whole models and latency-term subgraphs alike.

Uses the TorchScript-based exporter (``dynamo=False``): for the small static graphs of a
latency table it is tens of milliseconds per graph, where the dynamo exporter takes seconds.
The graph has one input named ``input``; its (first) output is named ``output``.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mdp_common.errors import EngineError

DEFAULT_OPSET = 17


def _example_input(module: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    ref: torch.Tensor | None = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
    return torch.randn(tuple(shape), device=device, dtype=dtype)


def export_onnx(module: nn.Module, input_shape: Sequence[int], path: str | Path | None = None,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = False) -> bytes:
    """Export ``module`` (in eval mode, without gradients) for an input of ``input_shape``.

    ``input_shape`` includes the batch dimension. With ``dynamic_batch`` the first axis of
    the input and outputs is symbolic. Returns the serialized model; with ``path`` it is
    also written there atomically (temporary file, then rename). The module's training
    mode is restored afterwards.
    """
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise EngineError(f"cannot export for input shape {shape}: every dimension must be >= 1")
    was_training = module.training
    module.eval()
    try:
        x = _example_input(module, shape)
        # Naming only the first output saves a forward pass; further outputs keep the
        # exporter's names. Tracing runs the module once anyway.
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            # The TorchScript exporter writes to file objects too; the annotation names paths only.
            torch.onnx.export(
                module, (x,), buf,  # type: ignore[arg-type]
                dynamo=False, opset_version=opset, input_names=["input"], output_names=["output"],
                dynamic_axes=axes, do_constant_folding=True,
            )
    except (RuntimeError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:  # TypeError: a forward the tracer feeds tensors for Python values
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"cannot export {type(module).__name__} to ONNX (opset {opset}): {first}") from exc
    finally:
        module.train(was_training)
    data = buf.getvalue()
    if path is not None:
        write_atomic(Path(path), data)
    return data


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    The file gets the mode of any other new file (``0666`` less the umask), not the private
    ``0600`` of the temporary file it was written as."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: there is no other way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
