"""What a model adapter does: describe a family's pruning space and apply plans to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch import nn

from mdp_trt.space import Plan, PruningSpace, Term


@dataclass(frozen=True)
class SpaceConfig:
    """How finely widths are cut. Channel-like steps are multiples of ``min_step``.

    ``resolution`` is the square input side that latency terms are built for; ``None`` means
    the model's own (for a ViT it must equal the model's image size: create the model with
    ``img_size`` to change it).
    """

    min_step: int = 8
    max_choices: int = 16
    head_step: int = 1
    per_head_step: int = 8
    resolution: int | None = None


@dataclass
class Importance:
    """Score per unit of every dim (1-D, length ``dim.size``) and per block.

    ``blocks[name]`` is the importance lost when the block is removed, beyond the scores of
    its private dims (which go with it anyway).

    ``block_shares[block][dim]`` (optional): the part of each unit's score of a shared dim
    that the block owns (a residual block's last layer writes into its stage's residual
    width). Removing the block then loses its share of the units kept, a value that depends
    on the width kept: at ``k`` kept units, the sum of its share over the dim's top-k units
    (:meth:`share`). A block with shares has its whole value in them; its ``blocks`` entry is
    their total at full width, for readers that take one number per block.
    """

    units: dict[str, np.ndarray]
    blocks: dict[str, float]
    block_shares: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def ranking(self, dim_name: str) -> np.ndarray:
        """Units of a dim from the highest score down (ties: the lower index first), the order
        in which plans keep them."""
        s = np.nan_to_num(np.asarray(self.units[dim_name], dtype=np.float64), nan=-np.inf)
        return np.argsort(-s, kind="stable")

    def cumulative(self, dim_name: str, choices: tuple[int, ...]) -> np.ndarray:
        """Importance of keeping the top-k units for each k in ``choices``."""
        s = np.sort(np.asarray(self.units[dim_name], dtype=np.float64))[::-1]
        c = np.concatenate([[0.0], np.cumsum(s)])
        return np.array([c[k] for k in choices])

    def share(self, block: str, dim_name: str, choices: tuple[int, ...]) -> np.ndarray:
        """The block's share of a dim's importance kept at each k in ``choices``: its share
        summed over the top-k units of the dim's own ranking."""
        own = np.asarray(self.block_shares[block][dim_name], dtype=np.float64)
        c = np.concatenate([[0.0], np.cumsum(own[self.ranking(dim_name)])])
        return np.array([c[k] for k in choices])


class Adapter(Protocol):
    """A timm model family. Adapters are stateless; register them in ``mdp_trt.models``."""

    family: str

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter understands ``model`` (cheap structural check)."""
        ...

    def why_not(self, model: nn.Module) -> str:
        """For a model of this family that cannot be handled: what blocked it ('' if fine)."""
        ...

    def arch(self, model: nn.Module) -> dict[str, Any]:
        """``{"name": timm name, "kwargs": {...}}`` enough for ``timm.create_model`` to rebuild it."""
        ...

    def space(self, model: nn.Module, config: SpaceConfig) -> PruningSpace: ...

    def term_module(self, space: PruningSpace, term: Term, widths: tuple[int, ...]
                    ) -> tuple[nn.Module, tuple[int, ...]]:
        """A runnable module for one term at the given widths, and its input shape (no batch)."""
        ...

    def magnitude(self, model: nn.Module, space: PruningSpace) -> Importance:
        """Deterministic weight-norm importance, used when none is given."""
        ...

    def taylor_terms(self, model: nn.Module, space: PruningSpace
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Signed first-order Taylor terms from the gradients now on ``model``'s parameters.

        Per unit of every dim (summed over all layers of a shared width before any absolute
        value), and per removable block. The caller takes absolute values per batch and
        averages over batches.
        """
        ...

    def apply(self, model: nn.Module, space: PruningSpace, plan: Plan,
              importance: Importance) -> nn.Module:
        """A new, physically smaller module; ``model`` is left untouched."""
        ...

    def param_count(self, space: PruningSpace, plan: Plan) -> int:
        """Parameters of the pruned model, computed from the plan alone."""
        ...
