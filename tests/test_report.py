"""The prune report's verdict on the measured latency against the budget."""

from __future__ import annotations

import pytest

from mdp_trt.report import verdict


@pytest.mark.parametrize(("measured", "words"), [
    (10.2, "on target"),
    (9.8, "on target"),
    (9.0, "over-pruned"),
    (10.5, "missed"),
])
def test_verdict(measured: float, words: str) -> None:
    r = {"target": {"budget_ms": 10.0}, "pruned_ms": measured, "tolerance_pct": 3.0}
    text = verdict(r)
    assert words in text
    assert f"{measured:.3f} ms" in text and "10.000 ms" in text
    assert f"{100 * (measured / 10 - 1):+.1f}%" in text
