"""Budget sweeps (``python -m mdp_trt.sweep``, ``mdp_trt.sweep(...)``): plans for many latency targets from one table, one calibrated
latency model and one importance estimate.

    python -m mdp_trt.sweep --model resnet50 --targets 1.5x 2x 3x 4x --out runs/r50-sweep [--measure]

Writes ``plan-<target>.json`` per target (``%`` spelt ``pct``), ``sweep.json`` and
``sweep.csv`` (budget, predicted latency, importance kept, parameters per target) and
``sweep.png`` (predicted latency against importance kept). Targets are relative to the dense
model's whole-model latency measured for the calibration (kept in the table, so no new
timing). With ``--measure`` every plan is cut and measured beside the dense model, all of them
interleaved in the same rounds (:meth:`mdp_trt.engine_io.Lab.compare`): the measured latency
and speedup join each row. No closed loop: a plan is the solver's optimum under the
calibrated model; ``python -m mdp_trt.prune`` lands one target on the engine.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdp_trt.cli import run_cli
from mdp_trt.config import PruneConfig
from mdp_trt.errors import MdpError
from mdp_trt.space import Plan


@dataclass
class SweepRow:
    """One target: its budget, the plan's predicted latency and importance kept (a share of the
    dense model's), its parameters; measured figures with ``measure``."""

    target: str
    budget_ms: float
    status: str
    predicted_ms: float | None = None
    importance_kept: float | None = None
    params: int | None = None
    removed_blocks: int | None = None
    measured_ms: float | None = None
    speedup: float | None = None
    file: str | None = None


@dataclass
class SweepResult:
    model: str
    dense_ms: float
    dense_params: int
    engine: dict[str, Any]
    rows: list[SweepRow]
    plans: dict[str, Plan] = field(default_factory=dict)
    measurement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dense_ms": self.dense_ms, "dense_params": self.dense_params,
                "engine": self.engine, "measurement": self.measurement, "rows": [asdict(r) for r in self.rows]}

    def write(self, out: Path) -> None:
        """Plans, summary (JSON and CSV) and plot into the existing directory ``out``."""
        for row in self.rows:
            if row.file is not None:
                self.plans[row.target].save(out / row.file)
        (out / "sweep.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        with (out / "sweep.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(asdict(self.rows[0])))
            w.writeheader()
            w.writerows(asdict(r) for r in self.rows)
        plot(self, out / "sweep.png")


def plan_file(target: str) -> str:
    return f"plan-{target.strip().replace('%', 'pct')}.json"


def sweep(model: nn.Module | str, targets: Sequence[str], *, engine: str = "onnxruntime",
          data: Iterable[Any] | str | None = None, loss_fn: Any = None, part: str | None = None,
          measure: bool = False, out: str | Path | None = None, log: Callable[[str], None] | None = None,
          **options: Any) -> SweepResult:
    """A plan per target from one latency table, latency model and importance (see the module
    docstring); arguments as :func:`mdp_trt.prune`. With ``out``, the files are written there."""
    from mdp_trt import engine_io
    from mdp_trt.flops import count_params
    from mdp_trt.importance import estimate
    from mdp_trt.latency import calibrated, latency_model
    from mdp_trt.models import SpaceConfig
    from mdp_trt.optimize import solve_plan
    from mdp_trt.part import Subject
    from mdp_trt.pipeline import Data, build_model, command_data
    from mdp_trt.target import parse_target

    if not targets:
        raise MdpError("no targets to sweep (e.g. 1.5x 2x 3x 4x)")
    parsed = [parse_target(t) for t in targets]
    say = log or (lambda s: None)
    if isinstance(data, str | Path):  # the command's dataset option
        options["data"], data = str(data), None
    config = PruneConfig.from_options(**options, engine=engine)
    config.check()
    torch.manual_seed(config.seed)
    if isinstance(model, str):
        config.model = model
        model = build_model(config)
    subject = Subject(model.eval(), part)
    subject.module.mdp_arch = subject.adapter.arch(subject.module)  # type: ignore[assignment]
    space_config = SpaceConfig(max_choices=config.max_choices, resolution=config.resolution)
    space = subject.space(space_config, config.kinds, not config.no_block_removal)
    lab = engine_io.Lab(config.engine, config.precision, config.batch_size, space.input_size[1], config.threads,
                        config.lut, config.model or str(subject.adapter.arch(subject.module)["name"]),
                        progress=not config.quiet, log=say, clock=config.clock)
    surface = calibrated(lab, subject, space, latency_model(config.latency_model),
                         n_plans=config.calibration_plans, seed=config.seed)
    dense_ms = lab.measure_plans(subject, space, [space.full_plan()])[0]  # measured for the calibration
    if data is not None:
        source = Data(data, loss_fn)
    elif part is None:
        source = command_data(config, subject.root, space.input_size)
    else:
        raise MdpError(f"part={part!r} needs data= (importance is taken from the whole model's loss)")
    imp = estimate(config.importance, subject.module, subject.full_space(space_config), source.batches,
                   config.importance_batches, seed=config.seed, progress=not config.quiet, adapter=subject.adapter,
                   root=subject.root if part is not None else None, loss_fn=source.loss_fn)
    full = sum(float(v.sum()) for v in imp.units.values()) + sum(
        float(v) for b, v in imp.blocks.items() if b not in imp.block_shares)
    dense_params = count_params(subject.root)
    result = SweepResult(config.model or subject.name(), dense_ms, dense_params, lab.identity, [])
    for t in parsed:
        budget = t.budget_ms(dense_ms)
        plan, sol = solve_plan(space, surface, imp, budget, solver=config.solver)
        row = SweepRow(t.text, budget, sol.status)
        if plan is not None:
            result.plans[t.text] = plan
            row.predicted_ms = float(plan.meta["predicted_ms"])
            row.importance_kept = float(plan.meta["objective"]) / full if full > 0 else None
            row.params = count_params(subject.cut(plan, imp, space=space))
            row.removed_blocks, row.file = len(plan.removed), plan_file(t.text)
        say(f"{t.text}: budget {budget:.3f} ms -> " + (f"predicted {row.predicted_ms:.3f} ms, importance kept "
                                                     f"{row.importance_kept:.3f}" if plan else sol.status))
        result.rows.append(row)
    if measure and result.plans:
        _measure(lab, subject, space, imp, result)
    if out is not None:
        from mdp_trt.outdir import written_into

        with written_into(Path(out), bool(config.force)) as tmp:
            result.write(tmp)
    return result


def _measure(lab: Any, subject: Any, space: Any, imp: Any, result: SweepResult) -> None:
    """Every plan cut and measured beside the dense model, interleaved in the same rounds."""
    rows = [r for r in result.rows if r.target in result.plans]
    models = [subject.cut(result.plans[r.target], imp, space=space) for r in rows]
    dense = subject.dense(space)  # rebuilt at full width, as the prune command measures it
    comp = lab.compare([dense, *models], (lab.engine.identity().batch_size, *space.input_size))
    result.dense_ms = comp.ms[0]
    result.measurement = comp.to_dict()
    for r, ms, ratio in zip(rows, comp.ms[1:], comp.ratios[1:], strict=True):
        r.measured_ms, r.speedup = ms, ratio


def plot(result: SweepResult, path: Path) -> None:
    """Importance kept against predicted (and measured) latency, one point per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the reached targets: (target, predicted ms, importance kept, measured ms)
    rows = [(r.target, ms, kept, r.measured_ms) for r in result.rows
            if (ms := r.predicted_ms) is not None and (kept := r.importance_kept) is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([ms for _, ms, _, _ in rows], [kept for _, _, kept, _ in rows], "o-", label="predicted")
    if any(measured is not None for *_, measured in rows):
        ax.plot([math.nan if measured is None else measured for *_, measured in rows],  # NaN: a gap
                [kept for _, _, kept, _ in rows], "s--", label="measured")
    for target, ms, kept, _ in rows:
        ax.annotate(target, (ms, kept), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(result.dense_ms, color="grey", lw=0.8, ls=":", label="dense")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("importance kept (share of dense)")
    ax.set_title(f"{result.model}: {len(rows)} of {len(result.rows)} targets reachable")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mdp_trt.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="timm model name")
    ap.add_argument("--targets", nargs="+", required=True, metavar="T", help="2x, 50%% or 3.2ms each")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true")
    src.add_argument("--checkpoint", type=Path)
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--in-chans", type=int, default=None)
    ap.add_argument("--engine", default="onnxruntime")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"))
    ap.add_argument("--lut", type=Path, default=None, help="latency table (default: luts/<device>/...)")
    ap.add_argument("--max-choices", type=int, default=16)
    ap.add_argument("--calibration-plans", type=int, default=8)
    ap.add_argument("--solver", default="HIGHS")
    ap.add_argument("--latency-model", default="surface", choices=("surface", "linear"))
    ap.add_argument("--kinds", default=None, help="comma-separated dim kinds to prune (default all)")
    ap.add_argument("--no-block-removal", action="store_true")
    ap.add_argument("--data", default="synthetic", help="ImageFolder DIR, fashion-mnist or synthetic")
    ap.add_argument("--importance", default="taylor", choices=("taylor", "magnitude", "random"))
    ap.add_argument("--importance-batches", type=int, default=16)
    ap.add_argument("--train-batch-size", type=int, default=64)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", action="store_true", help="measure every plan beside the dense model")
    ap.add_argument("--out", type=Path, required=True, help="output directory (must not exist, or --force)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """The command: 0 when every target has a plan, 3 when some are out of the space's reach."""
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("model", "targets", "measure", "out", "engine")}
    if options["checkpoint"] is not None and not options["checkpoint"].is_file():
        raise MdpError(f"checkpoint {options['checkpoint']} does not exist")
    from mdp_trt.outdir import check_out

    check_out(args.out, args.force)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.quiet else None
    result = sweep(args.model, args.targets, engine=args.engine, measure=args.measure, out=args.out, log=log,
                   **options)
    for r in result.rows:
        tail = f", measured {r.measured_ms:.3f} ms ({r.speedup:.2f}x)" if r.measured_ms is not None else ""
        print(f"{r.target}: " + (f"predicted {r.predicted_ms:.3f} ms, importance kept {r.importance_kept:.3f}{tail}"
                                 if r.predicted_ms is not None else r.status))
    print(f"sweep: {args.out / 'sweep.png'}")
    return 0 if all(r.file for r in result.rows) else 3


if __name__ == "__main__":
    sys.exit(run_cli(main))
