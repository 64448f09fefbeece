"""The engine protocol: what every inference engine offers the profiler and the benchmarks."""

from __future__ import annotations

import ctypes
import json
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mdp_common import __version__
from mdp_common.errors import EngineError, TableError

if TYPE_CHECKING:  # the engines that prepare modules load torch, not the protocol
    from torch import nn


@dataclass(frozen=True)
class EngineIdentity:
    """Everything a latency measurement depends on besides the graph itself.

    Two tables (or a table and an engine) may be used together only when their identities
    are equal field for field. ``threads`` is None where it does not apply (GPU engines);
    ``driver`` is empty on CPU.
    """

    engine: str
    version: str
    device: str
    driver: str
    precision: str
    batch_size: int
    resolution: int | None
    threads: int | None
    mdp_trt_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineIdentity:
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise TableError(f"engine identity lacks {missing}")
        return cls(**{n: data[n] for n in names})

    def differences(self, other: EngineIdentity) -> list[str]:
        """``field: mine != theirs`` for every field that differs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]

    def describe(self) -> str:
        thr = f", {self.threads} thread(s)" if self.threads is not None else ""
        return (f"{self.engine} {self.version} on {self.device}, {self.precision}, "
                f"batch {self.batch_size}, resolution {self.resolution}{thr}")


@runtime_checkable
class Runner(Protocol):
    """One prepared model on one engine, with its input buffers bound."""

    def __call__(self) -> None:
        """Run one inference; returns when its result is ready (host latency)."""
        ...

    def timed(self, iters: int) -> list[float] | None:
        """Device time (ms) of ``iters`` back-to-back inferences, or None without a device clock."""
        ...

    def close(self) -> None:
        """Release the session, engine or graph."""
        ...


class Engine(Protocol):
    """An inference engine chosen by name (``profilers.engines.get_engine``)."""

    name: str
    precision: str
    batch_size: int
    resolution: int | None
    device: str
    """``cpu`` or ``cuda:<index>``: where the inferences run."""

    def identity(self) -> EngineIdentity: ...

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> Runner:
        """A runner for ``module`` at ``input_shape`` (batch included)."""
        ...

    def prepare_onnx(self, model: str | Path | bytes, input_shape: Sequence[int] | None = None) -> Runner:
        """A runner for a serialized model (ONNX, or an engine file the engine can load)."""
        ...


class HostRunner:
    """A runner around a callable, timed by the host clock."""

    def __init__(self, fn: Callable[[], Any], close: Callable[[], None] | None = None) -> None:
        self._fn = fn
        self._close = close

    def __call__(self) -> None:
        self._fn()

    def timed(self, iters: int) -> list[float] | None:
        return None

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def identity_of(engine: Any, version: str, threads: int | None) -> EngineIdentity:
    """The identity of ``engine`` (its name, ``device``, ``precision``, ``batch_size`` and
    ``resolution``) at ``version``: on a CUDA device the GPU's name and driver, on ``"cpu"``
    the CPU's name and no driver."""
    on_gpu = engine.device != "cpu"
    return EngineIdentity(
        engine=engine.name,
        version=version,
        device=gpu_name(cuda_index(engine.device)) if on_gpu else cpu_name(),
        driver=driver_version() if on_gpu else "",
        precision=engine.precision,
        batch_size=engine.batch_size,
        resolution=engine.resolution,
        threads=threads,
        mdp_trt_version=mdp_trt_version(),
    )


def mdp_trt_version() -> str:
    return __version__


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cuda_index(device: str) -> int:
    """The device index of ``cuda`` / ``cuda:<i>``."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise EngineError(f"unknown device {device!r}; expected cpu, cuda or cuda:<index>")


def require_cuda(engine: str, device: str) -> int:
    """The CUDA index of ``device``, or an EngineError when no such CUDA device is usable."""
    import torch

    index = cuda_index(device)
    if not torch.cuda.is_available():
        raise EngineError(f"engine {engine!r} needs a CUDA GPU, and torch sees none on this machine")
    if index >= torch.cuda.device_count():
        raise EngineError(f"no CUDA device {index}: this machine has {torch.cuda.device_count()}")
    return index


def gpu_name(index: int = 0) -> str:
    import torch

    return str(torch.cuda.get_device_name(index))


def driver_version() -> str:
    """The NVIDIA driver version (NVML when installed, else the CUDA driver API version)."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            try:
                v = pynvml.nvmlSystemGetDriverVersion()
                return v.decode() if isinstance(v, bytes) else str(v)
            finally:
                pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        out = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(out)) == 0:
            return f"cuda {out.value // 1000}.{(out.value % 1000) // 10}"
    except OSError:
        pass
    return "unknown"
