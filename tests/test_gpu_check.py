"""The GPU validation script, run dry on the CPU: every step, failures recorded, the deadline, the packing."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import (
    ARCHIVE,
    DRY_RUN,
    Run,
    Step,
    build_steps,
    check,
    main,
    returnable,
    run_step,
)
from mdp_trt.errors import MdpError

PROBE = "gpucheck_probe"


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, so the install step has something real to install."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{PROBE}-0.1.dist-info"
    files = {
        f"{PROBE}/__init__.py": b"VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 0.1\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{PROBE}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def summary_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in summary["steps"]}


def step_names(tmp: Path) -> list[str]:
    return [s.name for s in build_steps(DRY_RUN, tmp, tmp / "none", tmp / "site")]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, float]:
    """One whole dry run (every step, a real wheel installed first): exit status, output folder, seconds."""
    root = tmp_path_factory.mktemp("gpu-check")
    probe_wheel(root / "wheels")
    out = root / "out"
    t0 = time.monotonic()
    rc = main(["--dry-run", "--out", str(out), "--wheels", str(root / "wheels"), "--site", str(root / "site"),
               "--budget-s", "560"])
    return rc, out, time.monotonic() - t0


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_dry_run_every_step_ok(dry_run: tuple[int, Path, float], tmp_path: Path) -> None:
    rc, out, seconds = dry_run
    s = summary_of(out)
    steps = by_name(s)
    assert list(steps) == step_names(tmp_path)
    assert {n: r["status"] for n, r in steps.items()} == {n: "ok" for n in steps}, \
        {n: (r.get("reason"), r.get("stderr_tail")) for n, r in steps.items() if r["status"] != "ok"}
    assert rc == 0 and s["ok"] is True and s["mode"] == "dry-run"
    assert s["elapsed_s"] <= seconds and all(r["seconds"] >= 0 for r in s["steps"])
    assert f"{PROBE}-0.1" in steps["install"]["result"]["installed"]

    f = s["figures"]
    assert f["device"]["torch"]["version"] and f["device"]["engine"]["engine"] == "torch"
    assert f["tests"]["failures"] == 0 and f["tests"]["errors"] == 0 and f["tests"]["skipped"] >= 1
    cnn, vit = DRY_RUN.cnn, DRY_RUN.vit
    small, large = DRY_RUN.batch_sizes
    assert set(f["profiling"]) == set(f["latency_model"]) == {f"{cnn}@bs{small}", f"{cnn}@bs{large}"}
    assert set(f["prune"]) == {f"{cnn}@bs{small}", f"{vit}@bs{large}"}
    for p in f["profiling"].values():
        assert p["measured"] == p["grid_points"] > 0 and _positive(p["seconds"]) and _positive(p["ms_per_point"])
    for key, lm in f["latency_model"].items():
        assert lm["plans"] >= 1 and _positive(lm["measured_ms"]["min"])
        for name in ("surface", "linear", "flops"):
            for stat in ("median_pct", "p95_pct"):
                assert math.isfinite(lm[name][stat]) and lm[name][stat] >= 0, (key, name, stat)
            assert lm[name]["p95_pct"] >= lm[name]["median_pct"]
    for key, pr in f["prune"].items():
        for k in ("dense_ms", "pruned_ms", "speedup", "predicted_ms", "budget_ms", "wall_s"):
            assert _positive(pr[k]), (key, k)
        # The speedup is dense / pruned paired round by round: near the ratio of the medians.
        assert pr["rounds"] >= 1 and math.isclose(pr["speedup"], pr["dense_ms"] / pr["pruned_ms"], rel_tol=0.1)
        assert pr["outcome"] in ("on target", "missed", "over-pruned", "unreliable")
        assert pr["engine"]["batch_size"] == int(key.rsplit("@bs", 1)[1])


def test_dry_run_packs_what_comes_back(dry_run: tuple[int, Path, float]) -> None:
    _, out, _ = dry_run
    assert returnable(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(["results.json", "results.md", ARCHIVE])
    s = summary_of(out)
    with tarfile.open(out / ARCHIVE) as tar:
        names = set(tar.getnames())
        report = json.loads(tar.extractfile(f"gpu-check/prune/{DRY_RUN.vit}_bs2/report.json").read())  # type: ignore[union-attr]
    assert report["pruned_ms"] == s["figures"]["prune"][f"{DRY_RUN.vit}@bs2"]["pruned_ms"]
    assert {f"gpu-check/logs/{n}.err" for n in by_name(s) if n != "install"} <= names
    assert f"gpu-check/latency/{DRY_RUN.cnn}_bs1.json" in names and f"gpu-check/luts/{DRY_RUN.cnn}-bs1.sqlite" in names
    assert not [n for n in names if n.endswith((".pt", ".onnx"))]
    assert set(s["archive"]["members"]) == {n.removeprefix("gpu-check/") for n in names}
    md = (out / "results.md").read_text()
    assert "| latency surface (ours) |" in md and f"| {DRY_RUN.vit}@bs2 |" in md
    for r in s["steps"]:
        assert f"| {r['name']} | ok |" in md


def test_failed_step_is_recorded_and_the_rest_run(tmp_path: Path) -> None:
    probe_wheel(tmp_path / "wheels")
    rc = main(["--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "wheels"),
               "--site", str(tmp_path / "site"), "--only", "install", "device", "--fail", "install"])
    steps = by_name(summary_of(tmp_path / "out"))
    assert rc == 1 and list(steps) == ["install", "device"]
    bad = steps["install"]
    assert bad["status"] == "failed" and bad["rc"] != 0 and gpu_check.INJECTED in bad["command"]
    assert any(gpu_check.INJECTED in line for line in bad["stderr_tail"]), bad["stderr_tail"]
    assert steps["device"]["status"] == "ok" and steps["device"]["result"]["python"]
    assert not summary_of(tmp_path / "out")["ok"]


def test_deadline_skips_what_cannot_finish(tmp_path: Path) -> None:
    rc = main(["--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "none"),
               "--budget-s", "0.5"])
    s = summary_of(tmp_path / "out")
    statuses = {r["name"]: r["status"] for r in s["steps"]}
    assert rc == 0 and statuses.pop("install") == "ok"  # nothing to install: no time needed
    assert set(statuses.values()) == {"skipped"} and len(statuses) == len(step_names(tmp_path)) - 1
    assert all("left before the deadline" in r["reason"] for r in s["steps"][1:])
    assert returnable(tmp_path / "out") == []


def test_step_minimum_decides_what_is_skipped(tmp_path: Path) -> None:
    limits = dict(DRY_RUN.limits, profile=(90.0, 1e6))
    probe_wheel(tmp_path / "wheels")
    opts = Run(out=tmp_path / "out", dry_run=True, wheels=tmp_path / "wheels", site=tmp_path / "site",
               settings=dataclasses.replace(DRY_RUN, limits=limits), only=("install", f"profile_{DRY_RUN.cnn}_bs1"))
    assert check(opts) == 0
    steps = by_name(summary_of(tmp_path / "out"))
    assert steps["install"]["status"] == "ok" and steps["install"]["seconds"] > 0
    assert steps[f"profile_{DRY_RUN.cnn}_bs1"]["status"] == "skipped"
    assert "needs at least 1000000 s" in steps[f"profile_{DRY_RUN.cnn}_bs1"]["reason"]


def test_step_past_its_limit_is_stopped_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(60)")
    step = Step("slow", "device", [sys.executable, "-c", code], "logs/slow.out")
    (tmp_path / "logs").mkdir()
    t0 = time.monotonic()
    rec = run_step(step, tmp_path, {"PATH": "/usr/bin:/bin"}, limit_s=2.0)
    assert rec["status"] == "timeout" and rec["rc"] is None and time.monotonic() - t0 < 20
    assert (tmp_path / "logs/slow.out").read_text().strip() == "started"
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with its process group (a zombie counts as gone)
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} of the stopped step still runs")


def test_sigterm_stops_the_step_and_keeps_the_summary(tmp_path: Path) -> None:
    import signal
    import subprocess

    work, out = tmp_path / "work", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--only", "device",
                             "--work", str(work), "--out", str(out), "--wheels", str(tmp_path / "none")],
                            cwd=gpu_check.REPO, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # until the device step has started
        if (work / "logs/device.err").exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    s = summary_of(out)
    assert s["complete"] is False and s["ok"] is False
    assert [(r["name"], r["status"]) for r in s["steps"]] == [("device", "interrupted")]


def test_output_check_catches_what_would_not_come_back(tmp_path: Path) -> None:
    for i in range(gpu_check.MAX_OUT_FILES + 1):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = returnable(tmp_path)
    assert any("more than 8" in p for p in problems) and any("bad name.txt" in p for p in problems)


def test_archive_leaves_tables_out_when_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    work = tmp_path / "work"
    (work / "luts").mkdir(parents=True)
    (work / "luts/t.sqlite").write_bytes(os.urandom(20_000))
    (work / "model.onnx").write_bytes(b"x" * 100)
    (work / "report.json").write_text("{}")
    monkeypatch.setattr(gpu_check, "ARCHIVE_BYTES", 10_000)
    info = gpu_check._archive(work, tmp_path / ARCHIVE)
    assert info["members"] == ["report.json"] and "left out" in info["note"]
    monkeypatch.setattr(gpu_check, "ARCHIVE_BYTES", 10**6)
    assert gpu_check._archive(work, tmp_path / ARCHIVE)["members"] == ["luts/t.sqlite", "report.json"]


def test_gpu_command_lines_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GPU-run command parses, and gets as far as asking for the CUDA device (none here)."""
    import torch

    from benchmarks.latency_model import main as latency_main
    from mdp_trt.profile import main as profile_main
    from mdp_trt.prune import main as prune_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mains = {"mdp_trt.profile": profile_main, "benchmarks.latency_model": latency_main,
             "mdp_trt.prune": prune_main, "benchmarks.gpu_check": main}
    steps = build_steps(gpu_check.GPU, tmp_path, tmp_path / "none", tmp_path / "site")
    ran = []
    for st in steps:
        if st.argv and st.argv[2] in mains:
            with pytest.raises(MdpError, match="fp16 and bf16 need a CUDA GPU|sees no CUDA device"):
                mains[st.argv[2]](st.argv[3:])
            ran.append(st.kind)
    assert sorted(ran) == sorted(["device", *["profile", "latency", "prune"] * 2])


def test_cuda_tests_collect_only_files_with_cuda_marks(tmp_path: Path) -> None:
    assert "tests/test_profilers.py" in gpu_check.cuda_test_files()
    assert "tests/test_solver.py" not in gpu_check.cuda_test_files()  # imports CVXPY while collected
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests/test_a.py").write_text("import pytest\n\n@pytest.mark.cuda\ndef test_x(): ...\n")
    (tmp_path / "tests/test_b.py").write_text("def test_y(): ...\n")
    assert gpu_check.cuda_test_files(tmp_path) == ["tests/test_a.py"]


def test_unknown_step_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MdpError, match="unknown step 'nope'; the steps are: install, device"):
        main(["--dry-run", "--out", str(tmp_path), "--only", "nope"])
