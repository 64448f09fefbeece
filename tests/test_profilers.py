"""Profilers: timing statistics, the ONNX export path, engines, and the profile loop."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_timing import FakeClock
from torch import nn

from mdp_trt.errors import EngineError, TableError
from mdp_trt.space import Block, Dim, PruningSpace, Term
from profilers.engines import ENGINES, HostRunner, get_engine
from profilers.engines.base import EngineIdentity
from profilers.export import export_onnx
from profilers.profile import grid_points, profile_space
from profilers.table import LatencyTable, merge
from profilers.timing import Budget, measure, measure_interleaved, summarize

ROOT = Path(__file__).resolve().parents[1]
FAST = Budget(warmup_ms=1.0, warmup_iters=1, repeats=2, repeat_ms=1.0, min_iters=2, max_iters=20,
              max_rounds=1)
# These tests time real tiny modules and count what is measured; the recheck of points that read
# above a larger one (tests/test_recheck.py) would measure a noise-dependent few more, so it is off.


# -- timing -------------------------------------------------------------------------------


class FakeRunner:
    """Advances a fake clock by the next duration (ms) of a fixed list on every call."""

    def __init__(self, clock: FakeClock, durations_ms: list[float], log: list[str] | None = None,
                 name: str = "") -> None:
        self.clock = clock
        self.durations = list(durations_ms)
        self.i = 0
        self.log = log
        self.name = name

    def __call__(self) -> None:
        self.clock.now += self.durations[self.i % len(self.durations)] / 1e3
        self.i += 1
        if self.log is not None:
            self.log.append(self.name)


def test_summarize_median_of_medians_and_percentiles() -> None:
    repeats = [[1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0], [5.0, 5.0, 100.0]]
    t = summarize(repeats)
    pooled = np.concatenate([np.array(r) for r in repeats])
    assert t.median_ms == pytest.approx(5.0)  # medians 2, 11.5, 5 -> 5
    assert t.per_repeat_ms == pytest.approx([2.0, 11.5, 5.0])
    assert t.p90_ms == pytest.approx(np.percentile(pooled, 90))
    assert t.p99_ms == pytest.approx(np.percentile(pooled, 99))
    assert t.mean_ms == pytest.approx(pooled.mean())
    assert t.cv == pytest.approx(pooled.std() / pooled.mean())
    assert (t.min_ms, t.max_ms, t.samples, t.repeats) == (1.0, 100.0, 10, 3)
    medians = np.array([2.0, 11.5, 5.0])
    assert t.spread == pytest.approx(medians.std() / medians.mean())


def test_measure_with_fake_clock_skips_warmup_and_sizes_repeats() -> None:
    clock = FakeClock()
    # Two slow first calls, then 2 ms per call. Warm-up needs 2 calls and 100 ms: 22 calls.
    runner = FakeRunner(clock, [50.0, 10.0] + [2.0] * 10_000)
    budget = Budget(warmup_ms=100.0, warmup_iters=2, repeats=4, repeat_ms=20.0, min_iters=3,
                    max_iters=100, max_rounds=1)
    t = measure(runner, budget, clock=clock)
    assert t.median_ms == pytest.approx(2.0)
    assert t.max_ms == pytest.approx(2.0)  # the slow calls were warm-up, not samples
    assert t.repeats == 4 and t.samples == 4 * 10  # 20 ms per repeat / 2 ms per call
    assert t.cv == pytest.approx(0.0) and t.clock == "host"
    assert runner.i == 22 + 40


def test_measure_remeasures_when_repeats_disagree_and_stops_at_the_bound() -> None:
    clock = FakeClock()
    # Calls alternate five at 1 ms, five at 3 ms: repeat medians go 1, 3, 1, 3...
    durations = [1.0] * 5 + [3.0] * 5
    budget = Budget(warmup_ms=0.0, warmup_iters=0, repeats=2, iters=5, max_spread=0.05, max_rounds=3)
    runner = FakeRunner(clock, durations)
    t = measure(runner, budget, clock=clock)
    assert runner.i == 1 + 3 * 2 * 5  # one warm-up call, then three rounds of two repeats
    assert t.rounds == 3 and t.repeats == 6  # spread stays high: re-measured up to the bound
    assert t.per_repeat_ms == pytest.approx([1.0, 3.0] * 3)
    steady = measure(FakeRunner(clock, [2.0]), budget, clock=clock)
    assert steady.rounds == 1 and steady.repeats == 2 and steady.median_ms == pytest.approx(2.0)


def test_measure_interleaved_round_robin() -> None:
    clock = FakeClock()
    log: list[str] = []
    a = FakeRunner(clock, [1.0], log, "a")
    b = FakeRunner(clock, [4.0], log, "b")
    budget = Budget(warmup_ms=0.0, warmup_iters=1, repeats=4, iters=2, max_rounds=1)
    ta, tb = measure_interleaved([a, b], budget, clock=clock)
    assert ta.median_ms == pytest.approx(1.0) and tb.median_ms == pytest.approx(4.0)
    timed = log[2:]  # after one warm-up call each
    blocks = ["".join(timed[i:i + 2])[0] for i in range(0, len(timed), 2)]
    assert blocks == ["a", "b", "b", "a", "a", "b", "b", "a"]  # order rotates every repeat


def test_measure_uses_device_clock_when_offered() -> None:
    class DeviceRunner:
        def __call__(self) -> None:
            pass

        def timed(self, iters: int) -> list[float]:
            return [0.25] * iters

        def close(self) -> None:
            pass

    t = measure(DeviceRunner(), FAST)
    assert t.clock == "device" and t.median_ms == pytest.approx(0.25)
    assert measure(DeviceRunner(), FAST, device_clock=False).clock == "host"


# -- export and engines ---------------------------------------------------------------------


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    bn = m[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return m.eval()


def test_export_onnx_runs_in_onnxruntime_and_matches_torch(tmp_path: Path) -> None:
    import onnxruntime as ort

    m = _convnet().train()
    path = tmp_path / "m.onnx"
    data = export_onnx(m, (1, 3, 16, 16), path, dynamic_batch=True)
    assert m.training  # mode restored
    assert path.read_bytes() == data
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    (y,) = sess.run(None, {"input": x})
    with torch.no_grad():
        ref = m.eval()(torch.from_numpy(x)).numpy()
    assert y.shape == (3, 4)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_export_rejects_bad_shape() -> None:
    with pytest.raises(EngineError, match="input shape"):
        export_onnx(_convnet(), (1, 3, 0, 16))


def test_unknown_engine_precision_and_option_list_accepted_values() -> None:
    with pytest.raises(EngineError, match="accepted: onnxruntime, openvino, tensorrt, torch"):
        get_engine("mxnet")
    with pytest.raises(EngineError, match="accepted: fp32, fp16"):
        get_engine("onnxruntime", precision="int8")
    with pytest.raises(EngineError, match="accepted: fp32, fp16, bf16"):
        get_engine("tensorrt", precision="fp8")
    with pytest.raises(EngineError, match="trt_provider"):
        get_engine("onnxruntime", warp_speed=True)
    assert ENGINES == ("onnxruntime", "openvino", "tensorrt", "torch")


def test_onnxruntime_fp16_on_cpu_is_refused_with_the_extra() -> None:
    with pytest.raises(EngineError, match=r"mdp-trt\[ort-gpu\]"):
        get_engine("onnxruntime", precision="fp16", device="cpu")


def test_tensorrt_absent_says_which_extra_to_install() -> None:
    from profilers.engines.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except EngineError as exc:
        assert "pip install 'mdp-trt[tensorrt]'" in str(exc)
    else:
        pytest.skip("TensorRT is installed here")


def test_onnxruntime_engine_identity_and_runner() -> None:
    e = get_engine("onnxruntime", batch_size=2, resolution=16, device="cpu")
    ident = e.identity()
    assert isinstance(ident, EngineIdentity)
    assert (ident.engine, ident.precision, ident.batch_size, ident.resolution, ident.threads) == (
        "onnxruntime", "fp32", 2, 16, 1)
    # One CPU thread: timed by that thread's CPU time unless the wall clock is asked for.
    assert ident.version.endswith("CPUExecutionProvider/thread-cpu-time") and ident.device
    wall = get_engine("onnxruntime", batch_size=2, resolution=16, device="cpu", clock="wall").identity()
    assert wall.version.endswith("CPUExecutionProvider") and wall.differences(ident)
    two = get_engine("onnxruntime", batch_size=2, resolution=16, device="cpu", threads=2)
    assert two.clock == "wall" and e.clock == "cpu"  # a thread's CPU time cannot time two threads
    r = e.prepare(_convnet(), (2, 3, 16, 16))
    try:
        t = measure(r, FAST)
        assert t.median_ms > 0 and t.samples >= 4
    finally:
        r.close()


def test_onnxruntime_thread_cpu_clock() -> None:
    """``clock="cpu"``: each inference timed by the calling thread's CPU time, named in the
    identity (a table of one clock is refused under the other), one CPU thread only."""
    wall = get_engine("onnxruntime", resolution=16, device="cpu", clock="wall")
    cpu = get_engine("onnxruntime", resolution=16, device="cpu", clock="cpu")
    assert cpu.identity().version == wall.identity().version + "/thread-cpu-time"
    assert any("version" in d for d in wall.identity().differences(cpu.identity()))
    r = cpu.prepare(_convnet(), (1, 3, 16, 16))
    try:
        assert len(r.timed(3)) == 3 and all(v > 0 for v in r.timed(3))
        t = measure(r, FAST)
        assert t.clock == "thread-cpu" and t.median_ms > 0
    finally:
        r.close()
    with pytest.raises(EngineError, match="one thread"):
        get_engine("onnxruntime", resolution=16, device="cpu", threads=2, clock="cpu")
    with pytest.raises(EngineError, match="clock 'sundial'"):
        get_engine("onnxruntime", resolution=16, device="cpu", clock="sundial")


def test_thread_cpu_clock_ignores_a_sleeping_thread() -> None:
    """Time the thread spends off the CPU (here: asleep, as when other processes hold the core)
    does not count under the CPU clock, and does under the wall clock."""
    from profilers.engines.onnxruntime import ThreadTimedRunner

    r = ThreadTimedRunner(lambda: time.sleep(0.02))
    assert max(r.timed(3)) < 5.0
    t = measure(HostRunner(lambda: time.sleep(0.02)), FAST, device_clock=False)
    assert t.median_ms >= 20.0


def test_torch_engine_on_cpu_folds_batchnorm_and_refuses_half() -> None:
    from profilers.engines.torch import fold_batchnorm

    m = _convnet()
    x = torch.randn(2, 3, 16, 16)
    folded, did = fold_batchnorm(m, x)
    assert did and not any(isinstance(s, nn.BatchNorm2d) for s in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=1e-4, atol=1e-5)
    e = get_engine("torch", device="cpu", resolution=16)
    assert e.identity().precision == "fp32"
    r = e.prepare(m, (1, 3, 16, 16))
    try:
        assert measure(r, FAST).median_ms > 0
    finally:
        r.close()
    with pytest.raises(EngineError, match="fp32 only on CPU"):
        get_engine("torch", device="cpu", precision="fp16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none seen by torch here)")
def test_torch_engine_cuda_graphs_fp16() -> None:
    e = get_engine("torch", device="cuda", precision="fp16", resolution=32)
    r = e.prepare(_convnet(), (8, 3, 32, 32))
    try:
        t = measure(r, FAST)
        assert t.clock == "device" and t.median_ms > 0
    finally:
        r.close()


# -- the profile loop on a small hand-made space ----------------------------------------------


def fake_space(res: int = 8) -> PruningSpace:
    dims = [
        Dim("a", "channels", 16, 8, (8, 16), layers=("c1",)),
        Dim("b", "channels", 24, 8, (8, 16, 24), layers=("c2",)),
    ]
    terms = [
        Term("t1", "conv", ("a", "b"), (("k", 3), ("hw", res))),
        Term("t2", "conv", ("a", "b"), (("k", 3), ("hw", res))),  # same signature: measured once
        Term("t3", "pw", ("b",), (("hw", res),)),
    ]
    return PruningSpace("fake", "test", dims, [Block("blk", True)], terms, (3, res, res))


class TermModules:
    """Term subgraphs for :func:`fake_space`; counts calls and can fail after ``fail_after``."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, term: Term, widths: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        hw = term.const["hw"]
        if term.kind == "conv":
            a, b = widths
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()), (a, hw, hw)
        (b,) = widths
        return nn.Conv2d(b, 8, 1), (b, hw, hw)


def _engine():
    return get_engine("onnxruntime", resolution=8, device="cpu")


def test_grid_points_deduplicate_by_signature() -> None:
    pts = grid_points(fake_space())
    assert len(pts) == 2 * 3 + 3
    assert pts[("conv[2](hw=8,k=3)", (16, 24))].name == "t1"


def test_profile_killed_midway_resumes_without_remeasuring(tmp_path: Path) -> None:
    space, engine = fake_space(), _engine()
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, engine.identity()) as table, pytest.raises(KeyboardInterrupt):
        profile_space(space, TermModules(fail_after=4), engine, table, progress=False, budget=FAST, recheck=None)
    with LatencyTable.open(path, engine.identity()) as table:
        first = table.keys()
        assert len(first) == 4
        again = TermModules()
        stats = profile_space(space, again, engine, table, progress=False, budget=FAST, recheck=None)
        assert again.calls == 9 - 4 and stats.measured == 5 and stats.reused == 4
        assert table.keys() == set(grid_points(space))
        rerun = TermModules()
        stats = profile_space(space, rerun, engine, table, progress=False, budget=FAST, recheck=None)
        assert rerun.calls == 0 and stats.reused == 9 and stats.measured == 0


def test_profile_killed_by_sigkill_keeps_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_profilers import TermModules, fake_space, _engine, FAST
        from profilers.profile import profile_space
        from profilers.table import LatencyTable

        class Slow(TermModules):
            def __call__(self, term, widths):
                if self.calls >= 3:
                    time.sleep(0.5)
                return super().__call__(term, widths)

        engine = _engine()
        with LatencyTable.open({str(path)!r}, engine.identity()) as table:
            profile_space(fake_space(), Slow(), engine, table, progress=False, budget=FAST, recheck=None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        n = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                try:
                    with LatencyTable.read(path) as t:
                        n = len(t)
                except TableError:
                    n = 0
                if n >= 3:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the profile finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    engine = _engine()
    with LatencyTable.open(path, engine.identity()) as table:
        kept = len(table)
        assert 3 <= kept < 9
        again = TermModules()
        profile_space(fake_space(), again, engine, table, progress=False, budget=FAST, recheck=None)
        assert again.calls == 9 - kept
        assert table.keys() == set(grid_points(fake_space()))


def test_shards_merged_equal_a_single_run(tmp_path: Path) -> None:
    space, engine = fake_space(), _engine()
    ident = engine.identity()
    with LatencyTable.open(tmp_path / "single.sqlite", ident) as t:
        profile_space(space, TermModules(), engine, t, progress=False, budget=FAST, recheck=None)
        single = t.keys()
    shards = []
    for i in range(2):
        p = tmp_path / f"s{i}.sqlite"
        with LatencyTable.open(p, ident) as t:
            stats = profile_space(space, TermModules(), engine, t, shard=(i, 2), progress=False, budget=FAST, recheck=None)
            assert 0 < stats.in_shard < 9 and stats.measured == stats.in_shard
        shards.append(p)
    merge(shards, tmp_path / "merged.sqlite")
    with LatencyTable.read(tmp_path / "merged.sqlite") as t:
        assert t.keys() == single == set(grid_points(space))


def test_profile_refuses_mismatched_table_or_resolution(tmp_path: Path) -> None:
    import dataclasses

    engine = _engine()
    other = dataclasses.replace(engine.identity(), threads=4)
    with LatencyTable.open(tmp_path / "t.sqlite", other) as t, pytest.raises(TableError, match="threads"):
        profile_space(fake_space(), TermModules(), engine, t, progress=False, budget=FAST, recheck=None)
    with LatencyTable.open(tmp_path / "u.sqlite", engine.identity()) as t, \
            pytest.raises(TableError, match="resolution 8"):
        profile_space(fake_space(res=16), TermModules(), engine, t, progress=False, budget=FAST, recheck=None)



class DiskFills(TermModules):
    """Fills the table's file to its page limit (SQLite's SQLITE_FULL, as on a full disk) once
    ``after`` rows were measured, so the next write fails."""

    def __init__(self, table: LatencyTable, after: int) -> None:
        super().__init__()
        self.table, self.after = table, after

    def __call__(self, term: Term, widths: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
        if self.calls == self.after:
            conn = self.table._conn
            conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
            inserts = ("INSERT INTO kv VALUES (?, ?)", "INSERT INTO latency VALUES (?, ?, 0, 0, 0, 0, 0, '')")
            for sql in inserts:  # every table's last page, down to the smallest record
                for size in (512, 64, 8, 1):
                    with pytest.raises(sqlite3.Error, match="full"):
                        for i in range(10_000):
                            with conn:
                                conn.execute(sql, (f"fill/{size}/{i}", "1" * size))
        return super().__call__(term, widths)


def _measured_keys(table: LatencyTable) -> set[tuple[str, tuple[int, ...]]]:
    keys = table.keys()
    return {k for k in keys if not k[0].startswith("fill/")}


def test_profile_out_of_disk_keeps_committed_rows_and_resumes(tmp_path: Path) -> None:
    """A full disk mid-profile stops it with a TableError that says so; every row committed
    before stays, and a rerun (disk freed) measures only the rest."""
    space, engine = fake_space(), _engine()
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, engine.identity()) as table:
        with pytest.raises(TableError, match="cannot write latency table .*full"):
            profile_space(space, DiskFills(table, after=3), engine, table, progress=False, budget=FAST, recheck=None)
        kept = _measured_keys(table)
    assert len(kept) == 3
    with LatencyTable.open(path, engine.identity()) as table:  # a new connection has no page limit
        assert _measured_keys(table) == kept
        again = TermModules()
        stats = profile_space(space, again, engine, table, progress=False, budget=FAST, recheck=None)
        assert again.calls == 9 - 3 and stats.reused == 3 and stats.measured == 6
        assert _measured_keys(table) == set(grid_points(space))


class OtherRunCommits(TermModules):
    """On the first subgraph built, another connection (another run) commits every other point."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def __call__(self, term: Term, widths: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
        if self.calls == 0:
            with LatencyTable.read(self.path) as other:
                for sig, w in grid_points(fake_space()):
                    if (sig, w) != (term.signature, widths):
                        other.put(sig, w, summarize([[1.0, 1.0]]))
        return super().__call__(term, widths)


def test_profile_reuses_points_another_run_committed_meanwhile(tmp_path: Path) -> None:
    space, engine = fake_space(), _engine()
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, engine.identity()) as table:
        modules = OtherRunCommits(path)
        stats = profile_space(space, modules, engine, table, progress=False, budget=FAST, recheck=None)
        assert modules.calls == 1 and stats.measured == 1 and stats.reused == 8
        assert table.keys() == set(grid_points(space))


def test_profile_into_a_read_only_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete read-only table profiles to nothing; one that lacks points says it cannot write."""
    space, engine = fake_space(), _engine()
    full, part = tmp_path / "full.sqlite", tmp_path / "part.sqlite"
    with LatencyTable.open(full, engine.identity()) as t:
        profile_space(space, TermModules(), engine, t, progress=False, budget=FAST, recheck=None)
    with LatencyTable.open(part, engine.identity()) as t, pytest.raises(KeyboardInterrupt):
        profile_space(space, TermModules(fail_after=2), engine, t, progress=False, budget=FAST, recheck=None)
    monkeypatch.setattr("profilers.table._writable", lambda p: False)
    with LatencyTable.open(full, engine.identity()) as t:
        stats = profile_space(space, TermModules(), engine, t, progress=False, budget=FAST, recheck=None)
        assert t.read_only and stats.reused == 9 and stats.measured == 0
    with LatencyTable.open(part, engine.identity()) as t, \
            pytest.raises(TableError, match="read-only and lacks 7 of the 9 grid points"):
        profile_space(space, TermModules(), engine, t, progress=False, budget=FAST, recheck=None)
