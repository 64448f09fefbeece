"""benchmarks.thread_clock: its passes, each with and without spinners, and its bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mdp_trt.cli import run_cli


def test_passes_print_dense_pruned_and_paired_speedup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.thread_clock import main

    argv = ["--model", "test_resnet", "--resolution", "32", "--spinners", "0", "1", "--rounds", "2",
            "--out", str(tmp_path)]
    assert run_cli(main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("test_resnet@32, ONNX Runtime, 1 thread, thread clock")
    passes = [re.fullmatch(r"spinners (\d): dense ([\d.]+) ms, pruned ([\d.]+) ms, speedup ([\d.]+)x, load [\d.]+", ln)
              for ln in lines[1:]]
    assert [m.group(1) for m in passes if m] == ["0", "1"]
    for m in passes:
        assert m is not None and float(m.group(2)) > 0 and float(m.group(3)) > 0 and float(m.group(4)) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_resnet-r32-dense.onnx", "test_resnet-r32-mid.onnx"]


def test_bad_counts_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.thread_clock import main

    assert run_cli(main, ["--spinners", "-1"]) == 1
    assert "--spinners must be >= 0 and --rounds >= 1" in capsys.readouterr().err
