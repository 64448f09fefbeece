"""Latency targets as users write them: ``2x`` (speedup), ``50%`` (of dense), ``3.2ms``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mdp_trt.errors import MdpError

_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(x|%|ms)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Target:
    """``kind`` is ``speedup``, ``fraction`` or ``ms``; ``text`` is what the user wrote."""

    kind: str
    value: float
    text: str

    def budget_ms(self, dense_ms: float) -> float:
        """The latency budget in milliseconds for a dense latency of ``dense_ms``."""
        if self.kind == "speedup":
            return dense_ms / self.value
        if self.kind == "fraction":
            return dense_ms * self.value
        return self.value


def parse_target(text: str) -> Target:
    """Parse ``2x``, ``50%`` or ``3.2ms``; anything else is refused with the accepted forms."""
    m = _RE.match(text)
    if not m:
        raise MdpError(f"cannot read target {text!r}: use a speedup (2x), a share of dense latency (50%) "
                       "or milliseconds (3.2ms)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "x":
        if value <= 1.0:
            raise MdpError(f"speedup target {text!r} must be above 1x")
        return Target("speedup", value, text.strip())
    if unit == "%":
        if not 0.0 < value < 100.0:
            raise MdpError(f"target {text!r} must be a share of dense latency between 0% and 100%")
        return Target("fraction", value / 100.0, text.strip())
    if value <= 0:
        raise MdpError(f"target {text!r} must be a positive latency")
    return Target("ms", value, text.strip())
