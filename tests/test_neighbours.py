"""The host probe: does a busy neighbour core slow the measured thread's own CPU time?"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profilers import neighbours
from profilers.neighbours import INFLATION_LIMIT, Probe, busy_cores_slow_thread, load, measure, save


class FakeMeter:
    def __init__(self, cores: float) -> None:
        self.cores = cores

    def others_cores(self) -> float:
        return self.cores


def fake_host(inflation: float, quiet_cores: float = 0.0):
    """A block of 2 ms alone and ``2 * inflation`` ms while the probe's spinners run."""
    state = {"spinning": 0}

    def timed(iters: int) -> list[float]:
        ms = 2.0 * (inflation if state["spinning"] else 1.0)
        return [ms, ms * 1.01, ms * 1.3][: max(1, iters)] * max(1, iters // 3)

    def spin(n: int) -> list[int]:
        state["spinning"] = n
        return [n]

    def stop(procs: list[int]) -> None:
        state["spinning"] = 0

    def meter() -> FakeMeter:
        return FakeMeter(0.0 if state["spinning"] else quiet_cores)

    return timed, spin, stop, meter, state


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neighbours, "usable_cores", lambda: 2)


@pytest.mark.parametrize(("inflation", "slows"), [(1.74, True), (1.02, False)])
def test_probe_measures_the_slowdown_and_stores_it_per_cpu(tmp_path: Path, two_cores: None, inflation: float,
                                                          slows: bool) -> None:
    """The Xeon VM's 1.7x and the EPYC VM's ~1.0x (benchmarks.thread_clock), faked."""
    timed, spin, stop, meter, state = fake_host(inflation)
    probe, why = measure(timed, blocks=3, iters=9, spin=spin, end=stop, meter=meter, settle_s=0.0, cpu="cpu A")
    assert probe is not None and why == ""
    assert probe.inflation == pytest.approx(inflation, rel=1e-9) and probe.spinners == 1
    assert probe.slows is slows and state["spinning"] == 0  # spinners stopped
    path = tmp_path / "host.json"
    save(probe, path)
    save(Probe("cpu B", 1.0, 2.0, 2.0, 0.0, 1, 0.0), path)  # another CPU's record is kept beside it
    assert load("cpu A", path) == probe and load("cpu B", path).inflation == 2.0
    assert busy_cores_slow_thread("cpu A", path) is slows
    assert busy_cores_slow_thread("cpu C", path) is True  # not probed: assume the worst


def test_a_busy_machine_is_not_probed(two_cores: None) -> None:
    timed, spin, stop, meter, _ = fake_host(1.0, quiet_cores=1.5)
    probe, why = measure(timed, blocks=2, iters=6, spin=spin, end=stop, meter=meter, settle_s=0.0, cpu="x")
    assert probe is None and "1.5 cores busy" in why


def test_a_single_core_has_no_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(neighbours, "usable_cores", lambda: 1)
    probe, why = measure(lambda n: [1.0] * n, cpu="x")
    assert probe is None and "single core" in why


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", json.dumps({"cpu A": {"cpu": "cpu A"}}),
                                  json.dumps({"cpu A": {**Probe("cpu A", 1, 1, 1, 0, 1, 0).__dict__, "version": 0}})])
def test_an_unreadable_or_old_store_means_not_probed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "host.json"
    path.write_text(text)
    assert load("cpu A", path) is None and busy_cores_slow_thread("cpu A", path) is True
    save(Probe("cpu A", 1.0, 1.0, 1.0, 0.0, 1, 0.0), path)  # a corrupt store is replaced, not fatal
    assert busy_cores_slow_thread("cpu A", path) is False


def test_the_lab_passes_the_stored_probe_to_the_estimator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn as nn

    from mdp_trt.engine_io import Lab
    from profilers import timing

    path = tmp_path / "host.json"
    monkeypatch.setenv("MDP_TRT_HOST_CACHE", str(path))
    seen: list[bool] = []

    def compare(runners, *a, busy_cores_slow_thread: bool = True, **kw):
        seen.append(busy_cores_slow_thread)
        return "comparison"

    monkeypatch.setattr(timing, "compare", compare)
    lab = Lab("onnxruntime", "fp32", 1, 8, 1, tmp_path / "t.sqlite", "m", progress=False, clock="cpu")
    monkeypatch.setattr(Lab, "sentinel", None)  # no reference block to prepare
    module = nn.Conv2d(3, 4, 1)
    assert lab.compare([module], (1, 3, 8, 8)) == "comparison"
    save(Probe(neighbours.cpu_key(), 1.0, 1.01, 1.01, 0.0, 1, 0.0), path)
    lab.compare([module], (1, 3, 8, 8))
    save(Probe(neighbours.cpu_key(), 1.0, 1.7, 1.7, 0.0, 1, 0.0), path)
    lab.compare([module], (1, 3, 8, 8))
    assert seen == [True, False, True] and INFLATION_LIMIT < 1.7


def test_cli_show_and_bad_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                                 ) -> None:
    from mdp_common.cli import run_cli

    monkeypatch.setenv("MDP_TRT_HOST_CACHE", str(tmp_path / "host.json"))
    assert neighbours.main(["--show"]) == 0
    assert "no probe stored" in capsys.readouterr().out
    assert run_cli(neighbours.main, ["--blocks", "0"]) == 1
    assert "--blocks must be >= 1" in capsys.readouterr().err
