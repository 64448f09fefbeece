"""ONNX Runtime: the embedded default engine.

CPU execution provider unless ``onnxruntime-gpu`` is installed and a CUDA device is seen,
then the CUDA provider (or TensorRT's, with ``trt_provider=True``). Graph optimizations are
all on (``ORT_ENABLE_ALL``: BatchNorm folding, fusions), as a deployment would run them.

Threads: one intra-op thread by default. A table measured with one thread is stable on a
shared machine and its terms add up the way a single-threaded deployment runs them; pass
``threads=N`` (0: ONNX Runtime's own choice, one per physical core) to profile a
multi-threaded deployment. The count is part of the engine identity either way.

Clock: ``auto`` (the default) is ``cpu`` on the CPU provider with one thread, ``wall``
otherwise. ``clock="cpu"`` times each inference by the CPU time of the calling thread: with
one intra-op thread ONNX Runtime runs the whole graph on that thread, so this is the latency
the model has on an idle core, and it does not grow when other processes take the core on a
shared machine (where wall-clock medians were seen 2-3x inflated). ``clock="wall"`` keeps
the wall clock (multi-threaded and GPU runs have no other). The clock is part of the identity.

Inputs and outputs are bound once (``OrtValue`` I/O binding) so that a timed call is the
inference and not the allocation or copy of its buffers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mdp_common.errors import EngineError
from profilers.engines.base import EngineIdentity, HostRunner, cuda_index, identity_of, require_cuda
from profilers.export import export_onnx

PRECISIONS = ("fp32", "fp16")
NCHWC = "com.microsoft.nchwc"
CLOCKS = ("auto", "wall", "cpu")
INSTALL_GPU = "pip install 'mdp-trt[ort-gpu]'"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineError("onnxruntime is not installed: pip install onnxruntime "
                          f"(or {INSTALL_GPU} for GPUs)") from exc
    return onnxruntime


class OnnxRuntimeEngine:
    """ONNX Runtime with graph optimizations on and a recorded intra-op thread count."""

    name = "onnxruntime"
    precisions = PRECISIONS

    def __init__(self, precision: str = "fp32", batch_size: int = 1, resolution: int | None = 224,
                 threads: int | None = 1, device: str | None = None, trt_provider: bool = False,
                 clock: str = "auto") -> None:
        ort = _ort()
        available = set(ort.get_available_providers())
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in available and _torch_sees_cuda() else "cpu"
        self.precision = precision
        self.batch_size = batch_size
        self.resolution = resolution
        self.threads = 1 if threads is None else int(threads)
        if self.threads < 0:
            raise EngineError(f"threads must be >= 0 (0: ONNX Runtime's default), got {threads}")
        if device == "cpu":
            if trt_provider:
                raise EngineError("the TensorRT execution provider runs on a GPU, not with device='cpu'")
            if precision != "fp32":
                raise EngineError(
                    f"onnxruntime on CPU runs fp32 only (asked for {precision}); fp16 needs a GPU "
                    f"provider: {INSTALL_GPU} on a machine with an NVIDIA GPU"
                )
            self.device = "cpu"
            self.provider = "CPUExecutionProvider"
        else:
            index = cuda_index(device)
            self.provider = "TensorrtExecutionProvider" if trt_provider else "CUDAExecutionProvider"
            if self.provider not in available:
                raise EngineError(
                    f"onnxruntime has no {self.provider} here (available: {sorted(available)}); "
                    f"install the GPU build: {INSTALL_GPU}"
                )
            require_cuda(self.name, device)
            self.device = f"cuda:{index}"
        if clock not in CLOCKS:
            raise EngineError(f"clock {clock!r} is not one of {CLOCKS}")
        if clock == "auto":
            clock = "cpu" if self.device == "cpu" and self.threads == 1 else "wall"
        if clock == "cpu" and (self.device != "cpu" or self.threads != 1):
            raise EngineError("clock 'cpu' times the calling thread: it needs the CPU provider and one "
                              f"thread (here: {self.device}, {self.threads} thread(s))")
        self.clock = clock

    def identity(self) -> EngineIdentity:
        clock = "/thread-cpu-time" if self.clock == "cpu" else ""
        return identity_of(self, f"{_ort().__version__}/{self.provider}{clock}", self.threads)

    def _session_options(self) -> Any:
        ort = _ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        return so

    def _providers(self) -> list[Any]:
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        opts: dict[str, Any] = {"device_id": cuda_index(self.device)}
        if self.provider == "TensorrtExecutionProvider":
            trt_opts = dict(opts, trt_fp16_enable=self.precision == "fp16")
            return [("TensorrtExecutionProvider", trt_opts), ("CUDAExecutionProvider", opts)]
        return [("CUDAExecutionProvider", opts)]

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> HostRunner:
        """Export ``module`` through the one ONNX path and open a session for it."""
        if self.precision == "fp16" and self.provider == "CUDAExecutionProvider":
            import copy

            module = copy.deepcopy(module).to(self.device).half()
        return self.prepare_onnx(export_onnx(module, input_shape), input_shape)

    def prepare_onnx(self, model: str | Path | bytes, input_shape: Sequence[int] | None = None) -> HostRunner:
        """A runner for an ONNX model (file or bytes) at ``input_shape`` (symbolic axes need it)."""
        ort = _ort()
        if isinstance(model, (str, Path)):
            path = Path(model)
            if path.suffix != ".onnx":
                raise EngineError(f"onnxruntime runs .onnx files, not {path.name}")
            if not path.is_file():
                raise EngineError(f"no ONNX model at {path}")
            model = path.read_bytes()
        try:
            sess = ort.InferenceSession(model, self._session_options(), providers=self._providers())
        except (RuntimeError, ValueError) as exc:  # ORT's Fail/InvalidGraph derive from these
            raise EngineError(f"onnxruntime cannot load the model: {str(exc).strip()[:300]}") from exc
        inputs = sess.get_inputs()
        if len(inputs) != 1:
            raise EngineError(f"expected a model with one input, this one has {len(inputs)}")
        shape = _resolve_shape(inputs[0].shape, input_shape, self.batch_size)
        dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(dtype)
        outs = sess.run(None, {inputs[0].name: x})
        device_type, device_id = ("cpu", 0) if self.device == "cpu" else ("cuda", cuda_index(self.device))
        x_val = ort.OrtValue.ortvalue_from_numpy(x, device_type, device_id)
        binding = sess.io_binding()
        binding.bind_ortvalue_input(inputs[0].name, x_val)
        out_vals = []
        for meta, out in zip(sess.get_outputs(), outs, strict=True):
            val = ort.OrtValue.ortvalue_from_shape_and_type(list(out.shape), out.dtype, device_type, device_id)
            binding.bind_ortvalue_output(meta.name, val)
            out_vals.append(val)
        state: list[Any] = [sess, binding, x_val, out_vals]

        def run() -> None:
            state[0].run_with_iobinding(state[1])

        runner = ThreadTimedRunner(run, state.clear) if self.clock == "cpu" else HostRunner(run, state.clear)
        runner.output_shapes = [tuple(int(d) for d in o.shape) for o in outs]  # type: ignore[attr-defined]
        return runner

    # -- boundary costs of a standalone subgraph ------------------------------------------

    def boundary_sides(self, model: bytes) -> tuple[int, int]:
        """How many of the graph's inputs ONNX Runtime converts from NCHW into its blocked NCHWc
        layout (``ReorderInput``), and how many tensors it converts back (``ReorderOutput``),
        when it runs this graph alone. A conversion into the blocked layout inside the graph
        (a squeeze-excitation's pooled vector going into its 1x1 conv) is paid inside a whole
        model as well, so it is not counted; one back out of it may be there only because an
        input came in unblocked (a residual add beside a graph input), so all of those are.

        A convolution timed alone pays those conversions once per run. Inside a whole model
        the blocked layout mostly runs from one convolution to the next (residual adds
        included), so they are mostly not paid there; where they are (around a
        squeeze-excitation gate, which runs in NCHW), :meth:`whole_model_conversions` says.
        Read off the optimized graph ONNX Runtime writes for these session settings; (0, 0)
        off the CPU provider.
        """
        if self.device != "cpu":
            return 0, 0
        graph = self._optimized(model)
        inputs = {i.name for i in graph.input}
        nodes = [n for n in graph.node if n.domain == NCHWC]
        return (sum(n.op_type == "ReorderInput" and n.input[0] in inputs for n in nodes),
                sum(n.op_type == "ReorderOutput" for n in nodes))

    def whole_model_conversions(self, model: bytes) -> tuple[set[str], set[str]]:
        """Where a whole model changes layout: the names (as exported, module scopes kept) of
        the nodes ONNX Runtime feeds from a ``ReorderInput``, and of those whose output goes
        to a ``ReorderOutput``. A term whose edge is there pays that conversion inside the
        model too, so it is not a cost of timing it alone. Empty off the CPU provider."""
        if self.device != "cpu":
            return set(), set()
        graph = self._optimized(model)
        reorder_in = {o for n in graph.node if n.domain == NCHWC and n.op_type == "ReorderInput" for o in n.output}
        producer = {o: n for n in graph.node for o in n.output}
        into = {n.name for n in graph.node if any(i in reorder_in for i in n.input)}
        out_of = {producer[n.input[0]].name for n in graph.node
                  if n.domain == NCHWC and n.op_type == "ReorderOutput" and n.input[0] in producer}
        return into, out_of

    def _optimized(self, model: bytes) -> Any:
        """The graph (``onnx.GraphProto``) ONNX Runtime runs for ``model`` with these settings."""
        import tempfile

        import onnx

        ort = _ort()
        with tempfile.TemporaryDirectory() as tmp:
            so = self._session_options()
            so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            ort.InferenceSession(model, so, providers=self._providers())
            return onnx.load(so.optimized_model_filepath).graph

    def boundary_probe(self, shape: Sequence[int]) -> bytes | None:
        """An ONNX graph that converts an NCHW tensor of ``shape`` to NCHWc and back: what a
        standalone subgraph pays at one edge, twice (both directions, once each). None for a
        tensor that is not 4-D (a pooled head's output) or whose channels ONNX Runtime does not
        block (not a multiple of 4): the conversion it stands for is of negligible size."""
        if len(shape) != 4 or shape[1] % 4:
            return None
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))
        y = helper.make_tensor_value_info("output", TensorProto.FLOAT, list(shape))
        nodes = [helper.make_node("ReorderInput", ["input"], ["blocked"], domain=NCHWC),
                 helper.make_node("ReorderOutput", ["blocked"], ["output"], domain=NCHWC, channels=int(shape[1]))]
        graph = helper.make_graph(nodes, "boundary", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(NCHWC, 1)])
        return model.SerializeToString()


class ThreadTimedRunner(HostRunner):
    """A host runner timed by the CPU time of the calling thread (``time.thread_time``)."""

    clock_name = "thread-cpu"

    def timed(self, iters: int) -> list[float]:
        out = []
        run, clock = self._fn, time.thread_time_ns
        for _ in range(iters):
            t0 = clock()
            run()
            out.append((clock() - t0) / 1e6)
        return out


def _resolve_shape(model_shape: Sequence[Any], asked: Sequence[int] | None, batch: int) -> tuple[int, ...]:
    if asked is not None:
        asked = tuple(int(s) for s in asked)
        if len(asked) != len(model_shape) or any(
                isinstance(m, int) and m != a for m, a in zip(model_shape, asked, strict=True)):
            raise EngineError(f"input shape {asked} does not fit the model's input {list(model_shape)}")
        return asked
    out = []
    for i, m in enumerate(model_shape):
        if isinstance(m, int) and m > 0:
            out.append(m)
        elif i == 0:
            out.append(batch)
        else:
            raise EngineError(f"the model's input {list(model_shape)} has a symbolic axis {i}; "
                              "give the input shape")
    return tuple(out)


def _torch_sees_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())
