"""The profile and device-label command lines: bad input gives one line and exit code 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdp_trt.cli import run_cli
from mdp_trt.errors import MdpError
from mdp_trt.profile import main
from profilers.device_label import check_label, device_label, normalize_gpu_name

ROOT = Path(__file__).resolve().parents[1]


def _fails_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert run_cli(main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_unknown_engine(capsys: pytest.CaptureFixture[str]) -> None:
    _fails_with_one_line(capsys, ["--model", "resnet18", "--engine", "mxnet"],
                         "accepted: onnxruntime, openvino, tensorrt, torch")


def test_unknown_precision(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails_with_one_line(capsys, ["--model", "test_resnet", "--precision", "int4", "--out",
                                  str(tmp_path / "t.sqlite")], "accepted: fp32, fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU label")
def test_gpu_label_mismatch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails_with_one_line(capsys, ["--model", "test_resnet", "--gpu", "a100", "--out",
                                  str(tmp_path / "t.sqlite")], "does not match the device")
    assert not (tmp_path / "t.sqlite").exists()


def test_bad_shard(capsys: pytest.CaptureFixture[str]) -> None:
    _fails_with_one_line(capsys, ["--model", "test_resnet", "--shard", "2/2"], "shard")


def test_merge_refuses_missing_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails_with_one_line(capsys, ["merge", str(tmp_path / "out.sqlite"), str(tmp_path / "nope.sqlite")],
                         "no latency table")


def test_process_exit_code_and_no_traceback() -> None:
    r = subprocess.run([sys.executable, "-m", "mdp_trt.profile", "--model", "resnet18", "--engine", "nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_gpu_names_normalize() -> None:
    assert normalize_gpu_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert normalize_gpu_name("NVIDIA H100 80GB HBM3") == "h100"
    assert normalize_gpu_name("NVIDIA GeForce RTX 4090") == "rtx4090"
    assert normalize_gpu_name("Tesla T4") == "t4"
    assert normalize_gpu_name("NVIDIA L40S") == "l40s"


def test_cpu_label() -> None:
    assert device_label("cpu") == "cpu"
    assert check_label("CPU", "cpu") == "cpu"
    with pytest.raises(MdpError, match="does not match"):
        check_label("h100", "cpu")


def test_profile_a_tiny_model_then_rerun(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import json

    from profilers.table import LatencyTable

    out = tmp_path / "t.sqlite"
    argv = ["--model", "test_resnet", "--resolution", "32", "--max-choices", "2", "--out", str(out),
            "--no-progress", "--json"]
    assert run_cli(main, argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["measured"] == first["grid_points"] > 0 and first["reused"] == 0
    with LatencyTable.read(out) as t:
        assert len(t) == first["grid_points"]
        assert t.identity.resolution == 32 and t.identity.engine == "onnxruntime"
    assert run_cli(main, argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["measured"] == 0 and again["reused"] == first["grid_points"]
    # The default on one CPU thread is the thread clock; the same table under the wall clock
    # is another identity: refused, with one line.
    assert first["identity"]["version"].endswith("/thread-cpu-time")
    assert run_cli(main, [*argv, "--clock", "wall"]) == 1
    assert "another engine identity" in capsys.readouterr().err
