"""Exception types, defined in :mod:`mdp_common.errors` (shared with ``profilers``)."""

from mdp_common.errors import (
    BudgetError,
    EngineError,
    MdpError,
    PlanError,
    TableError,
    UnsupportedModelError,
)

__all__ = ["BudgetError", "EngineError", "MdpError", "PlanError", "TableError", "UnsupportedModelError"]
