"""benchmarks.engine: trtexec-style statistics of an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.engine import main
from mdp_trt.cli import run_cli
from profilers.export import export_onnx

KEYS = ("throughput", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "min_ms", "max_ms")


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "small.onnx"
    export_onnx(m, (1, 3, 16, 16), path, dynamic_batch=True)
    return path


def test_json_keys_and_consistent_statistics(onnx_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_cli(main, [str(onnx_file), "--engine", "onnxruntime", "--batch-size", "2",
                        "--warmup-ms", "20", "--duration-s", "0.3", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    for k in KEYS:
        assert isinstance(r[k], float) and r[k] > 0, k
    assert r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["throughput"] == pytest.approx(2 * 1e3 / r["mean_ms"])
    assert r["batch_size"] == 2 and r["identity"]["engine"] == "onnxruntime"
    assert r["identity"]["batch_size"] == 2 and r["clock"] == "thread-cpu" and "host" in r


def test_text_output(onnx_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(main, [str(onnx_file), "--warmup-ms", "10", "--duration-s", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "Throughput:" in out and "percentile(99%)" in out
    assert "Thread CPU time:" in out and "Host latency:" in out  # one thread: both clocks
    assert run_cli(main, [str(onnx_file), "--warmup-ms", "10", "--duration-s", "0.1", "--clock", "wall",
                          "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["clock"] == "host" and "host" not in r


@pytest.mark.parametrize(("name", "needle"), [("missing.onnx", "no such file"), ("model.pt", "runs .onnx")])
def test_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, needle: str) -> None:
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({}, path)
    assert run_cli(main, [str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_tensorrt_without_tensorrt_says_what_to_install(onnx_file: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from mdp_trt.errors import EngineError
    from profilers.engines.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except EngineError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    assert run_cli(main, [str(onnx_file), "--engine", "tensorrt"]) == 1
    assert "mdp-trt[tensorrt]" in capsys.readouterr().err
