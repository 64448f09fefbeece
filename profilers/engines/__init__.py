"""Inference engines behind one protocol, chosen by name.

``onnxruntime`` (the embedded default), ``openvino`` (the compiling CPU runtime),
``tensorrt`` (TensorRT 10+, NVIDIA GPUs) and ``torch`` (CUDA graphs on a GPU, eager on CPU). Each declares the precisions and options it
accepts; anything else is refused with the list of what is accepted.
"""

from __future__ import annotations

import importlib
import inspect
from types import MappingProxyType
from typing import Any

from mdp_common.errors import EngineError
from profilers.engines.base import Engine, EngineIdentity, HostRunner, Runner

__all__ = ["ENGINES", "DEFAULT_ENGINE", "Engine", "EngineIdentity", "HostRunner", "Runner",
           "CLOCKS", "clock_of", "clock_options", "engine_class", "get_engine", "precisions_of",
           "resolve_clock"]

ENGINES = ("onnxruntime", "openvino", "tensorrt", "torch")
DEFAULT_ENGINE = "onnxruntime"
_CLASSES = MappingProxyType({"onnxruntime": "OnnxRuntimeEngine", "openvino": "OpenVinoEngine",
                             "tensorrt": "TensorRTEngine", "torch": "TorchEngine"})


def engine_class(name: str) -> Any:
    """The class implementing engine ``name`` (its module imports nothing optional)."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; accepted: {', '.join(ENGINES)}")
    module = importlib.import_module(f"profilers.engines.{name}")
    return getattr(module, _CLASSES[name])


CLOCKS = ("auto", "wall", "cpu")
"""A command line's ``--clock``: ``auto`` (the engine's default), ``wall``, or ``cpu`` (the
calling thread's CPU time, for engines that run a whole inference on that thread)."""


def clock_options(name: str, clock: str) -> dict[str, str]:
    """Engine options for a command line's ``--clock``. Engines that take a ``clock`` option
    get it as given (``auto`` lets them choose: onnxruntime and openvino time one CPU thread by
    its CPU time); the others time by the wall (or device) clock, and refuse ``cpu``."""
    if clock not in CLOCKS:
        raise EngineError(f"clock {clock!r} is not one of {', '.join(CLOCKS)}")
    if "clock" in inspect.signature(engine_class(name).__init__).parameters:
        return {"clock": clock}
    if clock == "cpu":
        raise EngineError(f"engine {name!r} has no thread-CPU-time clock; use --clock wall or auto")
    return {}


def clock_of(engine: Engine) -> str:
    """The clock an engine times by (``wall`` unless it says otherwise): part of table names."""
    return str(getattr(engine, "clock", "wall"))


def resolve_clock(name: str, clock: str, threads: int | None = None) -> str:
    """The clock ``--clock`` means for engine ``name`` on the CPU (``auto`` resolved), before
    any engine is needed: for table names chosen up front."""
    if clock != "auto":
        clock_options(name, clock)  # refuses cpu where it does not apply
        return clock
    options: dict[str, Any] = dict(clock_options(name, clock))
    return clock_of(get_engine(name, threads=threads, **options))


def precisions_of(name: str) -> tuple[str, ...]:
    return tuple(engine_class(name).precisions)


def get_engine(name: str, *, precision: str | None = None, batch_size: int = 1,
               resolution: int | None = 224, threads: int | None = None, device: str | None = None,
               **options: Any) -> Engine:
    """Engine ``name`` configured for one identity; ``precision=None`` takes the engine's default.

    Raises :class:`EngineError` for an unknown engine, precision or option (listing the
    accepted ones), and for an engine that is not installed or cannot run here (saying
    what to install).
    """
    cls = engine_class(name)
    if precision is not None and precision not in cls.precisions:
        raise EngineError(f"engine {name!r} does not take precision {precision!r}; "
                          f"accepted: {', '.join(cls.precisions)}")
    if batch_size < 1:
        raise EngineError(f"batch size must be >= 1, got {batch_size}")
    if resolution is not None and resolution < 1:
        raise EngineError(f"resolution must be >= 1, got {resolution}")
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "precision", "batch_size", "resolution",
                                               "threads", "device")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise EngineError(f"engine {name!r} does not take option(s) {unknown}; "
                          f"accepted: {', '.join(accepted) or 'none'}")
    kw: dict[str, Any] = dict(options, batch_size=batch_size, resolution=resolution, threads=threads,
                              device=device)
    if precision is not None:
        kw["precision"] = precision
    engine: Engine = cls(**kw)
    return engine
