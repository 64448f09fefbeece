"""The openvino engine: identity, compile settings, results against torch, IR export, the CLIs."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("openvino", reason="openvino is not installed: pip install 'mdp-trt[openvino]'")

from helpers_resnet import make  # noqa: E402

from mdp_trt.cli import run_cli  # noqa: E402
from mdp_trt.errors import EngineError, TableError  # noqa: E402
from profilers.engines import get_engine  # noqa: E402
from profilers.engines import openvino as ov_engine  # noqa: E402
from profilers.export import export_onnx  # noqa: E402
from profilers.table import LatencyTable  # noqa: E402
from profilers.timing import Budget, measure  # noqa: E402

pytestmark = pytest.mark.openvino

FAST = Budget(warmup_ms=1.0, warmup_iters=1, repeats=2, repeat_ms=1.0, min_iters=2, max_iters=20,
              max_rounds=1)


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _engine(**kw: object) -> ov_engine.OpenVinoEngine:
    engine = get_engine("openvino", **{"resolution": 16, **kw})  # type: ignore[arg-type]
    assert isinstance(engine, ov_engine.OpenVinoEngine)
    return engine


def _close_to_torch(engine: ov_engine.OpenVinoEngine, model: nn.Module, x: torch.Tensor,
                    source: str | Path | bytes | None = None, tol: float = 1e-4) -> None:
    with torch.no_grad():
        ref = model(x).numpy()
    got = engine.infer(source if source is not None else export_onnx(model, tuple(x.shape)), x.numpy())[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


# -- identity ------------------------------------------------------------------------------


def test_identity_fields_and_what_tells_identities_apart() -> None:
    e = _engine(batch_size=2, clock="wall")
    ident = e.identity()
    assert (ident.engine, ident.precision, ident.batch_size, ident.resolution, ident.threads, ident.driver) == (
        "openvino", "fp32", 2, 16, 1, "")
    import openvino

    assert ident.version.startswith(str(openvino.__version__).split("-")[0])
    assert ident.version.endswith("/CPU/LATENCY") and ident.device == ov_engine.cpu_name()
    others = {
        "threads": _engine(batch_size=2, threads=2).identity(),
        "hint": _engine(batch_size=2, hint="throughput", clock="wall").identity(),
        "clock": _engine(batch_size=2, clock="cpu").identity(),
        "batch": _engine(batch_size=1, clock="wall").identity(),
    }
    assert others["hint"].version.endswith("/THROUGHPUT")
    assert others["clock"].version == ident.version + "/thread-cpu-time"
    versions = {ident.version, *(o.version for o in others.values())}
    assert len(versions) == 3  # hint and clock live in the version; threads and batch have fields
    for name, other in others.items():
        assert ident.differences(other), name
    # auto: the thread clock on one thread, the wall clock on more.
    assert _engine(batch_size=2).identity() == others["clock"]
    assert _engine(batch_size=2, threads=2, clock="wall").identity() == others["threads"]
    # Precision: a faked bf16 CPU gives an engine of another identity.
    other = dataclasses.replace(ident, precision="bf16")
    assert ident.differences(other) == ["precision: 'fp32' != 'bf16'"]


def test_compile_settings() -> None:
    e = _engine()
    cfg = e.config()
    assert cfg == {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                   "ENABLE_CPU_PINNING": False, "NUM_STREAMS": 1}
    assert "NUM_STREAMS" not in _engine(hint="THROUGHPUT").config()
    assert _engine(threads=0).config()["INFERENCE_NUM_THREADS"] == 0
    compiled = e.compile(e.read(export_onnx(_convnet(), (1, 3, 16, 16))))
    # What the compiled model runs with, not only what was asked for (OpenVINO's own default
    # precision on a CPU with bf16 units is bf16).
    import openvino

    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    assert int(compiled.get_property("NUM_STREAMS")) == 1


@pytest.mark.parametrize(("kw", "needle"), [
    ({"precision": "fp16"}, "precision 'fp16'"),
    ({"device": "cuda"}, "runs on the CPU"),
    ({"threads": -1}, "threads must be >= 0"),
    ({"hint": "fastest"}, "performance hint 'FASTEST'"),
    ({"clock": "sundial"}, "clock 'sundial'"),
    ({"clock": "cpu", "threads": 2}, "one thread"),
    ({"bogus": 1}, "does not take option(s) ['bogus']"),
])
def test_bad_settings_are_refused(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(EngineError) as info:
        get_engine("openvino", **kw)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_bf16_refused_without_it_and_accepted_where_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ov_engine, "cpu_capabilities", lambda core: ["FP32", "INT8", "BIN"])
    with pytest.raises(EngineError, match="no bf16 support") as info:
        _engine(precision="bf16")
    assert "FP32, INT8, BIN" in str(info.value)
    assert _engine().precision == "fp32"  # fp32 needs nothing listed
    monkeypatch.setattr(ov_engine, "cpu_capabilities", lambda core: ["FP32", "BF16", "INT8"])
    e = _engine(precision="bf16")
    assert e.identity().precision == "bf16" and e.config()["INFERENCE_PRECISION_HINT"] == "bf16"


def test_bf16_runs_where_the_cpu_has_it() -> None:
    import openvino

    if "BF16" not in ov_engine.cpu_capabilities(openvino.Core()):
        pytest.skip("this CPU has no bf16 support in OpenVINO")
    e = _engine(precision="bf16")
    m = _convnet()
    compiled = e.compile(e.read(export_onnx(m, (1, 3, 16, 16))))
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.bf16
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    _close_to_torch(e, m, x, tol=5e-2)  # bf16 keeps 8 bits of mantissa


def test_table_of_one_identity_refused_under_another(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    LatencyTable.open(path, _engine().identity()).close()
    for other in (_engine(hint="THROUGHPUT"), _engine(clock="wall"), _engine(threads=2)):
        with pytest.raises(TableError, match="another engine identity"):
            LatencyTable.open(path, other.identity())
    onnxruntime = get_engine("onnxruntime", resolution=16, device="cpu")
    with pytest.raises(TableError, match="engine: 'openvino' != 'onnxruntime'"):
        LatencyTable.open(path, onnxruntime.identity())


# -- compile and run -----------------------------------------------------------------------


def test_small_convnet_matches_torch_and_times() -> None:
    e = _engine(batch_size=2, clock="wall")
    m = _convnet()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    _close_to_torch(e, m, x)
    r = e.prepare(m, (2, 3, 16, 16))
    try:
        assert r.compile_s > 0 and r.timed(1) is None  # host-timed, compile counted apart
        t = measure(r, FAST)
        assert t.median_ms > 0 and t.samples >= 4 and t.clock == "host"
    finally:
        r.close()
    with pytest.raises(EngineError, match="does not fit"):
        e.prepare_onnx(export_onnx(m, (2, 3, 16, 16)), (2, 3, 8, 8))


@pytest.mark.parametrize(("name", "kwargs", "side"), [
    ("test_resnet", {}, 32),
    ("test_vit", {"img_size": 32}, 32),
])
def test_tiny_timm_models_match_torch(name: str, kwargs: dict[str, object], side: int) -> None:
    model = make(name, **kwargs)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(2))
    _close_to_torch(_engine(resolution=side), model, x)


def test_dynamic_batch_takes_the_engine_batch(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    m = _convnet()
    export_onnx(m, (1, 3, 16, 16), path, dynamic_batch=True)
    e = _engine(batch_size=3)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    _close_to_torch(e, m, x, source=path)
    r = e.prepare_onnx(path)
    r()
    r.close()
    with pytest.raises(EngineError, match="runs .onnx and .xml"):
        e.prepare_onnx(tmp_path / "m.engine")
    with pytest.raises(EngineError, match="no such file"):
        e.prepare_onnx(tmp_path / "nope.onnx")
    with pytest.raises(EngineError, match="cannot read the model"):
        e.prepare_onnx(b"not a model")


# -- the thread clock ----------------------------------------------------------------------


def test_thread_clock_counts_the_inference_and_not_a_sleep() -> None:
    """With one thread a synchronous ``infer`` runs on the calling thread: its CPU time is
    most of the wall time (an inference run on another thread would leave it near zero).
    A sleeping (descheduled) thread costs nothing under this clock."""
    m = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    shape = (1, 32, 48, 48)
    cpu = _engine(resolution=48, clock="cpu").prepare(m, shape)
    wall = _engine(resolution=48, clock="wall").prepare(m, shape)
    try:
        thread_ms = cpu.timed(30)
        assert thread_ms is not None and len(thread_ms) == 30
        wall_ms = []
        for _ in range(30):
            t0 = time.perf_counter()
            wall()
            wall_ms.append((time.perf_counter() - t0) * 1e3)
        assert statistics.median(thread_ms) > 0.3 * min(wall_ms), (thread_ms, wall_ms)
        assert measure(cpu, FAST).clock == "thread-cpu"
    finally:
        cpu.close()
        wall.close()
    sleeper = ov_engine.ThreadTimedOpenVinoRunner(lambda: time.sleep(0.02))
    assert max(sleeper.timed(3)) < 5.0


# -- IR export and the benchmark -----------------------------------------------------------


def _lab(tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    from mdp_trt.engine_io import Lab

    return Lab("openvino", "fp32", 1, 32, None, tmp_path / "t.sqlite", "test_resnet", progress=False, **kw)


def test_export_writes_ir_that_runs_and_matches(tmp_path: Path) -> None:
    model = make("test_resnet")
    out = tmp_path / "out"
    out.mkdir()
    files = _lab(tmp_path).export(model, (1, 3, 32, 32), out)
    assert files == ["model.onnx", "model.xml", "model.bin"]
    assert all((out / f).is_file() for f in files)
    e = _engine(resolution=32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    _close_to_torch(e, model, x, source=out / "model.xml")
    (out / "model.bin").unlink()
    with pytest.raises(EngineError, match="no weights file model.bin"):
        e.prepare_onnx(out / "model.xml")
    with pytest.raises(EngineError, match=r"\.xml file"):
        e.save_engine(out / "model.onnx", (1, 3, 32, 32), out / "model.engine")


def test_onnxruntime_export_writes_no_ir(tmp_path: Path) -> None:
    from mdp_trt.engine_io import Lab

    lab = Lab("onnxruntime", "fp32", 1, 32, None, tmp_path / "t.sqlite", "test_resnet", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    assert lab.export(make("test_resnet"), (1, 3, 32, 32), out) == ["model.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]


def test_benchmark_runs_ir_and_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.engine import main

    m = _convnet()
    onnx = tmp_path / "m.onnx"
    export_onnx(m, (1, 3, 16, 16), onnx, dynamic_batch=True)
    xml = tmp_path / "m.xml"
    assert _engine().save_engine(onnx, (2, 3, 16, 16), xml) == [xml, tmp_path / "m.bin"]
    for path in (xml, onnx):
        assert run_cli(main, [str(path), "--engine", "openvino", "--batch-size", "2", "--warmup-ms", "10",
                              "--duration-s", "0.2", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["identity"]["engine"] == "openvino" and r["clock"] == "thread-cpu" and r["samples"] > 0
        assert r["host"]["samples"] > 0  # the wall clock beside the thread clock
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["throughput"] == pytest.approx(2 * r["qps"])
    assert run_cli(main, [str(tmp_path / "m.pt"), "--engine", "openvino"]) == 1
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "m.engine").write_bytes(b"x")
    assert run_cli(main, [str(tmp_path / "m.engine"), "--engine", "openvino"]) == 1
    assert "openvino runs .onnx or .xml files" in capsys.readouterr().err


# -- profiling -----------------------------------------------------------------------------


def test_profile_cli_reports_compile_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mdp_trt.profile import main

    out = tmp_path / "t.sqlite"
    argv = ["--model", "test_resnet", "--resolution", "32", "--max-choices", "2", "--engine", "openvino",
            "--out", str(out), "--no-progress"]
    assert run_cli(main, [*argv, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["measured"] == r["grid_points"] > 0 and r["identity"]["engine"] == "openvino"
    assert r["compile_s"] > 0 and r["prepare_s"] >= 0 and r["measure_s"] > 0
    assert r["compile_s"] + r["prepare_s"] + r["measure_s"] + r["build_s"] <= r["seconds"]
    with LatencyTable.read(out) as t:
        assert len(t) == r["grid_points"] and t.identity.version.endswith("/CPU/LATENCY/thread-cpu-time")
    assert run_cli(main, argv) == 0  # over the full table: nothing compiled, nothing said of it
    text = capsys.readouterr().out
    assert "0 measured" in text and "compile" not in text
    assert run_cli(main, [*argv, "--clock", "wall"]) == 1
    assert "another engine identity" in capsys.readouterr().err


def test_profile_text_names_compile_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mdp_trt.profile import main

    assert run_cli(main, ["--model", "test_resnet", "--resolution", "32", "--max-choices", "2", "--engine",
                          "openvino", "--clock", "wall", "--out", str(tmp_path / "t.sqlite"),
                          "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert ", compile " in text and "timing" in text


# -- the cross-engine table ----------------------------------------------------------------


def _fake_run(root: Path, name: str, engine: str, seed: int) -> Path:
    """A prune output folder (pruned.pt, model.onnx, report.json) of a random plan."""
    from mdp_trt.api import apply_plan, arch_of, save_pruned, space_of
    from mdp_trt.models import SpaceConfig

    dense = make("test_resnet")
    space = space_of(dense, SpaceConfig(resolution=32, max_choices=4))
    plan = space.random_plan(seed)
    pruned = apply_plan(dense, plan, space=space)
    out = root / name
    out.mkdir()
    save_pruned(out / "pruned.pt", pruned, plan, arch=arch_of(dense))
    export_onnx(pruned, (1, 3, 32, 32), out / "model.onnx")
    (out / "report.json").write_text(json.dumps({"model": "test_resnet", "engine": {"engine": engine},
                                                 "speedup": 1.5}))
    return out


def test_cross_engine_table(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.cross_engine import main
    from profilers import timing

    comparisons: list[tuple[int, timing.Comparison]] = []
    real = timing.compare

    def recording(runners, *args, **kwargs):  # type: ignore[no-untyped-def]
        comp = real(runners, *args, **kwargs)
        comparisons.append((len(runners), comp))
        return comp

    monkeypatch.setattr(timing, "compare", recording)
    runs = [_fake_run(tmp_path, "ort", "onnxruntime", 0), _fake_run(tmp_path, "ov", "openvino", 1)]
    md = tmp_path / "t.md"
    assert run_cli(main, [*map(str, runs), "--out", str(md), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["made_for"] for r in rows] == ["onnxruntime", "openvino"]
    # One comparison per engine, of the dense model beside both pruned ones (one architecture).
    assert [n for n, _ in comparisons] == [3, 3]
    for engine, (_, comp) in zip(("onnxruntime", "openvino"), comparisons, strict=True):
        a, b = (r["engines"][engine] for r in rows)
        assert a["identity"]["engine"] == engine
        assert a["dense_ms"] == b["dense_ms"] == comp.ms[0] > 0
        for j, cell in enumerate((a, b), start=1):
            # The figures are the comparison's own: its paired ratio, not the ratio of medians.
            assert cell["pruned_ms"] == comp.ms[j] > 0 and cell["speedup"] == comp.ratios[j] > 0
            assert cell["reliable"] == comp.reliable and cell["clock"] == comp.clock == "thread-cpu"
    lines = md.read_text().splitlines()
    assert len(lines) == 4 and "speedup on openvino" in lines[0] and "| test_resnet | openvino | 1.50x |" in lines[3]
    assert run_cli(main, [str(tmp_path)]) == 1
    assert "no report.json" in capsys.readouterr().err
    assert run_cli(main, [str(runs[0]), "--engines", "mxnet"]) == 1
    assert "unknown engine(s) ['mxnet']" in capsys.readouterr().err


@pytest.mark.slow
def test_prune_on_openvino_writes_ir(tmp_path: Path) -> None:
    """The whole prune job on OpenVINO: its report names the engine, and the IR it writes runs
    and gives the pruned model's outputs."""
    from mdp_trt import load_pruned
    from mdp_trt.prune import main as prune_main
    from mdp_trt.report import EXIT_CODES, outcome

    out = tmp_path / "out"
    argv = ["--model", "test_resnet", "--resolution", "32", "--max-choices", "4", "--calibration-plans", "4",
            "--importance-batches", "2", "--train-batch-size", "8", "--train-limit", "32", "--val-limit", "16",
            "--quiet", "--engine", "openvino", "--engine-target", "1.3x", "--lut", str(tmp_path / "t.sqlite"),
            "--out", str(out)]
    code = prune_main(argv)
    report = json.loads((out / "report.json").read_text())
    assert code == EXIT_CODES[outcome(report)]  # a tiny model may land off target
    assert report["engine"]["engine"] == "openvino" and report["pruned_ms"] > 0
    assert {"model.onnx", "model.xml", "model.bin"} <= set(report["files"])
    pruned = load_pruned(out / "pruned.pt")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    _close_to_torch(_engine(resolution=32), pruned, x, source=out / "model.xml")


def test_edge_costs_are_the_layout_conversions_of_a_graph_run_alone() -> None:
    engine = get_engine("openvino", resolution=None)
    conv = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()).eval()
    into, out_of = engine.edge_costs(export_onnx(conv, (1, 32, 28, 28)), (1, 32, 28, 28))
    assert into > 0 and out_of > 0  # NCHW into the layout the convolution runs in, and back
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    assert engine.edge_costs(export_onnx(head, (1, 64, 1, 1)), (1, 64, 1, 1)) == (0.0, 0.0)
    # inside a model the layout runs from one convolution to the next: a conversion only at
    # the model's input and output
    into, out_of = engine.whole_model_conversions(export_onnx(_convnet(), (1, 3, 16, 16)))
    assert into and out_of and len(into) <= 2 and len(out_of) <= 2


def test_profiling_on_openvino_records_edge_costs_and_takes_them_off(tmp_path: Path) -> None:
    from mdp_trt.space import Dim, PruningSpace, Term
    from profilers.profile import COST, profile_space, term_points

    engine = get_engine("openvino", resolution=16)
    dims = [Dim("c", "channels", 32, 8, (16, 32))]
    space = PruningSpace("fake", "test", dims, [], [Term("t", "conv", ("c",), (("hw", 16),))], (3, 16, 16))

    def module(term: Term, w: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
        return nn.Sequential(nn.Conv2d(w[0], w[0], 3, padding=1), nn.ReLU()).eval(), (w[0], 16, 16)

    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        profile_space(space, module, engine, table, progress=False, budget=FAST, recheck=None)
        costs = {k: table.kv_get(k) for k in table.kv_keys(COST)}
        alone, inside = table.points(space.terms[0].signature), term_points(table, space.terms[0].signature)
    sig = space.terms[0].signature
    assert set(costs) == {f"{COST}{sig}/16", f"{COST}{sig}/32"}
    for w in ((16,), (32,)):
        rec = costs[f"{COST}{sig}/{w[0]}"]
        assert rec["into"] > 0 and rec["out_of"] > 0
        assert inside[w] == pytest.approx(max(alone[w] - rec["into"] - rec["out_of"], 0.1 * alone[w]))
