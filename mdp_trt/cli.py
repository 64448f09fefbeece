"""Shared command-line plumbing: user errors print one line and exit 1, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from mdp_trt.errors import MdpError


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; an :class:`MdpError` becomes ``error: <message>`` on stderr and exit code 1."""
    try:
        return main(argv)
    except MdpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
