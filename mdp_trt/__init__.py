"""mdp_trt: latency-constrained multidimensional pruning of timm vision models."""

__version__ = "0.1.0"

from mdp_trt.api import apply_plan, arch_of, create_model, load_pruned, prune, save_pruned, space_of  # noqa: E402
from mdp_trt.budgets import sweep  # noqa: E402
from mdp_trt.config import PruneConfig  # noqa: E402
from mdp_trt.errors import MdpError  # noqa: E402
from mdp_trt.models.base import Importance, SpaceConfig  # noqa: E402
from mdp_trt.pipeline import PruneResult  # noqa: E402
from mdp_trt.space import Block, Dim, Plan, PruningSpace, Term  # noqa: E402

__all__ = [
    "__version__", "apply_plan", "arch_of", "create_model", "load_pruned", "prune", "save_pruned", "space_of",
    "sweep", "PruneConfig", "PruneResult",
    "MdpError", "Importance", "SpaceConfig", "Block", "Dim", "Plan", "PruningSpace", "Term",
]
