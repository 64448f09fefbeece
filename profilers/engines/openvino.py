"""OpenVINO on the CPU: the compiling CPU deployment runtime.

Loader: ONNX (file or bytes, read by OpenVINO's ONNX frontend) or OpenVINO IR (``.xml`` with
its ``.bin``) -> ``ov.Model`` with its input fixed to one static shape -> ``Core.compile_model``
on ``CPU``, which fuses, picks layouts and kernels: every prepared model is a compile, and its
seconds are kept apart from timing (``OpenVinoRunner.compile_s``, summed by the profiler).

Compile settings, all part of the engine identity:

- ``INFERENCE_NUM_THREADS``: the thread count, one by default (as onnxruntime: a table
  measured with one thread is stable on a shared machine); ``threads=0`` leaves the choice
  to OpenVINO.
- ``PERFORMANCE_HINT``: ``LATENCY`` (default) with ``NUM_STREAMS=1``, the single-stream
  latency a synchronous deployment sees; ``THROUGHPUT`` leaves the stream count to OpenVINO
  and measures one request's latency under that configuration.
- ``INFERENCE_PRECISION_HINT``: always set. ``fp32`` is ``f32`` (OpenVINO's own default on a
  CPU with bf16 units is bf16, so leaving it unset would not be fp32); ``bf16`` only where
  the CPU plugin lists ``BF16`` in ``OPTIMIZATION_CAPABILITIES``, refused elsewhere.
- ``ENABLE_CPU_PINNING`` off: with one thread OpenVINO runs the inference on the calling
  thread, and pinning would bind that thread (the process's main thread, which also builds
  and exports the torch modules) to one core; unpinned, the scheduler can move it off a core
  that another process holds on a shared machine.

Runner: one ``InferRequest`` with its input tensor bound once (seeded random data); a call
is one synchronous ``infer`` whose outputs stay in OpenVINO's buffers (not copied to numpy).

Clock: as onnxruntime's. ``auto`` (the default) is ``cpu`` with one thread, ``wall``
otherwise. ``clock="cpu"`` times each inference by the CPU time of the calling thread: with
``INFERENCE_NUM_THREADS=1`` a synchronous ``infer`` runs the graph on the calling thread
(checked on a conv net: the calling thread's CPU time matched the wall time, where an
asynchronous request left it near zero), so this is the latency on an idle core, immune to
other processes taking it. The clock is part of the identity.

The final model of a prune is also written as IR (``save_engine``: ``model.xml`` and
``model.bin``, weights kept in fp32). ``openvino`` is imported only when the engine is
created: without it the engine says which extra to install.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mdp_common.errors import EngineError
from profilers.engines.base import EngineIdentity, HostRunner, cpu_name, identity_of
from profilers.engines.onnxruntime import ThreadTimedRunner, _resolve_shape
from profilers.export import export_onnx

PRECISIONS = ("fp32", "bf16")
HINTS = ("LATENCY", "THROUGHPUT")
CLOCKS = ("auto", "wall", "cpu")
INSTALL = "pip install 'mdp-trt[openvino]'"
MIN_MAJOR = 2026
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def require_openvino() -> Any:
    """The ``openvino`` module, or an EngineError saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise EngineError(f"the openvino engine needs OpenVINO {MIN_MAJOR}+ and it is not installed: "
                          f"{INSTALL}") from exc
    major = str(openvino.__version__).split(".")[0]
    if not major.isdigit() or int(major) < MIN_MAJOR:
        raise EngineError(f"OpenVINO {openvino.__version__} is installed; the openvino engine needs "
                          f"{MIN_MAJOR}+: {INSTALL}")
    return openvino


def short_version(full: str) -> str:
    """``2026.4.1-22982-e213a147257-releases/2026/4`` -> ``2026.4.1-22982`` (release and build)."""
    return "-".join(full.split("/")[0].split("-")[:2])


def cpu_capabilities(core: Any) -> list[str]:
    """What OpenVINO's CPU plugin says this CPU can run (``FP32``, ``BF16``, ``INT8``...)."""
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


class OpenVinoRunner(HostRunner):
    """A compiled model's prepared infer request; ``compile_s``: seconds its compile took;
    ``onnx``: the ONNX bytes it was compiled from, where :meth:`OpenVinoEngine.prepare`
    exported them (for :meth:`OpenVinoEngine.edge_costs`, which compiles them again)."""

    compile_s: float = 0.0
    onnx: bytes | None = None


class ThreadTimedOpenVinoRunner(ThreadTimedRunner, OpenVinoRunner):
    """An :class:`OpenVinoRunner` timed by the calling thread's CPU time."""


class OpenVinoEngine:
    """OpenVINO's CPU plugin, compiled per model with a recorded thread count, hint and precision."""

    name = "openvino"
    precisions = PRECISIONS
    engine_suffix = ".xml"
    """The saved form of the final model (``save_engine``): OpenVINO IR."""

    def __init__(self, precision: str = "fp32", batch_size: int = 1, resolution: int | None = 224,
                 threads: int | None = 1, device: str | None = None, hint: str = "LATENCY",
                 clock: str = "auto") -> None:
        ov = require_openvino()
        if device not in (None, "cpu"):
            raise EngineError(f"the openvino engine runs on the CPU, not on {device!r}")
        if precision not in PRECISIONS:
            raise EngineError(f"precision {precision!r} is not one of {PRECISIONS} for openvino")
        self.threads = 1 if threads is None else int(threads)
        if self.threads < 0:
            raise EngineError(f"threads must be >= 0 (0: OpenVINO's default), got {threads}")
        hint = hint.upper()
        if hint not in HINTS:
            raise EngineError(f"performance hint {hint!r} is not one of {HINTS}")
        if clock not in CLOCKS:
            raise EngineError(f"clock {clock!r} is not one of {CLOCKS}")
        if clock == "auto":
            clock = "cpu" if self.threads == 1 else "wall"
        if clock == "cpu" and self.threads != 1:
            raise EngineError("clock 'cpu' times the calling thread: it needs one thread "
                              f"(here: {self.threads} thread(s))")
        self.core = ov.Core()
        if precision == "bf16":
            caps = cpu_capabilities(self.core)
            if "BF16" not in caps:
                raise EngineError(f"this CPU ({cpu_name()}) has no bf16 support in OpenVINO "
                                  f"(OPTIMIZATION_CAPABILITIES: {', '.join(caps)}); use fp32")
        self.version = short_version(str(ov.__version__))
        self.precision = precision
        self.batch_size = batch_size
        self.resolution = resolution
        self.device = "cpu"
        self.hint = hint
        self.clock = clock

    def identity(self) -> EngineIdentity:
        clock = "/thread-cpu-time" if self.clock == "cpu" else ""
        return identity_of(self, f"{self.version}/CPU/{self.hint}{clock}", self.threads)

    def config(self) -> dict[str, Any]:
        """The properties every model is compiled with (see the module docstring)."""
        cfg: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": self.hint,
            "INFERENCE_PRECISION_HINT": _OV_PRECISION[self.precision],
            "ENABLE_CPU_PINNING": False,
        }
        if self.hint == "LATENCY":
            cfg["NUM_STREAMS"] = 1
        return cfg

    # -- loading ------------------------------------------------------------------------

    def read(self, model: str | Path | bytes) -> Any:
        """An ``ov.Model`` from ONNX bytes, an ``.onnx`` file or an IR ``.xml`` (with its ``.bin``)."""
        if isinstance(model, bytes):
            source: Any = model
        else:
            path = Path(model)
            if path.suffix not in (".onnx", ".xml"):
                raise EngineError(f"openvino runs .onnx and .xml (IR) files, not {path.name}")
            if not path.is_file():
                raise EngineError(f"no such file: {path}")
            if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
                raise EngineError(f"the IR {path.name} has no weights file {path.with_suffix('.bin').name} "
                                  "beside it")
            source = str(path)
        try:
            return self.core.read_model(source)
        except RuntimeError as exc:
            raise EngineError(f"openvino cannot read the model: {_first_line(exc)}") from exc

    def _static(self, model: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
        """Fix the model's one input to a static shape (``input_shape``, or its own with the
        engine's batch on a symbolic first axis); returns that shape."""
        inputs = model.inputs
        if len(inputs) != 1:
            raise EngineError(f"expected a model with one input, this one has {len(inputs)}")
        pshape = inputs[0].get_partial_shape()
        if pshape.rank.is_dynamic:
            raise EngineError("the model's input has a dynamic rank; give a model with a fixed input rank")
        dims: list[Any] = [d.get_length() if d.is_static else "?" for d in pshape]
        shape = _resolve_shape(dims, input_shape, self.batch_size)
        if pshape.is_dynamic:
            model.reshape(list(shape))
        return shape

    def compile(self, model: Any, **extra: Any) -> Any:
        """``Core.compile_model`` on ``CPU`` with :meth:`config` (and ``extra`` properties)."""
        try:
            return self.core.compile_model(model, "CPU", {**self.config(), **extra})
        except RuntimeError as exc:
            raise EngineError(f"openvino cannot compile the model: {_first_line(exc)}") from exc

    # -- running ------------------------------------------------------------------------

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> OpenVinoRunner:
        """Export ``module`` through the one ONNX path, compile it, bind its input."""
        onnx = export_onnx(module, input_shape)
        runner = self.prepare_onnx(onnx, input_shape)
        runner.onnx = onnx
        return runner

    def prepare_onnx(self, model: str | Path | bytes, input_shape: Sequence[int] | None = None
                     ) -> OpenVinoRunner:
        """A runner for ONNX bytes, an ``.onnx`` file or an IR ``.xml``; a symbolic batch axis
        takes ``input_shape`` (or the engine's batch size)."""
        import openvino as ov

        ov_model = self.read(model)
        shape = self._static(ov_model, input_shape)
        t0 = time.perf_counter()
        compiled = self.compile(ov_model)
        compile_s = time.perf_counter() - t0
        request = compiled.create_infer_request()
        dtype = compiled.inputs[0].get_element_type().to_dtype()
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        request.set_input_tensor(ov.Tensor(x))
        request.infer(share_outputs=True)  # first run: allocations, and a failure shows here
        state: list[Any] = [request, compiled, x]

        def run() -> None:
            state[0].infer(share_outputs=True)

        cls = ThreadTimedOpenVinoRunner if self.clock == "cpu" else OpenVinoRunner
        runner = cls(run, state.clear)
        runner.compile_s = compile_s
        return runner

    # -- boundary costs of a standalone subgraph ------------------------------------------

    def edge_costs(self, model: bytes, input_shape: Sequence[int], runs: int = 15) -> tuple[float, float]:
        """Milliseconds of the layout conversions OpenVINO adds to this graph run alone: the
        ``Reorder`` nodes fed by its input, and those feeding its outputs (NCHW into the
        blocked or channels-last layout its convolutions run in, and back), read off the CPU
        plugin's own per-node profile (``PERF_COUNT``) of the graph compiled with the engine's
        settings; the median over ``runs`` inferences.

        Measured on the Xeon box (OpenVINO 2026.4.1, one thread): resnet50's 55 terms timed
        alone spent 20.4 ms of 81.5 in such reorders, the whole model 0.2 ms of 61.4 (its
        convolutions cost the same either way), so a term timed alone costs that much more
        than it does inside the model."""
        import openvino as ov

        ov_model = self.read(model)
        shape = self._static(ov_model, input_shape)
        compiled = self.compile(ov_model, PERF_COUNT=True)
        into: set[str] = set()
        out_of: set[str] = set()
        for op in _reorders(compiled):
            name = op.get_friendly_name()
            if any(op.input_value(i).get_node().get_type_name() == "Parameter" for i in range(op.get_input_size())):
                into.add(name)
            if any(t.get_node().get_type_name() == "Result" for o in op.outputs() for t in o.get_target_inputs()):
                out_of.add(name)
        if not into and not out_of:
            return 0.0, 0.0
        request = compiled.create_infer_request()
        dtype = compiled.inputs[0].get_element_type().to_dtype()
        request.set_input_tensor(ov.Tensor(np.random.default_rng(0).standard_normal(shape).astype(dtype)))
        request.infer(share_outputs=True)
        seen: dict[str, list[float]] = {}
        for _ in range(runs):
            request.infer(share_outputs=True)
            for info in request.profiling_info:
                if info.node_name in into or info.node_name in out_of:
                    seen.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1e3)
        med = {k: float(np.median(v)) for k, v in seen.items()}
        return (sum(v for k, v in med.items() if k in into),
                sum(v for k, v in med.items() if k in out_of and k not in into))

    def whole_model_conversions(self, model: bytes) -> tuple[set[str], set[str]]:
        """Where a whole model changes layout: the names (as exported) of the nodes fed by a
        ``Reorder`` in the graph OpenVINO compiles for these settings, and of those feeding
        one. A term whose edge is there pays that conversion inside the model too, so it is
        not a cost of timing it alone (:meth:`edge_costs`)."""
        ov_model = self.read(model)
        self._static(ov_model, None)
        into: set[str] = set()
        out_of: set[str] = set()
        for op in _reorders(self.compile(ov_model)):
            for i in range(op.get_input_size()):
                out_of.add(op.input_value(i).get_node().get_friendly_name())
            for o in op.outputs():
                into.update(t.get_node().get_friendly_name() for t in o.get_target_inputs())
        return into, out_of

    def infer(self, model: str | Path | bytes, x: np.ndarray) -> list[np.ndarray]:
        """Outputs of one inference of ``x`` (copied out): for checking results against torch."""
        ov_model = self.read(model)
        self._static(ov_model, x.shape)
        request = self.compile(ov_model).create_infer_request()
        result = request.infer(x)
        return [np.array(result[out]) for out in request.model_outputs]

    # -- saving -------------------------------------------------------------------------

    def save_engine(self, onnx_path: str | Path, input_shape: Sequence[int] | None,
                    engine_path: str | Path) -> list[Path]:
        """Write the ONNX model as OpenVINO IR: ``engine_path`` (``.xml``) and its ``.bin``,
        input fixed to ``input_shape``, weights in fp32. Returns both paths."""
        import openvino as ov

        src, xml = Path(onnx_path), Path(engine_path)
        if xml.suffix != ".xml":
            raise EngineError(f"OpenVINO IR goes to a .xml file, not {xml.name}")
        if src.suffix != ".onnx":
            raise EngineError(f"save_engine converts an .onnx file, not {src.name}")
        ov_model = self.read(src)
        self._static(ov_model, input_shape)
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        return [xml, xml.with_suffix(".bin")]


def _reorders(compiled: Any) -> Iterator[Any]:
    """The layout conversions (``Reorder`` nodes) of the graph a compiled model runs. A
    generator, so the runtime graph stays alive while its nodes are read: a node's consumers
    are gone once the graph is freed."""
    graph = compiled.get_runtime_model()
    for op in graph.get_ordered_ops():
        if str(op.get_rt_info()["layerType"].astype(str)) == "Reorder":
            yield op


def _first_line(exc: BaseException) -> str:
    """The message of an OpenVINO error without its ``Exception from <source file>`` lines."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith("Exception from ")]
    return (said or lines or [type(exc).__name__])[0][:300]
