"""The prune job: profile, calibrate, score, solve, cut, validate on the engine, fine-tune, export.

Every latency in the report is measured on the chosen engine with one setting for dense and
pruned models (measured interleaved); predictions come from the calibrated surface.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdp_trt import engine_io
from mdp_trt.api import apply_plan, create_model, save_pruned
from mdp_trt.data import DataSpec, evaluate, loaders
from mdp_trt.errors import BudgetError
from mdp_trt.finetune import TrainConfig, share, train, world
from mdp_trt.flops import count_flops, count_params
from mdp_trt.importance import estimate
from mdp_trt.models import SpaceConfig, adapter_for
from mdp_trt.optimize import solve_plan
from mdp_trt.space import Plan, PruningSpace
from mdp_trt.surface import LatencySurface, fit_calibration, linear_surface
from mdp_trt.target import Target

Log = Callable[[str], None]


def prune(args: argparse.Namespace, target: Target, out: Path, log: Log) -> dict[str, Any]:
    """Run the job into ``out`` (a fresh directory) and return the report."""
    t_start = time.time()
    kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                         resolution=args.resolution, **kwargs).eval()
    adapter = adapter_for(model)
    model.mdp_arch = adapter.arch(model)  # type: ignore[assignment]
    config = SpaceConfig(max_choices=args.max_choices, resolution=args.resolution)
    kinds = args.kinds.split(",") if args.kinds else None
    space = adapter.space(model, config).restricted(kinds, not args.no_block_removal)
    input_shape = (args.batch_size, *space.input_size)
    progress = not args.quiet

    # Engine, latency table (profiling what is missing), surface and calibration.
    lab = engine_io.Lab(args.engine, args.precision, args.batch_size, space.input_size[1], args.threads,
                        args.lut, args.model, progress=progress, log=log, clock=args.clock)
    surface = lab.surface(model, space, calibration_plans=args.calibration_plans, seed=args.seed)
    if args.latency_model == "linear":
        surface = lab.linear(model, space, surface, args.calibration_plans, args.seed)
    dense_pred = surface.predict(space.full_plan())

    # Data, accuracy of the dense model, importance.
    spec = DataSpec(space.input_size[0], space.input_size[1], _num_classes(model))
    train_loader, val_loader = loaders(args.data, spec, args.train_batch_size, args.train_limit,
                                       args.val_limit, seed=args.seed)
    real_data = args.data != "synthetic"
    accuracy: dict[str, float] = {}
    if real_data:
        accuracy["dense"] = evaluate(model, val_loader)
        log(f"dense top-1: {accuracy['dense']:.2f}%")

    # Dense latency on the engine: the reference every target is relative to.
    dense_ms = lab.measure([model], input_shape)[0]
    budget = target.budget_ms(dense_ms)
    log(f"dense: {dense_ms:.3f} ms measured, {dense_pred:.3f} ms predicted; budget {budget:.3f} ms ({target.text})")
    if budget >= dense_ms * (1 - args.tolerance / 100):
        raise BudgetError(f"the target {target.text} ({budget:.4g} ms) is no faster than the dense model "
                          f"({dense_ms:.4g} ms measured on this engine): nothing to prune")

    # Prune: K steps towards the budget, each a closed loop of solve -> cut -> measure.
    plans: list[Plan] = []
    rounds: list[dict[str, Any]] = []
    current, cur_space, cur_surface = model, space, surface
    note = ""
    for step in range(1, args.steps + 1):
        step_budget = dense_ms - (dense_ms - budget) * step / args.steps
        if step > 1:
            cur_space = adapter.space(current, config).restricted(kinds, not args.no_block_removal)
            cur_surface = lab.surface(current, cur_space, calibration=surface.calibration)
            if args.latency_model == "linear":
                cal = cur_surface.calibration
                cur_surface = linear_surface(cur_surface)
                cur_surface.calibration = cal
        # Scored over the unrestricted space: adapters score every removable block of the model,
        # and a restriction (--kinds, --no-block-removal) only limits what the solver may choose.
        imp = estimate(args.importance, current, adapter.space(current, config), train_loader,
                       args.importance_batches, seed=args.seed, progress=progress)
        last = step == args.steps

        def budget_of(d: float | None, sb: float = step_budget, last: bool = last) -> float:
            return target.budget_ms(d) if last and d is not None else sb

        plan, pruned, measured, step_rounds, note = _closed_loop(
            args, lab, current, cur_space, cur_surface, imp, model if last else None, budget_of,
            input_shape, log)
        rounds += [dict(r, step=step) for r in step_rounds]
        plans.append(plan)
        current = pruned
        if args.finetune_epochs > 0:
            epochs = args.finetune_epochs / args.steps
            if real_data and step == 1:
                accuracy["pruned_before_finetune"] = evaluate(current, val_loader)
            cfg = TrainConfig(epochs=epochs, batch_size=args.train_batch_size, lr=args.lr, seed=args.seed,
                              progress=progress)
            desc = f"fine-tune step {step}/{args.steps}"
            if world()[0] > 1:  # the other torchrun processes train it too
                share(("train", copy.deepcopy(current).cpu(), spec, cfg, desc))
            train(current, train_loader.dataset, cfg, desc=desc)
    chosen = next(r for r in reversed(rounds) if r.get("chosen"))
    pruned, pruned_ms = current, chosen["measured_ms"]
    measurement = chosen["measurement"]
    # Dense and pruned as measured side by side in the chosen round: drift moves both.
    dense_ms, budget = chosen.get("dense_ms", dense_ms), chosen["budget_ms"]
    if real_data:
        accuracy["pruned" if args.finetune_epochs > 0 else "pruned_no_finetune"] = evaluate(pruned, val_loader)

    # Outputs.
    final = plans[-1]
    plan_doc = final.to_dict()
    plan_doc["lineage"] = [p.to_dict() for p in plans[:-1]]
    plan_doc["engine"] = lab.identity
    plan_doc["target"] = target.text
    (out / "plan.json").write_text(json.dumps(plan_doc, indent=2) + "\n")
    save_pruned(out / "pruned.pt", pruned, plans, arch=model.mdp_arch)  # type: ignore[arg-type]
    files = ["plan.json", "pruned.pt"] + lab.export(pruned, input_shape, out)

    met = pruned_ms <= budget * (1 + args.tolerance / 100)
    report: dict[str, Any] = {
        "model": args.model,
        "target": {"text": target.text, "kind": target.kind, "value": target.value, "budget_ms": budget},
        "engine": lab.identity,
        "dense_ms": dense_ms,
        "dense_predicted_ms": dense_pred,
        "pruned_ms": pruned_ms,
        "predicted_ms": chosen["predicted_ms"],
        "speedup": chosen.get("speedup", dense_ms / pruned_ms),
        "target_met": bool(met) and measurement["reliable"],
        "measurement": measurement,
        "tolerance_pct": args.tolerance,
        "prediction_error_pct": 100 * abs(chosen["predicted_ms"] - pruned_ms) / pruned_ms,
        "params_before": count_params(model),
        "params_after": count_params(pruned),
        "flops_before": count_flops(model, (1, *space.input_size)),
        "flops_after": count_flops(pruned, (1, *space.input_size)),
        "accuracy": accuracy,
        "importance": args.importance,
        "finetune": {"epochs": args.finetune_epochs, "processes": world()[0]},
        "steps": args.steps,
        "rounds": rounds,
        "calibration": surface.calibration.to_dict(),
        "interpolated_points": surface.interpolated_points,
        "blocks": _blocks(space, surface, final if args.steps == 1 else None),
        "dims": _dims(cur_space, final),
        "table": str(lab.table_path),
        "wall_s": time.time() - t_start,
        "files": files,
        "note": note,
    }
    return report


def follow(args: argparse.Namespace) -> None:
    """A torchrun process other than the first: fine-tune, with the first, each model it hands
    over (see :func:`mdp_trt.finetune.share`), until it says the job is over."""
    datasets: dict[DataSpec, Any] = {}
    while True:
        msg = share(None)
        if msg is None:
            return
        _, model, spec, cfg, desc = msg
        if spec not in datasets:
            train_loader, _ = loaders(args.data, spec, args.train_batch_size, args.train_limit, args.val_limit,
                                      seed=args.seed)
            datasets[spec] = train_loader.dataset
        train(model, datasets[spec], cfg, desc=desc)


def _closed_loop(args: argparse.Namespace, lab: engine_io.Lab, model: nn.Module, space: PruningSpace,
                 surface: LatencySurface, imp: Any, dense: nn.Module | None,
                 budget_of: Callable[[float | None], float], input_shape: tuple[int, ...], log: Log
                 ) -> tuple[Plan, nn.Module, float, list[dict[str, Any]], str]:
    """Solve, cut and measure, dense and pruned interleaved. When the measurement misses the
    budget by more than the tolerance, refit the calibration with the fresh measurements
    (weighted above older ones) and solve again, a bounded number of times.

    After :data:`REFITS` refits the calibration stays as it is and the budget handed to the
    solver moves instead, by the secant through the rounds solved under that calibration (or
    in proportion, with one such round). Refits alone may keep jumping from one side of the
    budget to the other where whole-model latency is not the calibrated sum of its terms (a
    ViT at 16 tokens, say); the secant converges whenever a lower solve budget gives a faster
    model, which holds on average.

    ``budget_of(dense_ms)`` gives the budget for the dense latency measured beside the
    pruned model (``None``: before any measurement), so drift of a shared machine moves both.
    Returns the slowest plan within the tolerance (least over-pruned), else the fastest.
    """
    tol = args.tolerance / 100
    points = [(p, m, 1.0) for p, m in lab.measured_points(space)]
    rounds: list[dict[str, Any]] = []
    tried: list[tuple[Plan, nn.Module, float, float]] = []
    budget = solve_budget = budget_of(None)
    frozen: list[tuple[float, float]] = []  # (solve budget, measured ms) under the final calibration
    for _ in range(args.max_rounds):
        plan, sol = solve_plan(space, surface, imp, solve_budget, solver=args.solver)
        if plan is None and tried:  # a moved solve budget out of reach: keep what was measured
            log(f"no plan under the solve budget {solve_budget:.4g} ms ({sol.status}); stopping the loop")
            break
        if plan is None:
            if sol.status == "infeasible" and sol.min_latency_ms is not None:
                raise BudgetError(
                    f"no plan reaches {solve_budget:.4g} ms on this engine; the fastest this space allows "
                    f"is about {sol.min_latency_ms:.4g} ms (predicted)")
            raise BudgetError(f"the solver found no plan: {sol.status} ({sol.message})")
        seen = next((t for t in tried if plan.widths == t[0].widths and plan.removed == t[0].removed), None)
        if seen is not None:  # the optimum did not move: move the budget instead
            if len(rounds) > REFITS:
                frozen.append((solve_budget, seen[2]))
                solve_budget = _secant(frozen, budget)
            else:
                solve_budget *= budget / seen[2]
            continue
        pruned = apply_plan(model, plan, imp, space=space)
        comp = lab.compare([dense, pruned] if dense is not None else [pruned], input_shape)
        ms = comp.ms
        measured, pred = ms[-1], float(plan.meta["predicted_ms"])
        if dense is not None:
            budget = budget_of(ms[0])
        rd: dict[str, Any] = {"budget_ms": budget, "solve_budget_ms": solve_budget, "predicted_ms": pred,
                              "measured_ms": measured, "solve_s": sol.solve_s, "gap": sol.gap,
                              "measurement": comp.to_dict()}
        if dense is not None:
            rd.update(dense_ms=ms[0], speedup=comp.ratios[-1])
        rounds.append(rd)
        tried.append((plan, pruned, measured, budget))
        log(f"round {len(rounds)}: budget {budget:.3f} ms -> predicted {pred:.3f}, measured {measured:.3f} ms"
            + ("" if comp.reliable else f" (unreliable: {comp.reason})"))
        if abs(measured - budget) <= tol * budget:
            break
        if len(rounds) > REFITS:
            frozen.append((solve_budget, measured))
            solve_budget = _secant(frozen, budget)
            continue
        points.append((plan, measured, 4.0))
        if dense is not None:
            points.append((space.full_plan(), ms[0], 4.0))
        plans, ms_all, weights = zip(*points, strict=True)
        # The linear ablation keeps its affine calibration.
        pure = False if args.latency_model == "linear" else None
        surface.calibration = fit_calibration(surface, plans, ms_all, weights, traffic=pure, flops=pure)
        solve_budget = budget
    ok = [i for i, t in enumerate(tried) if t[2] <= t[3] * (1 + tol)]
    pick = max(ok, key=lambda i: tried[i][2]) if ok else min(range(len(tried)), key=lambda i: tried[i][2])
    rounds[pick]["chosen"] = True
    plan, pruned, measured, budget = tried[pick]
    note = ""
    if abs(measured - budget) > tol * budget:
        note = (f"The closed loop ended {100 * (measured / budget - 1):+.1f}% from the budget after "
                f"{len(rounds)} rounds; kept round {pick + 1}.")
    return plan, pruned, measured, rounds, note


REFITS = 2
"""Calibration refits in a closed loop before the solve budget is moved instead."""


def _secant(rounds: list[tuple[float, float]], budget: float) -> float:
    """The next solve budget from (solve budget, measured ms) rounds under one calibration.

    Between the closest rounds on either side of ``budget``: linear interpolation; with all on
    one side: the nearest round scaled by budget / measured. Kept within 1/4 to 4 times the budget.
    """
    below = [r for r in rounds if r[1] < budget]
    above = [r for r in rounds if r[1] > budget]
    if below and above:
        (s0, m0), (s1, m1) = max(below, key=lambda r: r[1]), min(above, key=lambda r: r[1])
        if m1 > m0 and s1 > s0:
            return s0 + (budget - m0) * (s1 - s0) / (m1 - m0)
    s, m = min(rounds, key=lambda r: abs(r[1] - budget))
    return min(max(s * budget / m, budget / 4), budget * 4)


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    timm_model: Any = model  # forward_features and forward_head are timm's, not nn.Module's
    with torch.no_grad():
        return int(timm_model.forward_head(timm_model.forward_features(torch.zeros(1, 3, 32, 32))).shape[-1])


def _blocks(space: PruningSpace, surface: LatencySurface, plan: Plan | None) -> list[dict[str, Any]]:
    dense = surface.per_block(space.full_plan())
    pruned = surface.per_block(plan) if plan is not None else {}
    names = ["fixed"] + [b.name for b in space.blocks]
    removed = set(plan.removed) if plan is not None else set()
    return [{"name": n, "kept": n not in removed, "dense_ms": dense.get(n, 0.0),
             "pruned_ms": pruned.get(n, 0.0) if plan is not None else None} for n in names if n in dense]


def _dims(space: PruningSpace, plan: Plan) -> list[dict[str, Any]]:
    removed = set(plan.removed)
    return [{"name": d.name, "kind": d.kind, "size": d.size,
             "kept": None if d.block in removed else plan.widths[d.name]} for d in space.dims]
