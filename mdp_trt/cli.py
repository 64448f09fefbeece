"""Command-line plumbing, defined in :mod:`mdp_common.cli` (shared with ``profilers``)."""

from mdp_common.cli import Terminated, run_cli, sigterm_raises

__all__ = ["Terminated", "run_cli", "sigterm_raises"]
