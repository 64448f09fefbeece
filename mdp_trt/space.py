"""The pruning space, defined in :mod:`mdp_common.space` (shared with ``profilers``)."""

from mdp_common.space import (
    DIM_KINDS,
    PLAN_FORMAT,
    Block,
    Dim,
    Plan,
    PruningSpace,
    Term,
    aligned_choices,
    choices_for,
)

__all__ = ["DIM_KINDS", "PLAN_FORMAT", "Block", "Dim", "Plan", "PruningSpace", "Term",
           "aligned_choices", "choices_for"]
