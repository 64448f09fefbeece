"""The TensorRT engine: type-checked against the TensorRT stubs here, run where TensorRT is.

``make test`` type-checks the engine with :mod:`typecheck_tensorrt` (repaired stubs and a
canary). The first test shows that check catches a misuse planted in the engine itself, and
nothing else in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typecheck_tensorrt import ENGINE, check, stub_root

from mdp_trt.errors import EngineError


@pytest.mark.skipif(stub_root() is None, reason="tensorrt-stubs is not installed (make setup installs it)")
def test_type_check_reports_a_misuse_planted_in_the_engine(tmp_path: Path) -> None:
    good = "config.set_flag(trt.BuilderFlag.FP16)"
    text = ENGINE.read_text()
    assert text.count(good) == 1
    line = text[:text.index(good)].count("\n") + 1
    planted = tmp_path / "planted_tensorrt.py"
    planted.write_text(text.replace(good, 'config.set_flag("FP16")'))
    errors = [e for e in check([planted]) if ": error: " in e]
    assert len(errors) == 1, errors
    # By name: mypy's cache gives a file it has seen with the same content under its first path.
    assert f"{planted.name}:{line}: error: " in errors[0] and '"set_flag"' in errors[0], errors
    assert '"str"; expected "BuilderFlag"' in errors[0], errors


# -- runtime, where TensorRT and a GPU are present ----------------------------------------------


def _have_tensorrt() -> str:
    from profilers.engines.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except EngineError as exc:
        return str(exc)
    if not torch.cuda.is_available():
        return "TensorRT is installed but torch sees no CUDA device"
    return ""


_WHY_NOT = _have_tensorrt()
needs_trt = pytest.mark.skipif(bool(_WHY_NOT), reason=f"needs TensorRT and a GPU: {_WHY_NOT}")


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1)).eval()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.tensorrt
@needs_trt
def test_build_run_and_time(tmp_path: Path, precision: str) -> None:
    from profilers.engines import get_engine
    from profilers.timing import Budget, measure

    e = get_engine("tensorrt", precision=precision, resolution=32, cache_dir=tmp_path)
    r = e.prepare(_net(), (2, 3, 32, 32))
    try:
        t = measure(r, Budget(warmup_ms=5, repeats=3, repeat_ms=5))
        assert t.clock == "device" and 0 < t.median_ms < 100
    finally:
        r.close()
    assert e.timing_cache_path().is_file() and e.timing_cache_path().stat().st_size > 0
    ident = e.identity()
    assert ident.engine == "tensorrt" and ident.precision == precision and ident.threads is None


@pytest.mark.tensorrt
@needs_trt
def test_engine_file_round_trip_and_parser_errors(tmp_path: Path) -> None:
    from profilers.engines import get_engine
    from profilers.export import export_onnx

    e = get_engine("tensorrt", precision="fp16", resolution=32, cache_dir=tmp_path)
    onnx_path = tmp_path / "m.onnx"
    export_onnx(_net(), (1, 3, 32, 32), onnx_path, dynamic_batch=True)
    engine_path = e.save_engine(onnx_path, (4, 3, 32, 32), tmp_path / "m.engine")
    r = e.prepare_onnx(engine_path, (4, 3, 32, 32))
    try:
        r()
        times = r.timed(5)
        assert times is not None and len(times) == 5 and all(v > 0 for v in times)
    finally:
        r.close()
    with pytest.raises(EngineError, match="cannot parse"):
        e.build(b"not an onnx model")
