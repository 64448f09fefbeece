"""Bad input and faults met by a new user: each gives one line on stderr and exit code 1 (143 for
SIGTERM), and loses nothing: tables keep what they held, no output or temporary directory stays."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from mdp_trt.api import load_pruned
from mdp_trt.cli import run_cli
from mdp_trt.errors import MdpError
from mdp_trt.inspect import main as inspect_main
from mdp_trt.profile import main as profile_main
from mdp_trt.prune import OWNER, remove_stale_temp_dirs
from mdp_trt.prune import main as prune_main
from mdp_trt.report import EXIT_CODES
from profilers.export import current_umask, write_atomic
from profilers.table import LatencyTable

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "test_resnet", "--resolution", "32", "--max-choices", "2", "--calibration-plans", "2",
         "--max-rounds", "1", "--importance-batches", "1", "--train-batch-size", "8", "--train-limit", "16",
         "--val-limit", "8", "--engine-target", "1.2x", "--quiet"]

OUTCOMES = set(EXIT_CODES.values())
Main = Callable[[Sequence[str] | None], int]


def fails_with_one_line(capsys: pytest.CaptureFixture[str], main: Main, argv: list[str], needle: str) -> str:
    """Run a command line in-process: exit code 1 and one line ``error: ...`` holding ``needle``."""
    code = run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (code, err)
    return err[0]


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latency table complete for :data:`SMALL`, with its whole-model measurements (one prune run)."""
    root = tmp_path_factory.mktemp("complete")
    # Any outcome writes every output (on target, missed, over-pruned, or unreliable on a busy machine).
    assert prune_main([*SMALL, "--lut", str(root / "t.sqlite"), "--out", str(root / "out")]) in OUTCOMES
    return root / "t.sqlite"


@pytest.fixture
def table(complete: Path, tmp_path: Path) -> Path:
    """A private copy of the complete table."""
    path = tmp_path / "t.sqlite"
    shutil.copy(complete, path)
    return path


def _edit(path: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        assert conn.execute(sql, args).rowcount == 1
    conn.close()


def _content(path: Path) -> list[str]:
    """Every row of every table in the file, as SQL."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _nothing_left(tmp_path: Path, out: Path) -> None:
    assert not out.exists(), "an output directory was written"
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary directory stayed"


@pytest.mark.parametrize("value", [float("inf"), "NaN", "fast", -0.25, 0.0])
def test_bad_latency_row_is_refused_naming_it(capsys: pytest.CaptureFixture[str], table: Path, tmp_path: Path,
                                             value: object) -> None:
    """Inf used to spin forever in least squares, NaN or text ended in a traceback, a negative row
    fitted a negative scale and exited 0: now the table is refused as corrupt, naming the row."""
    _edit(table, "UPDATE latency SET median_ms = ? WHERE rowid = (SELECT min(rowid) FROM latency)", value)
    sig, widths = sqlite3.connect(table).execute(
        "SELECT signature, widths FROM latency WHERE rowid = (SELECT min(rowid) FROM latency)").fetchone()
    before = table.read_bytes()
    out = tmp_path / "out"
    line = fails_with_one_line(capsys, prune_main, [*SMALL, "--lut", str(table), "--out", str(out)],
                               f"corrupt latency table {table}")
    assert f"row {sig} at widths ({widths}) has median_ms" in line
    assert table.read_bytes() == before
    _nothing_left(tmp_path, out)


@pytest.mark.parametrize("value", ["-1.5", "0", "Infinity"])
def test_bad_whole_model_measurement_is_refused(capsys: pytest.CaptureFixture[str], table: Path, tmp_path: Path,
                                               value: str) -> None:
    key = sqlite3.connect(table).execute("SELECT key FROM kv WHERE key LIKE 'model/%' ORDER BY key").fetchone()[0]
    rec = json.loads(sqlite3.connect(table).execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()[0])
    text = json.dumps({**rec, "median_ms": 1.0}).replace('"median_ms": 1.0', f'"median_ms": {value}')
    _edit(table, "UPDATE kv SET value = ? WHERE key = ?", text, key)
    out = tmp_path / "out"
    fails_with_one_line(capsys, prune_main, [*SMALL, "--lut", str(table), "--out", str(out)],
                        f"record '{key}' has median_ms")
    _nothing_left(tmp_path, out)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_dir(parent: Path, name: str, owner: str | None) -> Path:
    d = parent / name
    d.mkdir()
    (d / "partial.onnx").write_bytes(b"x")
    if owner is not None:
        (d / OWNER).write_text(owner)
    return d


def test_read_only_complete_table_prunes(capsys: pytest.CaptureFixture[str], table: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared read-only table: pruning works, says once that nothing new is stored, writes nothing
    into it. The run also removes a temporary directory left by a killed run (its owner is dead),
    keeps those of a live process or without an owner, and writes every output with the same mode."""
    import socket

    host = socket.gethostname()
    dead = _temp_dir(tmp_path, ".out.dead0001", f"{host} {_dead_pid()}")
    live = _temp_dir(tmp_path, ".out.live0001", f"{host} {os.getpid()}")
    other_host = _temp_dir(tmp_path, ".out.host0001", f"not-{host} {_dead_pid()}")
    unowned = _temp_dir(tmp_path, ".out.none0001", None)
    before = table.read_bytes()
    table.chmod(0o444)
    monkeypatch.setattr("profilers.table._writable", lambda p: False)  # what a superuser's check cannot see
    out = tmp_path / "out"
    assert run_cli(prune_main, [*SMALL, "--lut", str(table), "--out", str(out)]) in OUTCOMES
    err = capsys.readouterr().err.strip().splitlines()
    notes = [line for line in err if "read-only" in line]
    assert len(notes) == 1 and notes[0].startswith(f"note: latency table {table} is read-only"), err
    assert table.read_bytes() == before
    assert json.loads((out / "report.json").read_text())["pruned_ms"] > 0
    assert not dead.exists() and live.exists() and other_host.exists() and unowned.exists()
    assert not (out / OWNER).exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.onnx"] == modes["pruned.pt"] == modes["report.json"] == 0o666 & ~current_umask(), modes


def test_write_atomic_gives_the_mode_of_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    write_atomic(path, b"abc")
    assert path.read_bytes() == b"abc" and path.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_output_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "taken"
    f.write_text("mine")
    fails_with_one_line(capsys, prune_main, [*SMALL, "--out", str(f)], "is a file")
    fails_with_one_line(capsys, prune_main, [*SMALL, "--out", str(f), "--force"], "is a file")
    fails_with_one_line(capsys, prune_main, [*SMALL, "--out", str(f / "run")],
                        "cannot create the output directory")
    assert f.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="a superuser writes into read-only directories anyway")
def test_output_in_a_read_only_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        fails_with_one_line(capsys, prune_main, [*SMALL, "--out", str(ro / "run")],
                            "cannot create the output directory")
    finally:
        ro.chmod(0o755)


def test_image_folder_without_images(capsys: pytest.CaptureFixture[str], table: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (data / split / cls).mkdir(parents=True)
    (data / "train" / "cat" / "notes.txt").write_text("not an image")
    before = _content(table)
    out = tmp_path / "out"
    fails_with_one_line(capsys, prune_main, [*SMALL, "--lut", str(table), "--data", str(data), "--out", str(out)],
                        "holds no images")
    assert _content(table) == before
    _nothing_left(tmp_path, out)


def test_garbage_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """torch's advice (load with ``weights_only=False``) would run the file's code: not passed on."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(range(256)) * 4)
    line = fails_with_one_line(capsys, prune_main, [*SMALL, "--checkpoint", str(bad), "--out", str(tmp_path / "o")],
                               f"cannot read checkpoint {bad}")
    assert "weights_only" not in line
    with pytest.raises(MdpError, match=f"cannot read pruned model {bad}") as exc:
        load_pruned(bad)
    assert "weights_only" not in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("main, extra", [(profile_main, ["--no-progress"]), (inspect_main, [])])
def test_resolution_zero_and_below_a_patch(capsys: pytest.CaptureFixture[str], tmp_path: Path, main: Main,
                                           extra: list[str]) -> None:
    out = ["--out", str(tmp_path / "t.sqlite")] if main is profile_main else []
    fails_with_one_line(capsys, main, ["--model", "test_resnet", "--resolution", "0", *out, *extra],
                        "resolution must be at least 1 pixel, got 0")
    fails_with_one_line(capsys, main, ["--model", "test_vit", "--resolution", "8", *out, *extra],
                        "test_vit at resolution 8 has no patches: its patch size is (16, 16)")
    assert not (tmp_path / "t.sqlite").exists()
    assert run_cli(inspect_main, ["--model", "test_vit", "--resolution", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_size"][1:] == [16, 16]


def _start_prune(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    """A prune run in its own process (profiling a new table), once it is writing its outputs."""
    out, table = tmp_path / "out", tmp_path / "t.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "mdp_trt.prune", *SMALL, "--lut", str(table), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob(f".out.*/{OWNER}")) or not table.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)
    return proc, out, table


def test_sigterm_cleans_up_and_exits_143(tmp_path: Path) -> None:
    proc, out, table = _start_prune(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines() == ["terminated"], err
    _nothing_left(tmp_path, out)
    with LatencyTable.read(table) as t:  # what was measured stays
        t.keys()


def test_sigkill_leaves_a_temp_dir_the_next_run_removes(tmp_path: Path) -> None:
    proc, out, table = _start_prune(tmp_path)
    proc.kill()
    proc.communicate(timeout=120)
    left = list(tmp_path.glob(".out.*"))
    assert len(left) == 1 and (left[0] / OWNER).read_text().split()[1] == str(proc.pid)
    live = _temp_dir(tmp_path, ".out.live0002", (left[0] / OWNER).read_text().split()[0] + f" {os.getpid()}")
    assert remove_stale_temp_dirs(out) == left
    assert not left[0].exists() and live.exists()
    with LatencyTable.read(table) as t:
        t.keys()


def test_pruned_model_reads_back(complete: Path) -> None:
    """The run behind :func:`complete` wrote a model that loads (the outputs above are real)."""
    model = load_pruned(complete.parent / "out" / "pruned.pt")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


def test_read_only_table_that_lacks_points(capsys: pytest.CaptureFixture[str], table: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning and profiling with a read-only table that lacks points: one line saying it cannot store them."""
    _edit(table, "DELETE FROM latency WHERE rowid = (SELECT min(rowid) FROM latency)")
    before = _content(table)
    monkeypatch.setattr("profilers.table._writable", lambda p: False)
    out = tmp_path / "out"
    fails_with_one_line(capsys, prune_main, [*SMALL, "--lut", str(table), "--out", str(out)],
                        f"latency table {table} is read-only and lacks 1 of the")
    argv = ["--model", "test_resnet", "--resolution", "32", "--max-choices", "2", "--out", str(table), "--no-progress"]
    assert run_cli(profile_main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()  # the line that says what is profiled, then the error
    assert err[0].startswith("profiling test_resnet") and len(err) == 2, err
    assert err[1].startswith("error: ") and "is read-only and lacks 1 of the" in err[1]
    assert _content(table) == before
    _nothing_left(tmp_path, out)


def test_prune_resolution_zero(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [*SMALL, "--out", str(tmp_path / "out"), "--lut", str(tmp_path / "t.sqlite")]
    argv[argv.index("--resolution") + 1] = "0"
    fails_with_one_line(capsys, prune_main, argv, "resolution must be at least 1 pixel, got 0")
    assert not (tmp_path / "t.sqlite").exists()
    _nothing_left(tmp_path, tmp_path / "out")
