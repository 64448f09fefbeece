"""GPU validation run: the torch CUDA engine end to end, in one prepared, time-boxed script.

    python -m benchmarks.gpu_check [--out DIR] [--budget-s 480]      # on the GPU machine
    python -m benchmarks.gpu_check --dry-run --out runs/gpu-dry      # the same steps on the CPU
    bash benchmarks/gpu_check.sh ... | make gpu-check GPU_CHECK_ARGS="..."   (the same command)

Steps, in this order, each a child process with its own time limit:

1. ``install``: wheels from ``--wheels`` (default ``.whl/``, when it holds any) into ``--site``
   (default ``/tmp/site``), put first on every later step's ``PYTHONPATH``;
2. ``device``: ``nvidia-smi`` and torch's view of the device, package versions, the engine identity;
3. ``cuda_tests``: ``pytest -m cuda`` over the test files that have such tests (on the GPU at
   least one must pass, none fail);
4. for the CNN (resnet50) at batch 1: ``mdp_trt.profile`` (cost per grid point),
   ``benchmarks.latency_model`` (``--plans`` random pruned models: median / p95 error of the
   latency surface against the linear and FLOPs baselines), ``mdp_trt.prune --engine-target 2x``;
5. the same profile and latency model at the large batch (64), then ``mdp_trt.prune`` of the
   ViT (deit_small_patch16_224) at that batch.

All of it on the torch engine in fp16 with CUDA graphs, one latency table per model and
batch (the prune of the CNN reuses the profiled one). The batch-1 figures come first, so a
run cut short still has one complete set.

Before each step the time left is checked: a step is skipped (and the summary says why) when
less than its minimum is left before the deadline, and it is stopped when its own limit or
the deadline comes. A step that fails or is stopped is recorded (return code, the last lines
of its stderr) and the next one runs. After every step the summary is rewritten, so a run
killed from outside still leaves what it finished. Exit status 0 when every step that ran
succeeded, 1 otherwise.

The output folder (``--out``; default ``$OUT`` when set, else ``runs/gpu-check``) gets three
files: ``results.json`` (device, versions, every step's status and seconds, the figures),
``results.md`` (the same figures as Markdown tables, for the README) and ``gpu-check.tar.gz``
(every step's log, JSON, report, plot and latency table; no model files). Work happens in a
temporary folder (``--work`` to keep it somewhere).

``--dry-run``: the same steps on the CPU with tiny timm models (``test_resnet``,
``test_vit`` at 32 px, batches 1 and 2, two widths per dim, the torch engine eager in fp32);
``--fail STEP`` makes a step fail (an unknown option on its command line), to check that the
run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mdp_trt.cli import run_cli
from mdp_trt.errors import MdpError
from mdp_trt.report import EXIT_CODES, outcome

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = "gpu-check.tar.gz"
MAX_OUT_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
"""What comes back from the GPU machine's output folder: at most 8 files of 16 MiB each."""
ARCHIVE_BYTES = 15 * 2**20
"""Latency tables leave the archive when it would be larger than this."""
NOT_ARCHIVED = (".pt", ".onnx", ".engine", ".tmp")
"""Model files are large and can be rebuilt from plan.json; they stay out of the archive."""
INJECTED = "--injected-failure"
"""The option ``--fail STEP`` appends to a step's command line: no command accepts it."""
TAIL_LINES = 15


GPU_LIMITS = {"install": (60.0, 5.0), "device": (45.0, 5.0), "cuda_tests": (90.0, 15.0),
              "profile": (120.0, 30.0), "latency": (90.0, 30.0), "prune": (120.0, 45.0)}
# The dry run's latency step measures whole models on the CPU by the measuring protocol, which
# measures loud groups again: 38 s alone, 92 s while another job ran beside it (AMD EPYC box).
DRY_LIMITS = {"install": (60.0, 1.0), "device": (60.0, 1.0), "cuda_tests": (90.0, 1.0),
              "profile": (90.0, 1.0), "latency": (180.0, 1.0), "prune": (120.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the steps run: models, engine setting, grid and sizes."""

    cnn: str = "resnet50"
    vit: str = "deit_small_patch16_224"
    engine: str = "torch"
    precision: str = "fp16"
    resolution: int | None = None
    batch_sizes: tuple[int, int] = (1, 64)
    max_choices: int = 6
    plans: int = 20
    calibration_plans: int = 8
    importance_batches: int = 4
    train_batch_size: int = 32
    max_rounds: int = 6
    target: str = "2x"
    require_cuda: bool = True
    limits: dict[str, tuple[float, float]] = dataclasses.field(default_factory=lambda: dict(GPU_LIMITS))
    """Per step kind: (most seconds it may run, fewest seconds worth starting it with)."""


GPU = Settings()
DRY_RUN = Settings(cnn="resnet18", vit="test_vit", precision="fp32", resolution=32, batch_sizes=(1, 2),
                   max_choices=2, plans=3, calibration_plans=2, importance_batches=1, train_batch_size=4,
                   max_rounds=1, target="1.25x", require_cuda=False,
                   limits=dict(DRY_LIMITS))


@dataclasses.dataclass
class Step:
    """One child process of the run, what it writes, and how its figures are read back."""

    name: str
    kind: str
    argv: list[str]
    stdout: str
    """Where its standard output goes, relative to the work folder."""
    read: Callable[[Step, Path], dict[str, Any]] | None = None
    label: str = ""
    """``model@bsN`` for the figures' tables."""
    note: str = ""
    """Said in the summary when the step has nothing to do (``argv`` empty)."""
    ok_codes: tuple[int, ...] = (0,)
    """Exit statuses that are results, not failures (a prune that missed its target still
    reports what it measured: :data:`mdp_trt.report.EXIT_CODES`)."""


class StepCheckError(Exception):
    """A step that exited 0 but whose output does not show what it should (e.g. no CUDA test passed)."""


# -- the steps -------------------------------------------------------------------------------------


def _common(s: Settings, model: str, batch: int) -> list[str]:
    argv = ["--model", model, "--engine", s.engine, "--precision", s.precision, "--batch-size", str(batch),
            "--max-choices", str(s.max_choices)]
    if s.resolution is not None:
        argv += ["--resolution", str(s.resolution)]
    return argv


def _table(model: str, batch: int) -> str:
    return f"luts/{model}-bs{batch}.sqlite"


def build_steps(s: Settings, work: Path, wheels: Path, site: Path) -> list[Step]:
    """Every step of the run, in order."""
    py = sys.executable
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    install = Step("install", "install", [], "logs/install.out", read=_read_install,
                   note=f"no wheels in {wheels}: nothing to install")
    if found:
        install.argv = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    facts = [py, "-m", "benchmarks.gpu_check", "facts", "--engine", s.engine, "--precision", s.precision]
    steps = [
        install,
        Step("device", "device", facts + (["--require-cuda"] if s.require_cuda else []), "logs/device.json",
             read=_read_json),
        Step("cuda_tests", "cuda_tests",
             [py, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
              "--junitxml", str(work / "cuda-tests.xml"), *cuda_test_files()],
             "logs/cuda_tests.out", read=_read_junit(s.require_cuda)),
    ]
    small, large = s.batch_sizes
    for model, batch, prune_model in ((s.cnn, small, s.cnn), (s.cnn, large, s.vit)):
        tag = f"{model}_bs{batch}"
        table = str(work / _table(model, batch))
        steps.append(Step(f"profile_{tag}", "profile",
                          [py, "-m", "mdp_trt.profile", *_common(s, model, batch), "--out", table,
                           "--no-progress", "--json"],
                          f"profile/{tag}.json", read=_read_json, label=f"{model}@bs{batch}"))
        steps.append(Step(f"latency_{tag}", "latency",
                          [py, "-m", "benchmarks.latency_model", *_common(s, model, batch), "--plans",
                           str(s.plans), "--calibration-plans", str(s.calibration_plans), "--lut", table,
                           "--plot", str(work / f"latency/{tag}.png"), "--json"],
                          f"latency/{tag}.json", read=_read_json, label=f"{model}@bs{batch}"))
        ptag = f"{prune_model}_bs{batch}"
        steps.append(Step(f"prune_{ptag}", "prune",
                          [py, "-m", "mdp_trt.prune", *_common(s, prune_model, batch), "--engine-target",
                           s.target, "--lut", str(work / _table(prune_model, batch)), "--calibration-plans",
                           str(s.calibration_plans), "--importance-batches", str(s.importance_batches),
                           "--train-batch-size", str(s.train_batch_size),
                           "--train-limit", str(s.importance_batches * s.train_batch_size),
                           "--max-rounds", str(s.max_rounds),
                           "--out", str(work / f"prune/{ptag}"), "--quiet"],
                          f"logs/prune_{ptag}.out", read=_read_prune(work / f"prune/{ptag}"),
                          label=f"{prune_model}@bs{batch}", ok_codes=tuple(EXIT_CODES.values())))
    return steps


def cuda_test_files(root: Path = REPO) -> list[str]:
    """The test files that hold ``cuda``-marked tests. Only those are collected: others may import
    what the GPU machine lacks at collection time (``tests/test_solver.py`` lists CVXPY's solvers)."""
    return [str(p.relative_to(root)) for p in sorted((root / "tests").glob("test_*.py"))
            if "mark.cuda" in p.read_text()]


def _read_json(step: Step, path: Path) -> dict[str, Any]:
    text = path.read_text()
    start = text.find("{")
    if start < 0:
        raise StepCheckError(f"no JSON on the standard output of {step.name}")
    return dict(json.loads(text[start:]))


def _read_install(step: Step, path: Path) -> dict[str, Any]:
    site = Path(step.argv[step.argv.index("--target") + 1])
    return {"site": str(site), "installed": sorted(p.name.removesuffix(".dist-info")
                                                   for p in site.glob("*.dist-info"))}


def _read_junit(need_pass: bool) -> Callable[[Step, Path], dict[str, Any]]:
    def read(step: Step, path: Path) -> dict[str, Any]:
        xml = Path(step.argv[step.argv.index("--junitxml") + 1])
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
        if need_pass and counts["passed"] < 1:
            raise StepCheckError(f"no CUDA test passed ({counts['skipped']} skipped: {'; '.join(reasons)})")
        return {**counts, "skip_reasons": reasons}

    return read


def _read_prune(out: Path) -> Callable[[Step, Path], dict[str, Any]]:
    def read(step: Step, path: Path) -> dict[str, Any]:
        r = json.loads((out / "report.json").read_text())
        keys = ("dense_ms", "pruned_ms", "speedup", "predicted_ms", "prediction_error_pct", "target_met",
                "wall_s", "params_before", "params_after", "flops_before", "flops_after")
        doc = {k: r[k] for k in keys}
        doc.update(budget_ms=r["target"]["budget_ms"], target=r["target"]["text"], rounds=len(r["rounds"]),
                   engine=r["engine"], note=r.get("note", ""), outcome=outcome(r),
                   measurement=r.get("measurement"))
        return doc

    return read


# -- running ---------------------------------------------------------------------------------------


def _tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    if not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-n:]


def _child_env(site: Path | None, dry_run: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    paths = [str(site)] if site is not None else []
    paths += [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU engine even where a GPU is present
    return env


def _run_child(argv: list[str], stdout: Path, stderr: Path, env: dict[str, str], timeout: float) -> int | None:
    """Run ``argv`` in a process group of its own; ``None`` when stopped at ``timeout`` seconds.

    The group stays in this session, so whatever ends the session ends the step too; an
    interrupt of this process stops the step before it goes on."""
    stdout.parent.mkdir(parents=True, exist_ok=True)
    group: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO, env=env, **group)
        try:
            return proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            _stop(proc)
            return None
        except BaseException:
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's process group, then SIGKILL to whatever of it is left after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_step(step: Step, work: Path, env: dict[str, str], limit_s: float, fail: bool = False) -> dict[str, Any]:
    """Run one step for at most ``limit_s`` seconds; its record for the summary."""
    rec: dict[str, Any] = {"name": step.name, "kind": step.kind}
    if step.label:
        rec["label"] = step.label
    if not step.argv:
        return dict(rec, status="ok", seconds=0.0, note=step.note)
    argv = [*step.argv, INJECTED] if fail else step.argv
    rec["command"] = shlex.join(argv)
    out, err = work / step.stdout, work / "logs" / f"{step.name}.err"
    t0 = time.monotonic()
    rc = _run_child(argv, out, err, env, limit_s)
    rec["seconds"] = round(time.monotonic() - t0, 2)
    rec["rc"] = rc
    if rc is None:
        return dict(rec, status="timeout", reason=f"stopped after {limit_s:.0f} s", stderr_tail=_tail(err))
    if rc not in step.ok_codes:
        return dict(rec, status="failed", reason=f"exit status {rc}", stderr_tail=_tail(err))
    if step.read is not None:
        try:
            rec["result"] = step.read(step, out)
        except (StepCheckError, OSError, ValueError, KeyError, ET.ParseError) as exc:
            return dict(rec, status="failed", reason=f"output not as expected: {exc}", stderr_tail=_tail(err))
    return dict(rec, status="ok")


@dataclasses.dataclass
class Run:
    """Options of one run (what the command line gives)."""

    out: Path
    budget_s: float = 480.0
    dry_run: bool = False
    wheels: Path = REPO / ".whl"
    site: Path = Path("/tmp/site")
    work: Path | None = None
    only: tuple[str, ...] = ()
    fail: tuple[str, ...] = ()
    settings: Settings | None = None


def check(opts: Run) -> int:
    """The whole run; returns the exit status. Writes into ``opts.out`` after every step."""
    t_start = time.monotonic()
    deadline = t_start + opts.budget_s - min(10.0, 0.05 * opts.budget_s)  # the rest is for packing
    s = opts.settings or (DRY_RUN if opts.dry_run else GPU)
    names = [st.name for st in build_steps(s, Path("work"), opts.wheels, opts.site)]
    for asked in (*opts.only, *opts.fail):
        if asked not in names:
            raise MdpError(f"unknown step {asked!r}; the steps are: {', '.join(names)}")
    opts.out.mkdir(parents=True, exist_ok=True)
    work = opts.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("logs", "luts", "latency", "profile", "prune"):
        (work / sub).mkdir(exist_ok=True)
    steps = build_steps(s, work, opts.wheels, opts.site)
    summary: dict[str, Any] = {
        "mode": "dry-run" if opts.dry_run else "gpu",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "budget_s": opts.budget_s,
        "settings": {k: v for k, v in dataclasses.asdict(s).items() if k != "limits"},
        "complete": False,
        "ok": None,
        "steps": [],
    }
    installed = bool(steps[0].argv)
    env = _child_env(opts.site if installed else None, opts.dry_run)
    try:
        _run_steps(steps, s, opts, work, env, summary, t_start, deadline)
        summary["complete"] = True
    finally:  # interrupted too: what finished is kept
        summary["ok"] = summary["complete"] and all(r["status"] in ("ok", "skipped") for r in summary["steps"])
        _finish(summary, work, opts.out, time.monotonic() - t_start)
        if opts.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


def _run_steps(steps: list[Step], s: Settings, opts: Run, work: Path, env: dict[str, str],
               summary: dict[str, Any], t_start: float, deadline: float) -> None:
    """Each step in turn (or skipped), the summary rewritten after each."""
    for st in steps:
        if opts.only and st.name not in opts.only:
            continue
        most, least = s.limits[st.kind]
        left = deadline - time.monotonic()
        if st.argv and left < least:
            rec = {"name": st.name, "kind": st.kind, "status": "skipped", "seconds": 0.0,
                   "reason": f"{max(left, 0):.0f} s left before the deadline, the step needs at least {least:.0f} s"}
        else:
            print(f"[{time.monotonic() - t_start:6.1f} s] {st.name} ...", file=sys.stderr, flush=True)
            try:
                rec = run_step(st, work, env, min(most, left), fail=st.name in opts.fail)
            except BaseException:  # interrupted: the step was stopped, the summary says so
                summary["steps"].append({"name": st.name, "kind": st.kind, "status": "interrupted",
                                         "seconds": round(time.monotonic() - t_start, 1)})
                raise
        if st.label:
            rec.setdefault("label", st.label)
        summary["steps"].append(rec)
        extra = f": {rec.get('reason', '')}" if rec["status"] != "ok" else ""
        print(f"[{time.monotonic() - t_start:6.1f} s] {st.name} {rec['status']} ({rec['seconds']:.1f} s){extra}",
              file=sys.stderr, flush=True)
        _finish(summary, work, opts.out, time.monotonic() - t_start)


# -- the summary -----------------------------------------------------------------------------------


def figures(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run's figures by kind and ``model@bsN``: profiling cost, latency-model errors, prune results."""
    out: dict[str, Any] = {"device": {}, "tests": {}, "profiling": {}, "latency_model": {}, "prune": {}}
    for rec in steps:
        r = rec.get("result")
        if rec["status"] != "ok" or r is None:
            continue
        label = rec.get("label", "")
        if rec["kind"] == "device":
            out["device"] = r
        elif rec["kind"] == "cuda_tests":
            out["tests"] = r
        elif rec["kind"] == "profile":
            out["profiling"][label] = {
                "terms": r["terms"], "grid_points": r["grid_points"], "measured": r["measured"],
                "seconds": r["seconds"], "ms_per_point": 1e3 * r["seconds"] / max(1, r["measured"]),
                "build_s": r["build_s"], "prepare_s": r["prepare_s"], "measure_s": r["measure_s"],
                "identity": r["identity"]}
        elif rec["kind"] == "latency":
            out["latency_model"][label] = {
                "plans": r["plans"], "calibration_plans": r["calibration_plans"], "measured_ms": r["measured_ms"],
                **{name: {"median_pct": r[f"{pre}median_abs_pct_err"], "p95_pct": r[f"{pre}p95_abs_pct_err"]}
                   for name, pre in (("surface", ""), ("linear", "linear_"), ("flops", "flops_"),
                                     ("surface_affine", "surface_affine_"))},
                "ms_per_mparam": r["calibration"].get("ms_per_mparam", 0.0)}
        elif rec["kind"] == "prune":
            out["prune"][label] = r
    return out


def markdown(summary: dict[str, Any]) -> str:
    """``results.md``: the figures as tables to paste into the README, then every step's status."""
    f = summary["figures"]
    dev = f.get("device") or {}
    eng = dev.get("engine") or {}
    smi = (dev.get("nvidia_smi") or [{}])[0]
    gpu = smi.get("name") or dev.get("torch", {}).get("device_name") or eng.get("device", "?")
    st = summary["settings"]
    lines = [
        f"# GPU check ({summary['mode']}, {summary['started']})",
        "",
        f"Device: {gpu}" + (f", driver {smi['driver_version']}" if smi.get("driver_version") else "")
        + f". Engine: {eng.get('engine', st['engine'])} {eng.get('version', '')}, {st['precision']}; "
        f"torch {dev.get('torch', {}).get('version', '?')}, CUDA {dev.get('torch', {}).get('cuda') or '-'}. "
        f"Grid: at most {st['max_choices']} widths per dim. Run took {summary['elapsed_s']:.0f} s of a "
        f"{summary['budget_s']:.0f} s budget.",
    ]
    if f["profiling"]:
        lines += ["", "| profiled | terms | grid points | measured | seconds | ms a point |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['terms']} | {v['grid_points']} | {v['measured']} | {v['seconds']:.1f} | "
                  f"{v['ms_per_point']:.1f} |" for k, v in f["profiling"].items()]
    if f["latency_model"]:
        lines += ["", "Absolute percentage error of the predicted latency, median / p95:", "",
                  "| model | plans | measured (ms) | latency surface (ours) | linear in out-channels | "
                  "proportional to FLOPs |", "|---|---:|---:|---:|---:|---:|"]
        for k, v in f["latency_model"].items():
            cells = " | ".join(f"{v[n]['median_pct']:.1f}% / {v[n]['p95_pct']:.1f}%"
                               for n in ("surface", "linear", "flops"))
            lines.append(f"| {k} | {v['plans']} | {v['measured_ms']['min']:.3f}-{v['measured_ms']['max']:.3f} | "
                         f"{cells} |")
    if f["prune"]:
        lines += ["", f"Prune to {st['target']}:", "",
                  "| model | dense (ms) | pruned (ms) | speedup | predicted (ms) | prediction error | rounds "
                  "| wall time |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['dense_ms']:.3f} | {v['pruned_ms']:.3f} | {v['speedup']:.2f}x | "
                  f"{v['predicted_ms']:.3f} | {v['prediction_error_pct']:.1f}% | {v['rounds']} | "
                  f"{v['wall_s']:.0f} s |" for k, v in f["prune"].items()]
    if f["tests"]:
        t = f["tests"]
        lines += ["", f"CUDA tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                      f"{t['skipped']} skipped."]
    lines += ["", "| step | status | seconds | note |", "|---|---|---:|---|"]
    for r in summary["steps"]:
        note = r.get("reason") or r.get("note") or ""
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {note} |")
    return "\n".join(lines) + "\n"


def _archive(work: Path, path: Path) -> dict[str, Any]:
    """Pack the work folder into ``path`` (model files left out; tables too if it gets too big)."""
    from profilers.export import write_atomic

    def pack(skip: tuple[str, ...]) -> tuple[bytes, list[str]]:
        members = sorted(p for p in work.rglob("*") if p.is_file() and not p.name.endswith(skip))
        with tempfile.TemporaryFile() as buf:
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                for p in members:
                    tar.add(p, arcname=str(Path("gpu-check") / p.relative_to(work)))
            buf.seek(0)
            return buf.read(), [str(p.relative_to(work)) for p in members]

    data, members = pack(NOT_ARCHIVED)
    dropped = ""
    if len(data) > ARCHIVE_BYTES:
        data, members = pack((*NOT_ARCHIVED, ".sqlite"))
        dropped = "latency tables left out: the archive was too large with them"
    write_atomic(path, data)
    return {"archive": path.name, "bytes": len(data), "members": members, "note": dropped}


def _finish(summary: dict[str, Any], work: Path, out: Path, elapsed: float) -> None:
    """Rewrite ``results.json``, ``results.md`` and the archive in ``out``."""
    from profilers.export import write_atomic

    summary["elapsed_s"] = round(elapsed, 1)
    summary["figures"] = figures(summary["steps"])
    summary["archive"] = _archive(work, out / ARCHIVE)
    write_atomic(out / "results.md", markdown(summary).encode())
    write_atomic(out / "results.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())


OUT_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def returnable(out: Path) -> list[str]:
    """What in ``out`` would not come back from the GPU machine (too many, too large, odd names)."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    problems = [f"{len(files)} files, more than {MAX_OUT_FILES}"] if len(files) > MAX_OUT_FILES else []
    for p in files:
        rel = p.relative_to(out)
        if p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes")
        if len(rel.parts) > 3 or not all(OUT_NAME.match(part) for part in rel.parts):
            problems.append(f"{rel}: name or depth")
    return problems


# -- device facts (the ``device`` step) ------------------------------------------------------------


def device_facts(engine: str, precision: str, require_cuda: bool) -> dict[str, Any]:
    """nvidia-smi, torch's view of the device, package versions and the engine identity."""
    import importlib.metadata as md

    import torch

    from profilers.engines import get_engine

    if require_cuda and not torch.cuda.is_available():
        raise MdpError("torch sees no CUDA device (torch.cuda.is_available() is False)")
    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                             "machine": platform.machine(), "cpus": os.cpu_count()}
    tv: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                          "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        tv.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                  multiprocessors=p.multi_processor_count, cudnn=torch.backends.cudnn.version(),
                  device_count=torch.cuda.device_count())
    facts["torch"] = tv
    versions: dict[str, str | None] = {}
    for name in ("timm", "numpy", "scipy", "onnx", "onnxruntime", "highspy", "cvxpy", "rich", "matplotlib",
                 "pytest"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    facts["packages"] = versions
    facts["nvidia_smi"] = _nvidia_smi()
    facts["engine"] = dataclasses.asdict(get_engine(engine, precision=precision).identity())
    return facts


def _nvidia_smi() -> list[dict[str, str]] | None:
    fields = ("name", "driver_version", "memory.total", "clocks.max.sm", "clocks.max.mem", "power.limit",
              "pstate", "temperature.gpu")
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    proc = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0:
        return [{"error": proc.stderr.strip() or f"exit status {proc.returncode}"}]
    return [{k.replace(".", "_"): v.strip() for k, v in zip(fields, line.split(","), strict=False)}
            for line in proc.stdout.strip().splitlines()]


# -- command line ----------------------------------------------------------------------------------


def _default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("runs/gpu-check")


def _facts_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check facts",
                                description="Device facts as JSON (the run's device step).")
    p.add_argument("--engine", default="torch")
    p.add_argument("--precision", default=None)
    p.add_argument("--require-cuda", action="store_true", help="fail when torch sees no CUDA device")
    args = p.parse_args(argv)
    print(json.dumps(device_facts(args.engine, args.precision, args.require_cuda), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "facts":
        return _facts_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: $OUT when set, else runs/gpu-check)")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole run's deadline in seconds (480)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny models")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="folder of wheels to install first (.whl/)")
    p.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where the wheels go (/tmp/site)")
    p.add_argument("--work", type=Path, default=None, help="keep the work folder here (default: a temporary one)")
    p.add_argument("--max-choices", type=int, default=None,
                   help=f"widths per dim in every step (default {GPU.max_choices}; dry run {DRY_RUN.max_choices})")
    p.add_argument("--plans", type=int, default=None,
                   help=f"random plans of the latency-model benchmark (default {GPU.plans})")
    p.add_argument("--only", nargs="+", default=(), metavar="STEP", help="run only these steps")
    p.add_argument("--fail", nargs="+", default=(), metavar="STEP",
                   help="make these steps fail (for checking that the run goes on)")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        raise MdpError(f"--budget-s must be positive, got {args.budget_s}")
    s = DRY_RUN if args.dry_run else GPU
    if args.max_choices is not None:
        s = dataclasses.replace(s, max_choices=args.max_choices)
    if args.plans is not None:
        s = dataclasses.replace(s, plans=args.plans)
    opts = Run(out=args.out or _default_out(), budget_s=args.budget_s, dry_run=args.dry_run, wheels=args.wheels,
               site=args.site, work=args.work, only=tuple(args.only), fail=tuple(args.fail), settings=s)
    previous = signal.signal(signal.SIGTERM, _raise_exit)  # a SIGTERM still writes the summary
    try:
        rc = check(opts)
    finally:
        signal.signal(signal.SIGTERM, previous)
    problems = returnable(opts.out)
    print(f"{opts.out}: results.json, results.md, {ARCHIVE}" + (f"; not returnable: {problems}" if problems else ""),
          file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(run_cli(main))
