"""The pruning space of a model: prunable widths (dims), removable blocks, latency terms.

A space is plain data. Model adapters (``mdp_trt.models``) build it from a timm model,
profilers time its terms, the solver chooses a width per dim and which blocks to keep,
and the adapter applies the resulting :class:`Plan` to the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdp_common.errors import PlanError

DIM_KINDS = ("channels", "heads", "qk", "v", "mlp", "embed")
PLAN_FORMAT = 1


def aligned_choices(size: int, min_step: int = 8, max_choices: int = 16) -> tuple[int, int]:
    """Step for a width of ``size``: a multiple of ``min_step`` giving at most ``max_choices``.

    Returns ``(step, n)``; the choices are ``step, 2*step, ...`` and always end at ``size``.
    """
    if size <= min_step:
        return size, 1
    step = min_step * max(1, math.ceil(size / (min_step * max_choices)))
    return step, len(choices_for(size, step))


def choices_for(size: int, step: int) -> tuple[int, ...]:
    """Multiples of ``step`` up to ``size``, plus ``size`` itself when it is not a multiple."""
    out = list(range(step, size + 1, step))
    if not out or out[-1] != size:
        out.append(size)
    return tuple(out)


@dataclass(frozen=True)
class Dim:
    """One prunable width.

    ``layers`` names every module that reads or writes this width, so that surgery and
    importance agree on what one unit is. ``block`` is the block that owns the width
    privately (it goes when the block is removed); ``None`` for a width shared by blocks.
    """

    name: str
    kind: str
    size: int
    step: int
    choices: tuple[int, ...]
    block: str | None = None
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in DIM_KINDS:
            raise ValueError(f"dim {self.name}: kind {self.kind!r} not in {DIM_KINDS}")
        if not self.choices or self.choices[-1] != self.size:
            raise ValueError(f"dim {self.name}: choices must end at the full size {self.size}")
        if list(self.choices) != sorted(set(self.choices)) or self.choices[0] < 1:
            raise ValueError(f"dim {self.name}: choices must be increasing positive integers")


@dataclass(frozen=True)
class Block:
    """A residual block. ``dims`` are the widths private to it; ``reason`` says why it is locked."""

    name: str
    removable: bool
    reason: str = ""
    dims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Term:
    """A latency term: a small subgraph whose latency depends on at most three dims.

    ``dims`` names the dims the term's widths come from, in the order the adapter's
    ``term_module`` takes them. ``consts`` are the fixed parameters (kernel, stride,
    feature-map size, tokens, fixed input channels...). ``block`` is the block the term
    belongs to (its latency counts only while the block is kept); ``None`` for fixed parts
    such as the stem and the head. Terms with the same ``signature`` share measurements.
    """

    name: str
    kind: str
    dims: tuple[str, ...]
    consts: tuple[tuple[str, Any], ...] = ()
    block: str | None = None

    def __post_init__(self) -> None:
        if len(self.dims) > 3:
            raise ValueError(f"term {self.name}: at most three dims, got {self.dims}")

    @property
    def const(self) -> dict[str, Any]:
        return dict(self.consts)

    @property
    def signature(self) -> str:
        """Kind and constants: two terms with the same signature run the same subgraph."""
        consts = ",".join(f"{k}={v}" for k, v in sorted(self.consts))
        return f"{self.kind}[{len(self.dims)}]({consts})"


@dataclass
class Plan:
    """Kept width of every dim and the removed blocks, for one model's space."""

    model: str
    space_id: str
    widths: dict[str, int]
    removed: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "space_id": self.space_id,
            "widths": dict(self.widths),
            "removed": list(self.removed),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        try:
            if data.get("format") != PLAN_FORMAT:
                raise PlanError(f"unsupported plan format {data.get('format')!r} (expected {PLAN_FORMAT})")
            widths = {str(k): int(v) for k, v in dict(data["widths"]).items()}
            return cls(
                model=str(data["model"]),
                space_id=str(data["space_id"]),
                widths=widths,
                removed=tuple(str(b) for b in data.get("removed", ())),
                meta=dict(data.get("meta", {})),
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"corrupt plan: {exc!r}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"cannot read plan {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise PlanError(f"corrupt plan {path}: not a JSON object")
        return cls.from_dict(data)


@dataclass
class PruningSpace:
    """Dims, blocks and latency terms of one model, plus the adapter that built them."""

    model: str
    family: str
    dims: list[Dim]
    blocks: list[Block]
    terms: list[Term]
    input_size: tuple[int, int, int]
    locked: list[tuple[str, str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    # What the adapter cuts term modules from (the model read into its graph); not part of
    # the space's data: never compared, printed or saved. None for spaces made elsewhere.
    handle: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._dims = {d.name: d for d in self.dims}
        self._blocks = {b.name: b for b in self.blocks}
        for t in self.terms:
            missing = [d for d in t.dims if d not in self._dims]
            if missing:
                raise ValueError(f"term {t.name} names unknown dims {missing}")
            if t.block is not None and t.block not in self._blocks:
                raise ValueError(f"term {t.name} names unknown block {t.block}")

    def dim(self, name: str) -> Dim:
        return self._dims[name]

    def block(self, name: str) -> Block:
        return self._blocks[name]

    @property
    def space_id(self) -> str:
        """Fingerprint of the model's structure: a plan made for another model is refused.

        It leaves out the choices and which blocks may go, so a plan from a restricted space
        (:meth:`restricted`) or a finer grid is still checked choice by choice by :meth:`validate`.
        """
        h = hashlib.sha1()
        h.update(f"{self.family}|{self.model}|{self.input_size}".encode())
        for d in self.dims:
            h.update(f"|{d.name}:{d.kind}:{d.size}".encode())
        for b in self.blocks:
            h.update(f"|{b.name}".encode())
        return h.hexdigest()[:16]

    def restricted(self, kinds: Iterable[str] | None = None, remove_blocks: bool = True) -> PruningSpace:
        """The same space with only dims of ``kinds`` prunable and, unless ``remove_blocks``,
        every block locked (for ablations). Its plans are valid plans of this space too."""
        keep = set(DIM_KINDS if kinds is None else kinds)
        unknown = keep - set(DIM_KINDS)
        if unknown:
            raise PlanError(f"unknown dim kinds {sorted(unknown)}; accepted: {', '.join(DIM_KINDS)}")
        dims = [d if d.kind in keep else Dim(d.name, d.kind, d.size, d.size, (d.size,), d.block, d.layers)
                for d in self.dims]
        blocks = self.blocks if remove_blocks else [
            Block(b.name, False, b.reason or "block removal disabled", b.dims) for b in self.blocks]
        return PruningSpace(self.model, self.family, dims, blocks, self.terms, self.input_size,
                            list(self.locked), dict(self.config), self.handle)

    def plan(self, widths: Mapping[str, int] | None = None, removed: Iterable[str] = ()) -> Plan:
        """A plan from partial widths (unnamed dims stay full) and removed blocks, validated."""
        full = {d.name: d.size for d in self.dims}
        full.update(widths or {})
        p = Plan(self.model, self.space_id, full, tuple(removed), {"space_config": dict(self.config)})
        self.validate(p)
        return p

    def full_plan(self) -> Plan:
        return self.plan()

    def random_plan(self, seed: int) -> Plan:
        """A valid plan that shrinks at least one dim of every kind and removes a block."""
        rng = random.Random(seed)
        widths = {}
        for d in self.dims:
            widths[d.name] = rng.choice(d.choices) if rng.random() < 0.7 else d.size
        for kind in {d.kind for d in self.dims}:
            cands = [d for d in self.dims if d.kind == kind and len(d.choices) > 1]
            if cands and all(widths[d.name] == d.size for d in cands):
                d = rng.choice(cands)
                widths[d.name] = rng.choice(d.choices[:-1])
        removable = [b.name for b in self.blocks if b.removable]
        removed: list[str] = []
        if removable:
            removed = rng.sample(removable, k=rng.randint(1, max(1, min(2, len(removable) // 2))))
        return self.plan(widths, removed)

    def validate(self, plan: Plan) -> None:
        """Raise :class:`PlanError` with the reason if ``plan`` does not fit this space."""
        if plan.model != self.model:
            raise PlanError(f"plan is for model {plan.model!r}, not {self.model!r}")
        if plan.space_id != self.space_id:
            raise PlanError(
                f"plan was made for another pruning space of {plan.model!r} "
                f"(space id {plan.space_id}, this model's is {self.space_id})"
            )
        unknown = sorted(set(plan.widths) - set(self._dims))
        if unknown:
            raise PlanError(f"plan names unknown dims {unknown[:5]}")
        missing = sorted(set(self._dims) - set(plan.widths))
        if missing:
            raise PlanError(f"plan lacks dims {missing[:5]}")
        for name, w in plan.widths.items():
            d = self._dims[name]
            if w not in d.choices:
                raise PlanError(
                    f"dim {name}: width {w} is not one of its choices "
                    f"({d.choices[0]}..{d.size} in steps of {d.step})"
                )
        for b in plan.removed:
            if b not in self._blocks:
                raise PlanError(f"plan removes unknown block {b!r}")
            if not self._blocks[b].removable:
                raise PlanError(f"block {b} cannot be removed: {self._blocks[b].reason}")
        if len(set(plan.removed)) != len(plan.removed):
            raise PlanError("plan removes a block twice")

    def is_full(self, plan: Plan) -> bool:
        return not plan.removed and all(plan.widths[d.name] == d.size for d in self.dims)

    def term_widths(self, term: Term, plan: Plan) -> tuple[int, ...]:
        return tuple(plan.widths[d] for d in term.dims)

    def kept_terms(self, plan: Plan) -> list[Term]:
        removed = set(plan.removed)
        return [t for t in self.terms if t.block not in removed]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description, as printed by ``python -m mdp_trt.inspect``."""
        return {
            "model": self.model,
            "family": self.family,
            "input_size": list(self.input_size),
            "space_id": self.space_id,
            "dims": [
                {
                    "name": d.name,
                    "kind": d.kind,
                    "size": d.size,
                    "step": d.step,
                    "choices": list(d.choices),
                    "block": d.block,
                    "layers": list(d.layers),
                }
                for d in self.dims
            ],
            "blocks": [
                {"name": b.name, "removable": b.removable, "reason": b.reason, "dims": list(b.dims)}
                for b in self.blocks
            ],
            "terms": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "dims": list(t.dims),
                    "consts": dict(t.consts),
                    "block": t.block,
                    "signature": t.signature,
                }
                for t in self.terms
            ],
            "locked": [{"what": w, "reason": r} for w, r in self.locked],
        }
