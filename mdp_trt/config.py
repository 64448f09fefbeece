"""The prune job's options as one typed value: the command builds it from its flags, the Python
API from keyword arguments, and the pipeline reads nothing else."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdp_trt.errors import MdpError


@dataclass
class PruneConfig:
    """Every option of ``python -m mdp_trt.prune``, with the command's defaults.

    ``model`` names the timm model the command builds (the Python API takes a module too, and
    then uses it only to name the latency table and the report). ``target`` is ``2x``, ``50%``
    or ``3.2ms``.
    """

    model: str = ""
    target: str = "2x"
    pretrained: bool = False
    checkpoint: Path | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    engine: str = "onnxruntime"
    precision: str = "fp32"
    batch_size: int = 1
    resolution: int | None = None
    threads: int | None = None
    clock: str = "auto"
    lut: Path | None = None
    max_choices: int = 16
    calibration_plans: int = 8
    tolerance: float = 3.0
    max_rounds: int = 6
    solver: str = "HIGHS"
    latency_model: str = "surface"
    kinds: tuple[str, ...] | None = None
    no_block_removal: bool = False
    data: str = "synthetic"
    importance: str = "taylor"
    importance_batches: int = 16
    train_batch_size: int = 64
    finetune_epochs: float = 0.0
    lr: float = 1e-3
    steps: int = 1
    train_limit: int | None = None
    val_limit: int | None = None
    seed: int = 0
    quiet: bool = False
    out: Path | None = None
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``timm.create_model`` beyond the ones above (Python API only)."""

    def check(self) -> None:
        """Refuse values no job can run with, each in one line naming the option."""
        if self.steps < 1 or self.max_rounds < 1:
            raise MdpError("--steps and --max-rounds must be at least 1")
        if self.clock not in ("auto", "wall", "cpu"):
            raise MdpError(f"clock {self.clock!r}: use auto, wall or cpu")
        if self.latency_model not in ("surface", "linear"):
            raise MdpError(f"latency model {self.latency_model!r}: use surface or linear")

    @classmethod
    def from_options(cls, **options: Any) -> PruneConfig:
        """A config from keyword arguments; an unknown name is refused with the accepted ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise MdpError(f"unknown option(s) {', '.join(unknown)}; accepted: {', '.join(sorted(names))}")
        if isinstance(options.get("kinds"), str):
            options["kinds"] = tuple(options["kinds"].split(","))
        for key in ("checkpoint", "lut", "out"):
            if options.get(key) is not None:
                options[key] = Path(options[key])
        return cls(**options)
