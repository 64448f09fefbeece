"""trtexec-style statistics of an exported model on an engine.

    python -m benchmarks.engine model.onnx --engine onnxruntime [--batch-size 1]
        [--warmup-ms 200] [--duration-s 3] [--clock auto] [--json]
    python -m benchmarks.engine model.engine --engine tensorrt
    python -m benchmarks.engine model.xml --engine openvino

Warms up for ``--warmup-ms``, then runs back to back for about ``--duration-s`` seconds and
reports throughput (inferences per second, and images per second at the batch size) and
the latency distribution: min, mean, median, p90, p95, p99, max. Host latency is the wall
time of one synchronous call. Where the engine has a device clock (TensorRT, torch on a
GPU), GPU compute time is measured separately with CUDA events over back-to-back
inferences, without host/device copies; it is what the top-level ``*_ms`` keys report then,
and host latency goes under ``host``. Likewise where the engine times by the calling thread's
CPU time (onnxruntime and openvino on one CPU thread, ``--clock auto`` or ``cpu``): the
top-level keys are that clock's (``clock: thread-cpu``), the wall clock's under ``host``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mdp_trt.errors import MdpError

SUFFIXES = {"onnxruntime": (".onnx",), "openvino": (".onnx", ".xml"),
            "tensorrt": (".onnx", ".engine", ".plan")}


def _stats(t: Any, batch: int) -> dict[str, float]:
    return {
        "throughput": batch * 1e3 / t.mean_ms,
        "qps": 1e3 / t.mean_ms,
        "mean_ms": t.mean_ms,
        "median_ms": t.median_ms,
        "p90_ms": t.p90_ms,
        "p95_ms": t.p95_ms,
        "p99_ms": t.p99_ms,
        "min_ms": t.min_ms,
        "max_ms": t.max_ms,
        "cv": t.cv,
        "samples": t.samples,
    }


def onnx_input_shape(path: Path, batch_size: int) -> tuple[int, ...]:
    """The input shape of a one-input ONNX file; a symbolic first axis takes ``batch_size``."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as exc:
        raise MdpError(f"cannot read ONNX model {path}: {exc}") from exc
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise MdpError(f"{path} has {len(inputs)} inputs; benchmarks.engine runs one-input models")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(int(d.dim_value))
        elif i == 0:
            shape.append(batch_size)
        else:
            raise MdpError(f"{path}: input axis {i} is symbolic ({d.dim_param!r}); only the batch may be")
    return tuple(shape)


def benchmark(path: Path, engine_name: str, batch_size: int = 1, warmup_ms: float = 200.0,
              duration_s: float = 3.0, device: str | None = None, clock: str = "auto") -> dict[str, Any]:
    """Statistics of one model file on one engine (see the module docstring)."""
    from profilers.engines import clock_options, get_engine
    from profilers.timing import measure_for

    if engine_name not in SUFFIXES:
        raise MdpError(f"benchmarks.engine runs model files on {', '.join(SUFFIXES)}, not {engine_name!r}")
    if not path.is_file():
        raise MdpError(f"no such file: {path}")
    if path.suffix not in SUFFIXES[engine_name]:
        raise MdpError(f"{engine_name} runs {' or '.join(SUFFIXES[engine_name])} files, not {path.name}")
    if batch_size < 1 or duration_s <= 0 or warmup_ms < 0:
        raise MdpError("need --batch-size >= 1, --duration-s > 0 and --warmup-ms >= 0")
    options: dict[str, Any] = dict(clock_options(engine_name, clock))
    engine = get_engine(engine_name, batch_size=batch_size, resolution=None, device=device, **options)
    shape = onnx_input_shape(path, batch_size) if path.suffix == ".onnx" else None
    runner = engine.prepare_onnx(path, shape)
    try:
        device_timing = None
        if runner.timed(1) is not None:
            device_timing = measure_for(runner, warmup_ms, duration_s, device_clock=True)
        host = measure_for(runner, warmup_ms, duration_s, device_clock=False)
    finally:
        runner.close()
    main = device_timing or host
    out: dict[str, Any] = {"file": str(path), "batch_size": batch_size,
                           "clock": device_timing.clock if device_timing else "host", **_stats(main, batch_size)}
    if device_timing is not None:
        out["host"] = _stats(host, batch_size)
    out["identity"] = engine.identity().to_dict()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path,
                   help=".onnx (onnxruntime, openvino, tensorrt), .xml IR (openvino) or .engine (tensorrt)")
    p.add_argument("--engine", default="onnxruntime", help=f"one of {', '.join(SUFFIXES)}")
    p.add_argument("--batch-size", type=int, default=1,
                   help="batch of symbolic batch axes (a fixed batch in the file wins)")
    p.add_argument("--warmup-ms", type=float, default=200.0)
    p.add_argument("--duration-s", type=float, default=3.0)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:<index> (default: the engine's)")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="auto (default: onnxruntime or openvino on one CPU thread also by that thread's CPU "
                        "time), wall, or cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = benchmark(args.path, args.engine, args.batch_size, args.warmup_ms, args.duration_s, args.device,
                  args.clock)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    ident = r["identity"]
    print(f"{r['file']} on {ident['engine']} {ident['version']}, {ident['device']}, "
          f"batch {r['batch_size']}")
    titles = {"device": "GPU compute", "thread-cpu": "Thread CPU time"}
    blocks = [(titles.get(r["clock"], "Latency"), r)]
    if "host" in r:
        blocks.append(("Host latency", r["host"]))
    print(f"Throughput: {r['qps']:.2f} qps ({r['throughput']:.1f} images/s)")
    for title, s in blocks:
        print(f"{title}: min = {s['min_ms']:.4f} ms, max = {s['max_ms']:.4f} ms, "
              f"mean = {s['mean_ms']:.4f} ms, median = {s['median_ms']:.4f} ms, "
              f"percentile(90%) = {s['p90_ms']:.4f} ms, percentile(95%) = {s['p95_ms']:.4f} ms, "
              f"percentile(99%) = {s['p99_ms']:.4f} ms ({s['samples']} samples, CV {s['cv']:.3f})")
    return 0


if __name__ == "__main__":
    from mdp_trt.cli import run_cli

    sys.exit(run_cli(main))
