"""mdp_trt: latency-constrained multidimensional pruning of timm vision models."""

from mdp_common import __version__
from mdp_trt.api import apply_plan, arch_of, create_model, load_pruned, prune, save_pruned, space_of
from mdp_trt.budgets import sweep
from mdp_trt.config import PruneConfig
from mdp_trt.errors import MdpError
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.pipeline import PruneResult
from mdp_trt.space import Block, Dim, Plan, PruningSpace, Term

__all__ = [
    "__version__", "apply_plan", "arch_of", "create_model", "load_pruned", "prune", "save_pruned", "space_of",
    "sweep", "PruneConfig", "PruneResult",
    "MdpError", "Importance", "SpaceConfig", "Block", "Dim", "Plan", "PruningSpace", "Term",
]
