"""Shared command-line plumbing: user errors print one line and exit 1, without a traceback;
Ctrl-C and SIGTERM unwind the same way (cleanup runs) and exit 130 and 143."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from mdp_common.errors import MdpError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C, so that ``finally`` blocks clean up."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; an :class:`MdpError` becomes ``error: <message>`` on stderr and exit code 1,
    SIGTERM ``terminated`` and 143, Ctrl-C ``interrupted`` and 130."""
    try:
        with sigterm_raises():
            return main(argv)
    except MdpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
