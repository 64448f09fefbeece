"""The TensorRT engine: type-checked against the TensorRT stubs here, run where TensorRT is.

The ``tensorrt-stubs`` package ships its stubs without a ``py.typed`` marker and with a few
lines that are not valid Python, so a plain ``mypy profilers/engines/tensorrt.py`` sees
``tensorrt`` as untyped (everything ``Any``). The first test copies the stubs to a scratch
folder, repairs those lines, and type-checks the engine against them for real, together
with a deliberately wrong call that must be caught.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mdp_trt.errors import EngineError

ROOT = Path(__file__).resolve().parents[1]


def _stub_root() -> Path | None:
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == "tensorrt/__init__.pyi":
            return Path(str(dist.locate_file(f))).parent.parent
    return None


def _repaired_stubs(dest: Path) -> Path:
    src = _stub_root()
    assert src is not None
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(src / pkg, dest / pkg)
    init = dest / "tensorrt" / "__init__.pyi"
    init.write_text(re.sub(r"^import tensorrt_libs as tensorrt_libs$", "", init.read_text(), flags=re.M))
    for pyi in (dest / "tensorrt_bindings").glob("*.pyi"):
        text = pyi.read_text()
        text = re.sub(r"\bin: ", "in_: ", text)  # a parameter named `in`
        text = re.sub(r", channel_axis: int\)", ", channel_axis: int = ...)", text)
        pyi.write_text(text)
    return dest


@pytest.mark.skipif(_stub_root() is None, reason="tensorrt-stubs is not installed (make setup installs it)")
def test_tensorrt_engine_type_checks_against_the_stubs(tmp_path: Path) -> None:
    stubs = _repaired_stubs(tmp_path / "typings")
    wrong = tmp_path / "wrong_use.py"
    wrong.write_text(
        "import tensorrt as trt\n\n\n"
        "def f(config: trt.IBuilderConfig) -> None:\n"
        "    config.set_flag('FP16')\n"
    )
    cfg = tmp_path / "mypy.ini"
    cfg.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\nfollow_imports = silent\n"
        f"mypy_path = {stubs}\ncache_dir = {ROOT / '.mypy_cache' / 'tensorrt-stubs'}\n"
        "[mypy-tensorrt.*]\nignore_errors = True\n[mypy-tensorrt_bindings.*]\nignore_errors = True\n"
    )
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(cfg),
                        "profilers/engines/tensorrt.py", str(wrong)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert "prevented further checking" not in out, out
    engine_errors = [line for line in out.splitlines() if line.startswith("profilers/engines/tensorrt.py")]
    assert engine_errors == [], out
    assert re.search(r"wrong_use\.py:5: error: .*\"set_flag\".*BuilderFlag", out), out


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
