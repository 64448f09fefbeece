"""Exception types. User errors derive from :class:`MdpError`; command lines print them on
one line and exit 1. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class MdpError(Exception):
    """A problem with what the user asked for: bad input, missing files, infeasible targets."""


class UnsupportedModelError(MdpError):
    """The model is not of a family that an adapter understands."""


class PlanError(MdpError):
    """A plan that does not fit the model's pruning space, or a corrupt plan file."""


class TableError(MdpError):
    """A latency table that is corrupt, or was measured under another engine identity."""


class EngineError(MdpError):
    """An engine that is unknown, not installed, or cannot run on this machine."""


class BudgetError(MdpError):
    """A latency target that no plan can meet."""
