"""The prune command: bad input gives one line and exit 1; a full run writes every output.

Bad input is run in-process (``main(argv)`` under :func:`run_cli`, as ``python -m`` runs it);
one case runs as a process to check that wiring, and torchrun starts real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdp_trt import load_pruned
from mdp_trt.cli import run_cli
from mdp_trt.prune import main as prune_main
from mdp_trt.report import EXIT_CODES, outcome

TINY = ["--model", "test_resnet", "--resolution", "32", "--max-choices", "4", "--calibration-plans", "4",
        "--importance-batches", "2", "--train-batch-size", "8", "--train-limit", "32", "--val-limit", "16",
        "--quiet"]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str) -> None:
    """The prune command on ``argv`` exits 1 with one line ``error: ...`` holding ``pattern``."""
    code = run_cli(prune_main, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete run on a tiny model with a shared table (reused by the other tests)."""
    root = tmp_path_factory.mktemp("prune")
    out = root / "out"
    code = prune_main([*TINY, "--engine-target", "1.3x", "--lut", str(root / "t.sqlite"),
                       "--finetune-epochs", "1", "--out", str(out)])
    # The exit status is the outcome the report states (a tiny model may land off target).
    assert code == EXIT_CODES[outcome(json.loads((out / "report.json").read_text()))]
    return root


def test_full_run_writes_every_output(full_run: Path) -> None:
    out = full_run / "out"
    for name in ("plan.json", "pruned.pt", "model.onnx", "report.json", "report.md", "blocks.png", "widths.png"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "report.json").read_text())
    for key in ("dense_ms", "pruned_ms", "predicted_ms", "speedup", "target", "engine", "params_before",
                "params_after", "flops_before", "flops_after", "blocks", "rounds"):
        assert key in rep, key
    for key in ("engine", "version", "device", "precision", "batch_size", "resolution", "threads"):
        assert key in rep["engine"], key
    assert rep["params_after"] < rep["params_before"]
    chosen = next(r for r in rep["rounds"] if r.get("chosen"))
    # The speedup is the median of dense / pruned paired round by round, near the ratio of medians.
    assert rep["speedup"] == chosen["speedup"] == pytest.approx(rep["dense_ms"] / rep["pruned_ms"], rel=0.1)
    assert rep["measurement"] == chosen["measurement"] and rep["measurement"]["rounds"] >= 5
    model = load_pruned(out / "pruned.pt")
    assert sum(p.numel() for p in model.parameters()) == rep["params_after"]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
    assert not list(full_run.glob(".out.*")), "temporary directory left behind"
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask(), "the output directory keeps mkdtemp's mode"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_existing_output_is_refused(capsys: pytest.CaptureFixture[str], full_run: Path) -> None:
    one_line_error(capsys, [*TINY, "--engine-target", "1.3x", "--lut", str(full_run / "t.sqlite"),
                            "--out", str(full_run / "out")], "exists")


def test_unknown_model_as_a_process(tmp_path: Path) -> None:
    """``python -m mdp_trt.prune`` itself: exit code 1, one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "mdp_trt.prune", "--model", "resnet_nope", "--engine-target", "2x",
                           "--out", "o"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "unknown timm model" in lines[0] and not (tmp_path / "o").exists()


def test_bad_target(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    one_line_error(capsys, [*TINY, "--engine-target", "fast", "--out", str(tmp_path / "o")], "target")


def test_unreachable_target_says_what_is_achievable(capsys: pytest.CaptureFixture[str], full_run: Path,
                                                    tmp_path: Path) -> None:
    one_line_error(capsys, [*TINY, "--engine-target", "500x", "--lut", str(full_run / "t.sqlite"),
                            "--out", str(tmp_path / "o")], "fastest")
    assert not (tmp_path / "o").exists()


def test_table_of_another_identity_is_refused(capsys: pytest.CaptureFixture[str], full_run: Path,
                                              tmp_path: Path) -> None:
    one_line_error(capsys, [*TINY, "--batch-size", "2", "--engine-target", "2x", "--lut",
                            str(full_run / "t.sqlite"), "--out", str(tmp_path / "o")], "identity")


def test_missing_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    one_line_error(capsys, [*TINY, "--engine-target", "2x", "--data", str(tmp_path / "nope"),
                            "--out", str(tmp_path / "o")], "does not exist")


def test_checkpoint_that_does_not_fit(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, bad)
    one_line_error(capsys, [*TINY, "--engine-target", "2x", "--checkpoint", str(bad), "--out", str(tmp_path / "o")],
                   "does not fit")
    one_line_error(capsys, [*TINY, "--engine-target", "2x", "--checkpoint", str(tmp_path / "x.pt"),
                            "--out", str(tmp_path / "o")], "does not exist")


def test_torchrun_two_processes_fine_tune_together(full_run: Path, tmp_path: Path) -> None:
    """Under torchrun the first process does the job and the second joins its fine-tuning
    (DistributedDataParallel on gloo): one report, written once, that counts both processes."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "mdp_trt.prune", *TINY, "--engine-target", "1.3x", "--lut", str(full_run / "t.sqlite"),
         "--finetune-epochs", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert (out / "report.json").is_file(), proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    # The first process exits with the outcome's status; torchrun turns any non-zero one into 1.
    assert (proc.returncode == 0) == (EXIT_CODES[outcome(rep)] == 0), proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1, proc.stdout
    assert rep["finetune"] == {"epochs": 1.0, "processes": 2}
    assert load_pruned(out / "pruned.pt")(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


def test_synthetic_labels_of_a_model_without_classifier_at_its_own_input_size() -> None:
    """A ViT-like model with ``num_classes=0`` (timm's EVA-02 MIM weights) takes only its own
    input size: the label count is its pooled width, read at that size."""
    import timm

    from mdp_trt.pipeline import _num_classes

    vit = timm.create_model("vit_tiny_patch16_224", img_size=48, num_classes=0, depth=2).eval()
    assert _num_classes(vit, (3, 48, 48)) == vit.embed_dim
    assert _num_classes(timm.create_model("resnet18", num_classes=7), (3, 32, 32)) == 7
