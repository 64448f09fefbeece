"""The layer-level graph of channel coupling, shared by every convolutional family.

Every tensor that flows through the model carries a *width variable* on its channel axis.
Layers read and write variables; widths that must stay equal (the two sides of a residual
add, the input and output of a depthwise conv, a gate and the tensor it scales, a norm and
the conv before it) are merged by union-find, and each merged class is one prunable dim.
The image's channels and the classifier's outputs are fixed.

This module is plain data and union-find; :mod:`mdp_trt.models.trace` fills it from a model
and :mod:`mdp_trt.models.rules` says how each module type takes part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mdp_trt.models.rules import Rule


class Unsupported(Exception):
    """Something in the model that the graph cannot handle (the message names the layer and why)."""


@dataclass
class Var:
    """One width variable: its size, whether it may shrink, and the unit it shrinks by."""

    size: int
    fixed: str = ""  # why it cannot shrink ('' when it can)
    gran: int = 1  # channels per unit (a grouped conv prunes whole groups)


@dataclass(frozen=True)
class Val:
    """A tensor whose axis ``axis`` (of ``ndim``) carries width variable ``var``."""

    var: int
    axis: int
    ndim: int


@dataclass(frozen=True)
class ParamVal:
    """A bare parameter (``get_attr``) on its way to scale a tensor, reshaped so that its
    channel axis is ``axis`` (None while still 1-D)."""

    path: str
    axis: int | None
    ndim: int


@dataclass
class Layer:
    """A module (or a bare parameter, ``attr`` set) that reads or writes width variables.

    ``vars`` maps each role of the rule (``in``, ``out``, ``inner``) to a variable.
    """

    name: str
    rule: Rule
    vars: dict[str, int]
    node: str
    attr: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}.{self.attr}" if self.attr else self.name


@dataclass
class ChannelGraph:
    """Width variables, the layers on them, and the union-find that merges coupled ones."""

    vars: list[Var] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)

    def new_var(self, size: int, fixed: str = "", gran: int = 1) -> int:
        self.vars.append(Var(int(size), fixed, gran))
        self.parent.append(len(self.parent))
        return len(self.vars) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int, why: str) -> int:
        """Merge the classes of ``a`` and ``b`` (their sizes must agree); the merged root."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        va, vb = self.vars[ra], self.vars[rb]
        if va.size != vb.size:
            raise Unsupported(f"{why} ties widths {va.size} and {vb.size}")
        self.parent[rb] = ra
        va.fixed = va.fixed or vb.fixed
        va.gran = va.gran * vb.gran // math.gcd(va.gran, vb.gran)
        return ra

    def var(self, v: int) -> Var:
        """The merged class of ``v`` (size, fixedness, unit)."""
        return self.vars[self.find(v)]

    def fix(self, v: int, why: str) -> None:
        r = self.vars[self.find(v)]
        r.fixed = r.fixed or why

    def add_layer(self, name: str, rule: Rule, vars: dict[str, int], node: str, attr: str = "") -> Layer:
        layer = Layer(name, rule, dict(vars), node, attr)
        self.layers.append(layer)
        return layer

    def classes(self) -> dict[int, list[Layer]]:
        """Every prunable class (root var) with the layers on it, in layer order."""
        out: dict[int, list[Layer]] = {}
        for layer in self.layers:
            for v in dict.fromkeys(self.find(x) for x in layer.vars.values()):
                if not self.vars[v].fixed:
                    out.setdefault(v, []).append(layer)
        return out
