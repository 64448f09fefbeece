"""Points that read above a larger point of their subgraph are measured again, once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers_timing import FakeClock as Clock
from torch import nn

from mdp_trt.space import Dim, PruningSpace, Term
from profilers.engines.base import EngineIdentity, HostRunner
from profilers.profile import RECHECK, profile_space, suspects
from profilers.table import LatencyTable
from profilers.timing import Budget

BUDGET = Budget(warmup_ms=0.0, warmup_iters=1, repeats=3, iters=2, max_rounds=1)


class StepEngine:
    """A ``1x1 conv`` costs ``in * out`` microseconds; ``slow`` widths are slowed by their
    factor on every prepare (an engine's real step), ``noisy`` ones on their first prepare only
    (something else ran then); ``spell`` slows every run (the machine in a slow spell)."""

    name, precision, batch_size, resolution, device = "fake", "fp32", 1, 8, "cpu"

    def __init__(self, clock: Clock, slow: dict[tuple[int, int], float], noisy: dict[tuple[int, int], float]
                 ) -> None:
        self.clock, self.slow, self.noisy = clock, slow, noisy
        self.prepared: list[tuple[int, int]] = []
        self.spell = 1.0

    def identity(self) -> EngineIdentity:
        return EngineIdentity("fake", "1", "cpu", "", "fp32", 1, 8, 1, "test")

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> HostRunner:
        conv = next(x for x in module.modules() if isinstance(x, nn.Conv2d))
        w = (conv.in_channels, conv.out_channels)
        factor = self.slow.get(w, 1.0) * (self.noisy.get(w, 1.0) if w not in self.prepared else 1.0)
        self.prepared.append(w)
        ms = 1e-3 * w[0] * w[1] * factor

        def run() -> None:
            self.clock.now += ms * self.spell / 1e3

        return HostRunner(run)


def _space() -> PruningSpace:
    dims = [Dim("a", "channels", 32, 8, (8, 16, 24, 32)), Dim("b", "channels", 32, 8, (8, 16, 24, 32))]
    return PruningSpace("fake", "test", dims, [], [Term("t", "conv", ("a", "b"), (("hw", 8),))], (3, 8, 8))


def _module(term: Term, w: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
    return nn.Conv2d(w[0], w[1], 1), (w[0], 8, 8)


def test_suspects_are_points_above_a_point_that_dominates_them() -> None:
    pts = {(8, 8): 1.0, (8, 16): 3.0, (16, 16): 2.0, (16, 8): 2.1}
    # (8, 16) reads 50% above (16, 16); (16, 8) 5% above it: within the tolerance
    assert suspects(pts, 0.08) == [(8, 16)]
    assert suspects(pts, 0.01) == [(8, 16), (16, 8)]  # largest excess first
    assert suspects({(8,): 2.0, (16,): 1.0, (24,): 1.5}, 0.08) == [(8,)]
    assert suspects({(8, 8): 1.0}, 0.0) == []


def test_a_noisy_point_is_lowered_and_a_real_step_stays(tmp_path: Path) -> None:
    clock = Clock()
    # (8, 16) measured while something else ran: 3x its cost the first time only.
    # (16, 24) is slower than (16, 32) on every measurement: the engine's own step.
    engine = StepEngine(clock, slow={(16, 24): 1.8}, noisy={(8, 16): 3.0})
    space = _space()
    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        stats = profile_space(space, _module, engine, table, progress=False, budget=BUDGET, clock=clock)
        got = table.points(space.terms[0].signature)
        records = {k[len(RECHECK):]: table.kv_get(k) for k in table.kv_keys(RECHECK)}
        assert stats.measured == 16 and stats.rechecked == 2 and stats.lowered == 1
        assert got[(8, 16)] == pytest.approx(0.128)  # its true cost
        assert got[(16, 24)] == pytest.approx(1.8 * 0.384)  # still the step
        sig = space.terms[0].signature
        # measured beside the point above it that read fastest, (8, 24): a third of its latency
        assert records[f"{sig}/8,16"] == {"before": pytest.approx(0.384), "after": pytest.approx(0.128),
                                          "beside": [8, 24], "ratio": pytest.approx(16 / 24)}
        assert records[f"{sig}/16,24"]["ratio"] == pytest.approx(1.8 * 24 / 32)
        assert set(records) == {f"{sig}/8,16", f"{sig}/16,24"}
        again = profile_space(space, _module, engine, table, progress=False, budget=BUDGET, clock=clock)
    assert again.measured == 0 and again.rechecked == 0  # each point is rechecked once
    assert "2 above a larger point measured again, 1 lower" in str(stats)


def test_a_complete_table_is_rechecked_once_and_a_read_only_one_never(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    engine = StepEngine(clock, slow={}, noisy={(8, 16): 3.0})
    space = _space()
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, engine.identity()) as table:
        profile_space(space, _module, engine, table, progress=False, budget=BUDGET, clock=clock, recheck=None)
        assert table.points(space.terms[0].signature)[(8, 16)] == pytest.approx(0.384)
    with monkeypatch.context() as m:
        m.setattr("profilers.table._writable", lambda p: False)  # as a superuser sees it too
        with LatencyTable.open(path, engine.identity()) as table:
            assert table.read_only
            stats = profile_space(space, _module, engine, table, progress=False, budget=BUDGET, clock=clock)
            assert stats.rechecked == 0 and stats.measured == 0
    with LatencyTable.open(path, engine.identity()) as table:
        stats = profile_space(space, _module, engine, table, progress=False, budget=BUDGET, clock=clock)
        assert stats.measured == 0 and stats.rechecked == 1 and stats.lowered == 1
        assert table.points(space.terms[0].signature)[(8, 16)] == pytest.approx(0.128)


def test_a_lowered_point_is_no_reference_so_ratios_never_chain(tmp_path: Path) -> None:
    clock = Clock()
    # cost 8 * w us: 64, 128, 192, 256. Width 16 runs 1.7x slow (a real step: 217.6 us), below
    # the first, noisy reading of 24 (1.5x: 288 us) and 13% above its true 192 us. 24 is
    # lowered by its ratio to 32; 16 is then judged against measured readings only and stays
    # (a lowered point as a reference would chain one ratio onto another, and their errors).
    engine = StepEngine(clock, slow={(8, 16): 1.7}, noisy={(8, 24): 1.5})
    dims = [Dim("a", "channels", 32, 8, (8, 16, 24, 32))]
    space = PruningSpace("fake", "test", dims, [], [Term("t", "conv", ("a",), (("hw", 8),))], (8, 8, 8))

    def module(term: Term, w: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
        return nn.Conv2d(8, w[0], 1), (8, 8, 8)

    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        stats = profile_space(space, module, engine, table, progress=False, budget=BUDGET, clock=clock)
        got = table.points(space.terms[0].signature)
        again = profile_space(space, module, engine, table, progress=False, budget=BUDGET, clock=clock)
    assert stats.rechecked == 1 and stats.lowered == 1
    assert got[(24,)] == pytest.approx(0.192) and got[(16,)] == pytest.approx(1.7 * 0.128)
    assert again.rechecked == 0 and again.measured == 0


def test_a_slow_spell_during_the_recheck_does_not_set_the_value(tmp_path: Path) -> None:
    """The machine runs everything 2x slow while a suspect is measured again: alone, the
    second reading (2x) would replace the first (3x); beside the point above it, the ratio of
    the two is the machine's to neither, and the point gets its true latency."""
    clock = Clock()
    engine = StepEngine(clock, slow={}, noisy={(8, 16): 3.0})
    space = _space()
    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        profile_space(space, _module, engine, table, progress=False, budget=BUDGET, clock=clock, recheck=None)
        sig = space.terms[0].signature
        assert table.points(sig)[(8, 16)] == pytest.approx(0.384)
        engine.spell = 2.0
        stats = profile_space(space, _module, engine, table, progress=False, budget=BUDGET, clock=clock)
        assert stats.rechecked == 1 and stats.lowered == 1
        assert table.points(sig)[(8, 16)] == pytest.approx(0.128)
        assert table.get(sig, (8, 16)).samples > 0
