"""Solver speed on realistic instances, and agreement with brute force on small ones.

    python -m benchmarks.solver [--ratios 0.2 0.3 0.5 0.7 0.9] [--models ...] [--json] [--repeat N] [--whole]

The instances use the real pruning spaces of resnet50 (default steps) and
deit_base_patch16_224 (heads, qk, v, MLP, embedding width, block removal), and of any other
``--models`` whose family this checkout can prune, with engine-like latency tables (work over
widths, a fixed cost per kernel, steps at misaligned widths) and random cumulative importance,
at each budget of ``--ratios`` (shares of the dense latency). Each line gives the median wall
time and CPU time (``time.process_time``: on a shared machine wall time measures the other
jobs too), whether every solve was proven optimal, and HiGHS's branch-and-bound nodes and
simplex iterations for the solve (counts of work that the machine's load leaves alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import cvxpy as cp
import numpy as np

from solvers import Problem, SolverBlock, SolverDim, SolverTerm, SolverValue, solve

MODELS = ("resnet50", "deit_base_patch16_224", "efficientnet_b3", "convnext_small", "swin_base_patch4_window7_224")


def _table(term: Any, axes: list[tuple[int, ...]]) -> np.ndarray:
    c = term.const
    grids = np.meshgrid(*[np.array(a, dtype=np.float64) for a in axes], indexing="ij") if axes else []
    work = np.prod(np.stack(grids), axis=0) if grids else np.ones(())
    spatial = float(c.get("in_hw", 1)) ** 2 * float(c.get("kernel", 1)) ** 2 / float(c.get("stride", 1)) ** 2
    tokens = float(c.get("tokens", 1))
    misaligned = sum((g % 32 != 0).astype(float) for g in grids) if grids else 0.0
    return 0.01 + 2e-10 * work * spatial * tokens * (1 + 0.08 * misaligned)


def instance(model_name: str, seed: int = 0, shares: bool = False) -> Problem:
    """``shares``: every removable block owns a random part of each unit of the shared widths
    its terms touch (value terms over the block kept and the width's choice, as the MDP
    release's objective has), instead of one fixed value."""
    import timm

    from mdp_trt import space_of

    space = space_of(timm.create_model(model_name))
    rng = np.random.default_rng(seed)
    dims, units = [], {}
    for d in space.dims:
        units[d.name] = np.sort(rng.gamma(1.0, 1.0, d.size))[::-1]
        cum = np.concatenate([[0.0], np.cumsum(units[d.name])])
        dims.append(SolverDim(d.name, d.choices, cum[list(d.choices)], d.block))
    blocks = [SolverBlock(b.name, b.removable, float(rng.random())) for b in space.blocks]
    terms = [SolverTerm(t.name, t.dims, _table(t, [space.dim(n).choices for n in t.dims]), t.block)
             for t in space.terms]
    values = []
    if shares:
        shared = {d.name for d in space.dims if d.block is None}
        touch = {b.name: sorted({n for t in space.terms if t.block == b.name for n in t.dims} & shared)
                 for b in space.blocks if b.removable}
        owners = {n: sum(n in ds for ds in touch.values()) for n in shared}
        by_name = {d.name: d for d in dims}
        for b in blocks:
            for n in touch.get(b.name, []):
                own = units[n] * rng.uniform(0.0, 1.0, len(units[n])) / (owners[n] + 1)
                cum = np.concatenate([[0.0], np.cumsum(own)])[list(by_name[n].choices)]
                values.append(SolverValue(f"{b.name}>{n}", n, cum, b.name))
                by_name[n].value = by_name[n].value - cum
            if touch.get(b.name):
                b.value = 0.0
    return Problem(dims, blocks, terms, values=values)


def _brute(p: Problem, budget: float) -> float:
    import itertools

    removable = [b.name for b in p.blocks if b.removable]
    best = -math.inf
    for k in range(len(removable) + 1):
        for removed in itertools.combinations(removable, k):
            for combo in itertools.product(*(d.choices for d in p.dims)):
                w = dict(zip([d.name for d in p.dims], combo, strict=True))
                if p.latency(w, removed) <= budget:
                    best = max(best, p.objective(w, removed))
    return best


def brute_force_agree(n: int = 50) -> bool:
    """Tiny random instances (shared and private dims, 3-dim terms, removable blocks)."""
    for seed in range(n):
        rng = np.random.default_rng(seed)
        r = random.Random(seed)

        def dim(name: str, block: str | None, r: random.Random = r, rng: np.random.Generator = rng) -> SolverDim:
            ch = tuple(sorted(r.sample(range(1, 9), 3)))
            return SolverDim(name, ch, np.cumsum(rng.random(3)), block)

        dims = [dim("s", None), dim("e", None), dim("a.p", "a"), dim("b.p", "b")]
        blocks = [SolverBlock("a", True, float(rng.random())), SolverBlock("b", True, float(rng.random()))]
        terms = [SolverTerm("t0", ("s", "a.p", "e"), rng.random((3, 3, 3)), "a"),
                 SolverTerm("t1", ("b.p", "e"), rng.random((3, 3)), "b"),
                 SolverTerm("t2", ("s",), rng.random(3), None), SolverTerm("t3", ("e", "s"), rng.random((3, 3)), "b")]
        p = Problem(dims, blocks, terms)
        full = p.latency({d.name: d.choices[-1] for d in dims})
        budget = 0.6 * full
        sol = solve(p, budget)
        expected = _brute(p, budget)
        got = sol.objective if sol.status == "optimal" else -math.inf
        if not (math.isclose(got, expected, rel_tol=1e-6) or got == expected):
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.solver", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--solver", default="HIGHS")
    ap.add_argument("--ratio", type=float, default=None, help="one budget as a share of dense latency")
    ap.add_argument("--ratios", type=float, nargs="+", default=None,
                    help="budgets as shares of dense latency (default 0.5)")
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help="timm models whose spaces make the instances (unsupported families are skipped)")
    ap.add_argument("--shares", action="store_true",
                    help="blocks own random shares of the shared widths (width-dependent block values)")
    ap.add_argument("--repeat", type=int, default=5, help="solves per instance; the median is reported")
    ap.add_argument("--whole", action="store_true", help="also time the whole program without reductions")
    args = ap.parse_args(argv)
    if args.ratio is not None and args.ratios is not None:
        print("error: give --ratio or --ratios, not both", file=sys.stderr)
        return 1
    args.ratios = args.ratios or [args.ratio if args.ratio is not None else 0.5]
    if any(not r > 0 for r in args.ratios):
        print("error: budget ratios must be positive shares of the dense latency", file=sys.stderr)
        return 1
    out: dict[str, Any] = {"solver": args.solver, "solver_version": _version(args.solver),
                           "cvxpy_version": cp.__version__, "machine": f"{platform.machine()}, {_cores()} cores",
                           "load_average": _load(), "repeat": args.repeat}
    optimal = _run(args, out)
    out["proven_optimal"] = bool(optimal)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"proven optimal: {out['proven_optimal']}; brute force agrees: {out['brute_force_agree']}; "
              f"{args.solver} {out['solver_version']}, cvxpy {cp.__version__}, {out['machine']}")
    return 0


def _run(args: argparse.Namespace, out: dict[str, Any]) -> bool:
    from mdp_trt.errors import MdpError

    optimal = True
    modes = (True, False) if args.whole else (True,)
    out["instances"], out["skipped"] = [], {}
    for name in args.models:
        try:
            p = instance(name, shares=args.shares)
        except MdpError as exc:  # a family this checkout has no adapter for
            out["skipped"][name] = str(exc)
            if not args.json:
                print(f"{name:<24} skipped: {exc}")
            continue
        dense = p.latency({d.name: d.choices[-1] for d in p.dims})
        for ratio in args.ratios:
            for reduce in modes:
                sols, cpu = [], []
                for _ in range(args.repeat):
                    c0 = time.process_time()
                    sols.append(solve(p, ratio * dense, solver=args.solver, reduce=reduce))
                    cpu.append(time.process_time() - c0)
                sol = sols[0]
                times = [s.solve_s for s in sols]
                proven = all(s.status == "optimal" and (s.gap is None or s.gap <= 1e-6) for s in sols)
                proven &= all(math.isclose(s.objective, sol.objective, rel_tol=1e-9) for s in sols)
                optimal &= proven
                out["instances"].append({
                    "model": name, "ratio": ratio, "reduced": reduce, "shares": args.shares, "dims": len(p.dims),
                    "removable_blocks": len(p.removable()), "terms": len(p.terms),
                    "status": sol.status, "proven_optimal": proven, "solve_s": statistics.median(times),
                    "solve_s_runs": times, "cpu_s": statistics.median(cpu), "cpu_s_runs": cpu,
                    "gap": max((s.gap or 0.0) for s in sols), "objective": sol.objective,
                    "nodes": sol.nodes, "lp_iterations": sol.lp_iterations,
                    "removed_blocks": len(sol.removed), "predicted_ms": sol.predicted_ms,
                    "budget_ms": ratio * dense})
                if not args.json:
                    print(f"{name:<24} {ratio:>4.0%} {'reduced' if reduce else 'whole':<8} {sol.status:<9} "
                          f"proven optimal {'yes' if proven else 'NO ':<3}  median {statistics.median(times):6.2f} s "
                          f"(min {min(times):.2f}, max {max(times):.2f}, {len(times)} runs; CPU {statistics.median(cpu):.2f} s)  "
                          f"gap {sol.gap}  objective {sol.objective:.6f}  {sol.nodes} nodes  "
                          f"{sol.lp_iterations} simplex iterations  {len(sol.removed)} blocks removed  "
                          f"{sol.predicted_ms:.4f}/{ratio * dense:.4f} ms", flush=True)
    out["brute_force_agree"] = brute_force_agree()
    return optimal


def _load() -> list[float] | None:
    """1, 5 and 15 minute load averages, where the OS reports them (other jobs slow the solves)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(solver: str) -> str:
    from importlib import metadata

    package = {"HIGHS": "highspy", "SCIPY": "scipy", "SCIP": "pyscipopt", "GUROBI": "gurobipy",
               "CPLEX": "cplex", "MOSEK": "mosek", "XPRESS": "xpress", "CBC": "cylp", "GLPK_MI": "cvxopt"}
    try:
        return metadata.version(package.get(solver, solver.lower()))
    except metadata.PackageNotFoundError:
        return "unknown"


def _cores() -> int:
    return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
