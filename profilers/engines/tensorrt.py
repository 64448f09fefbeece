"""TensorRT 10+ through its Python API, kept thin.

ONNX -> ``trt.OnnxParser`` -> builder config (precision flag, optimization level, workspace
limit, timing cache) -> serialized engine -> runtime -> execution context. The timing cache
is a file per GPU and TensorRT version under the cache folder (``cache_dir``, else
``$MDP_TRT_CACHE``, else ``~/.cache/mdp_trt``), loaded before every build and saved after,
so repeated builds of similar subgraphs skip kernel auto-tuning.

I/O buffers are torch CUDA tensors bound with ``set_tensor_address``; inputs are filled
once. ``execute_async_v3`` is captured into a CUDA graph on a torch stream and replayed;
timing uses CUDA events and copies nothing between host and device (as ``trtexec
--noDataTransfers --useCudaGraph``). Engines that cannot be captured run without a graph.

``tensorrt`` is imported only when the engine is created: without it the engine says which
extra to install.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mdp_common.errors import EngineError
from profilers.engines.base import EngineIdentity, cuda_index, gpu_name, identity_of, require_cuda
from profilers.export import export_onnx, write_atomic

if TYPE_CHECKING:
    import tensorrt as trt

    from profilers.engines.cuda import CudaRunner

PRECISIONS = ("fp32", "fp16", "bf16")
INSTALL = "pip install 'mdp-trt[tensorrt]'"
MIN_MAJOR = 10


def require_tensorrt() -> str:
    """The installed TensorRT version, or an EngineError saying how to install it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError(
            f"the tensorrt engine needs TensorRT {MIN_MAJOR}+ and it is not installed: {INSTALL} "
            "(on a machine with an NVIDIA GPU and driver)"
        ) from exc
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str):  # only the type stubs (a namespace package) are installed
        raise EngineError(
            f"the tensorrt engine needs TensorRT {MIN_MAJOR}+ and only its type stubs are installed: "
            f"{INSTALL} (on a machine with an NVIDIA GPU and driver)"
        )
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_MAJOR:
        raise EngineError(f"TensorRT {version} is installed; the tensorrt engine needs {MIN_MAJOR}+: {INSTALL}")
    return version


def default_cache_dir() -> Path:
    env = os.environ.get("MDP_TRT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mdp_trt"


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT ``Dims`` as a tuple of ints (-1 marks a symbolic axis)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.UINT8: torch.uint8,
    }
    if dtype not in table:
        raise EngineError(f"TensorRT tensor type {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTEngine:
    """TensorRT engines built from ONNX, timed as CUDA-graph replays with CUDA events."""

    name = "tensorrt"
    precisions = PRECISIONS

    def __init__(self, precision: str = "fp16", batch_size: int = 1, resolution: int | None = 224,
                 threads: int | None = None, device: str | None = None, optimization_level: int = 3,
                 workspace_mb: int = 4096, cache_dir: str | Path | None = None,
                 cuda_graphs: bool = True) -> None:
        self.version = require_tensorrt()
        if precision not in PRECISIONS:
            raise EngineError(f"precision {precision!r} is not one of {PRECISIONS} for tensorrt")
        if threads is not None:
            raise EngineError("threads do not apply to the tensorrt engine")
        if not 0 <= optimization_level <= 5:
            raise EngineError(f"optimization level must be 0..5, got {optimization_level}")
        if workspace_mb < 1:
            raise EngineError(f"workspace must be at least 1 MiB, got {workspace_mb}")
        self.device = f"cuda:{require_cuda(self.name, device or 'cuda')}"
        self.precision = precision
        self.batch_size = batch_size
        self.resolution = resolution
        self.optimization_level = optimization_level
        self.workspace_mb = workspace_mb
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cuda_graphs = cuda_graphs

    def identity(self) -> EngineIdentity:
        return identity_of(self, f"{self.version}/opt{self.optimization_level}", None)

    def timing_cache_path(self) -> Path:
        """One timing-cache file per GPU model and TensorRT version."""
        from profilers.device_label import normalize_gpu_name

        label = normalize_gpu_name(gpu_name(cuda_index(self.device)))
        return self.cache_dir / f"timing-{label}-trt{self.version}.cache"

    # -- building -----------------------------------------------------------------------

    def build(self, onnx: bytes, input_shape: Sequence[int] | None = None) -> bytes:
        """Serialized engine for an ONNX model; symbolic input axes are fixed to ``input_shape``."""
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(cuda_index(self.device)):
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse(onnx):
                errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise EngineError("TensorRT cannot parse the ONNX model: " + "; ".join(errors[:5]))
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
            config.builder_optimization_level = self.optimization_level
            if self.precision == "fp16":
                config.set_flag(trt.BuilderFlag.FP16)
            elif self.precision == "bf16":
                config.set_flag(trt.BuilderFlag.BF16)
            self._add_profile(builder, network, config, input_shape)
            self._load_timing_cache(config)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise EngineError(
                    f"TensorRT could not build an engine ({self.precision}, optimization level "
                    f"{self.optimization_level}, workspace {self.workspace_mb} MiB); see its log above"
                )
            self._save_timing_cache(config)
            return bytes(memoryview(serialized))

    def _add_profile(self, builder: trt.Builder, network: trt.INetworkDefinition,
                     config: trt.IBuilderConfig, input_shape: Sequence[int] | None) -> None:
        import tensorrt as trt

        dynamic = []
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if any(d < 0 for d in _dims(tensor.shape)):
                dynamic.append(tensor.name)
        if not dynamic:
            return
        if input_shape is None or len(dynamic) != 1:
            raise EngineError(f"the ONNX model has symbolic input axes ({dynamic}); give one input shape")
        shape = trt.Dims(list(input_shape))
        profile = builder.create_optimization_profile()
        profile.set_shape(dynamic[0], shape, shape, shape)
        config.add_optimization_profile(profile)

    def _load_timing_cache(self, config: trt.IBuilderConfig) -> None:
        path = self.timing_cache_path()
        data = b""
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
        cache = config.create_timing_cache(data)
        if cache is None:  # unreadable or from another build of TensorRT: start afresh
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    def _save_timing_cache(self, config: trt.IBuilderConfig) -> None:
        path = self.timing_cache_path()
        cache = config.get_timing_cache()
        if path.is_file():  # another process may have added to it since we loaded it
            other = config.create_timing_cache(path.read_bytes())
            if other is not None:
                cache.combine(other, ignore_mismatch=True)
        write_atomic(path, bytes(memoryview(cache.serialize())))

    def save_engine(self, onnx_path: str | Path, input_shape: Sequence[int] | None,
                    engine_path: str | Path) -> Path:
        """Build an engine from an ONNX file and write it (atomically) to ``engine_path``."""
        src = Path(onnx_path)
        if not src.is_file():
            raise EngineError(f"no ONNX model at {src}")
        out = Path(engine_path)
        write_atomic(out, self.build(src.read_bytes(), input_shape))
        return out

    # -- running ------------------------------------------------------------------------

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> CudaRunner:
        """Export ``module`` through the one ONNX path, build an engine, bind buffers."""
        onnx = export_onnx(module, input_shape)
        return self.load(self.build(onnx, input_shape), input_shape)

    def prepare_onnx(self, model: str | Path | bytes, input_shape: Sequence[int] | None = None
                     ) -> CudaRunner:
        """A runner for an ``.onnx`` file (built now), an ``.engine`` file, or ONNX bytes."""
        if isinstance(model, bytes):
            return self.load(self.build(model, input_shape), input_shape)
        path = Path(model)
        if path.suffix not in (".onnx", ".engine", ".plan"):
            raise EngineError(f"tensorrt runs .onnx and .engine files, not {path.name}")
        if not path.is_file():
            raise EngineError(f"no such file: {path}")
        data = path.read_bytes()
        if path.suffix == ".onnx":
            data = self.build(data, input_shape)
        return self.load(data, input_shape)

    def load(self, serialized: bytes, input_shape: Sequence[int] | None = None) -> CudaRunner:
        """Deserialize an engine and bind torch CUDA tensors as its I/O buffers."""
        import tensorrt as trt

        from profilers.engines.cuda import CudaRunner, capture_graph

        index = cuda_index(self.device)
        dev = torch.device(self.device)
        logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(index):
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(serialized)
            if engine is None:
                raise EngineError("TensorRT cannot load this engine (built by another TensorRT "
                                  "version or for another GPU?)")
            context = engine.create_execution_context()
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            for name in inputs:
                shape = _dims(engine.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    if input_shape is None:
                        raise EngineError(f"engine input {name} has symbolic axes {shape}; give the input shape")
                    context.set_input_shape(name, tuple(int(s) for s in input_shape))
                elif input_shape is not None and len(inputs) == 1 and shape != tuple(input_shape):
                    raise EngineError(f"the engine's input {name} is {shape}, not {tuple(input_shape)}")
            buffers: list[torch.Tensor] = []
            for name in names:
                shape = _dims(context.get_tensor_shape(name))
                dtype = _torch_dtype(engine.get_tensor_dtype(name))
                if dtype.is_floating_point and name in inputs:
                    t = torch.randn(shape, device=dev).to(dtype)
                else:
                    t = torch.zeros(shape, device=dev, dtype=dtype)
                buffers.append(t)
                if not context.set_tensor_address(name, t.data_ptr()):
                    raise EngineError(f"TensorRT refused the buffer for tensor {name}")
            stream = torch.cuda.Stream(device=dev)
            handle = stream.cuda_stream

            def launch() -> None:
                if not context.execute_async_v3(handle):
                    raise EngineError("TensorRT execution failed; see its log above")

            keep = (runtime, engine, context, buffers)
            if not self.cuda_graphs:
                stream.wait_stream(torch.cuda.current_stream(dev))
                return CudaRunner(launch, stream, keep=keep)
            try:
                graph = capture_graph(launch, stream)
            except RuntimeError:  # capture refused (e.g. data-dependent shapes): run without a graph
                torch.cuda.synchronize(dev)
                return CudaRunner(launch, stream, keep=keep)
            replay: Callable[[], None] = graph.replay
            return CudaRunner(replay, stream, keep=(*keep, graph))
