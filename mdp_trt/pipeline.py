"""The prune job in stages: engine and latency model, data and importance, the closed loop,
fine-tuning, the report. :func:`run` enters each once and returns a :class:`PruneResult`;
its :meth:`PruneResult.save` writes the files the command writes.

Every latency in the report is measured on the chosen engine with one setting for dense and
pruned models (measured interleaved); predictions come from the calibrated latency model.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdp_trt import engine_io
from mdp_trt.closed_loop import ClosedLoop
from mdp_trt.config import PruneConfig
from mdp_trt.data import DataSpec, evaluate, loaders
from mdp_trt.errors import BudgetError, MdpError
from mdp_trt.finetune import TrainConfig, share, train, world
from mdp_trt.flops import count_flops, count_params
from mdp_trt.importance import LossFn, estimate
from mdp_trt.latency import calibrated, latency_model
from mdp_trt.models import SpaceConfig
from mdp_trt.part import Subject
from mdp_trt.report import Report
from mdp_trt.space import Plan, PruningSpace
from mdp_trt.surface import LatencySurface
from mdp_trt.target import Target, parse_target

Log = Callable[[str], None]


@dataclass
class PruneResult:
    """A finished job: ``model`` the pruned model (the whole user model for a part), ``plan``
    the last plan (``plans``: every step's), ``report`` what ``report.json`` holds."""

    model: nn.Module
    plan: Plan
    plans: list[Plan]
    report: Report
    subject: Subject
    lab: engine_io.Lab
    input_shape: tuple[int, ...]

    def save(self, out: str | Path, force: bool = False) -> Path:
        """Write ``plan.json``, ``pruned.pt``, ``model.onnx`` (and the engine's own form), the
        report and its plots into ``out``, through a temporary directory renamed at the end.
        For a part, ``pruned.pt`` holds the pruned part (:func:`mdp_trt.load_pruned` rebuilds
        it) and ``model_state.pt`` the whole model's state dict."""
        from mdp_trt.outdir import written_into

        with written_into(Path(out), force) as tmp:
            self.write(tmp)
        return Path(out)

    def write(self, out: Path) -> None:
        """The files of :meth:`save`, into the existing directory ``out``."""
        from mdp_trt.api import save_pruned

        plan_doc = self.plan.to_dict()
        plan_doc["lineage"] = [p.to_dict() for p in self.plans[:-1]]
        plan_doc["engine"] = self.lab.identity
        plan_doc["target"] = self.report.target["text"]
        if self.subject.part is not None:
            plan_doc["part"] = self.subject.part
        (out / "plan.json").write_text(json.dumps(plan_doc, indent=2) + "\n")
        save_pruned(out / "pruned.pt", self.subject.module, self.plans)
        files = ["plan.json", "pruned.pt"]
        if self.subject.part is not None:
            torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, out / "model_state.pt")
            files.append("model_state.pt")
        self.report.files = files + self.lab.export(self.model, self.input_shape, out)
        self.report.write(out)


@dataclass
class Data:
    """The batches importance is taken from, the loss on them, and (the command's data only)
    what fine-tuning and evaluation use."""

    batches: Iterable[Any] | None
    loss_fn: LossFn | None = None
    train_loader: Any = None
    val_loader: Any = None
    spec: DataSpec | None = None

    @property
    def labelled(self) -> bool:
        """Real labelled data of the command (evaluated, fine-tuned on)."""
        return self.val_loader is not None


def command_data(config: PruneConfig, model: nn.Module, input_size: tuple[int, ...]) -> Data:
    """The command's ``--data`` (``synthetic``, ``fashion-mnist`` or an ImageFolder directory)."""
    spec = DataSpec(input_size[0], input_size[1], _num_classes(model, input_size))
    train_loader, val_loader = loaders(config.data, spec, config.train_batch_size, config.train_limit,
                                       config.val_limit, seed=config.seed)
    return Data(train_loader, None, train_loader, val_loader if config.data != "synthetic" else None, spec)


def build_model(config: PruneConfig) -> nn.Module:
    """The command's timm model (``config.model`` with its weights and sizes)."""
    from mdp_trt.api import create_model

    kwargs: dict[str, Any] = dict(config.extra)
    if config.num_classes is not None:
        kwargs["num_classes"] = config.num_classes
    if config.in_chans is not None:
        kwargs["in_chans"] = config.in_chans
    return create_model(config.model, pretrained=config.pretrained, checkpoint=config.checkpoint,
                        resolution=config.resolution, **kwargs).eval()


def run(config: PruneConfig, subject: Subject, data: Data | None = None, log: Log = lambda s: None,
        target: Target | None = None) -> PruneResult:
    """The whole job on ``subject`` (a timm model, or a part of a user's model)."""
    t_start = time.time()
    config.check()
    target = target or parse_target(config.target)
    model = subject.root.eval()
    subject.module.mdp_arch = subject.adapter.arch(subject.module)  # type: ignore[assignment]
    space_config = SpaceConfig(max_choices=config.max_choices, resolution=config.resolution)
    space = subject.space(space_config, config.kinds, not config.no_block_removal)
    input_shape = (config.batch_size, *space.input_size)
    progress = not config.quiet

    # Engine, latency table (profiling what is missing), latency model and its calibration.
    lm = latency_model(config.latency_model)
    lab = engine_io.Lab(config.engine, config.precision, config.batch_size, space.input_size[1], config.threads,
                        config.lut, config.model or str(subject.adapter.arch(subject.module)["name"]), progress=progress, log=log,
                        clock=config.clock)
    surface = calibrated(lab, subject, space, lm, n_plans=config.calibration_plans, seed=config.seed)
    dense_pred = surface.predict(space.full_plan())

    # Data, accuracy of the dense model.
    if data is None:  # a user's model has no classes to draw synthetic labels for
        data = command_data(config, model, space.input_size) if subject.part is None else Data(None)
    if config.finetune_epochs > 0 and data.train_loader is None:
        raise MdpError("fine-tuning (finetune_epochs) takes the command's data option; with your own data, "
                       "fine-tune the returned model in your training code")
    accuracy: dict[str, float] = {}
    if data.labelled:
        accuracy["dense"] = evaluate(model, data.val_loader)
        log(f"dense top-1: {accuracy['dense']:.2f}%")

    # Dense latency on the engine: the reference every target is relative to. The dense model
    # is measured as the adapter rebuilds it at full width (the same outputs as the user's, a
    # contract-suite check), as in the calibration groups: every measurement then runs the
    # same modules, and models whose own forward the ONNX exporter cannot trace (timm's Eva
    # passes is_causal down as a keyword) are measured all the same.
    dense = subject.dense(space)  # the rebuild the calibration read its layout off
    dense_ms = lab.measure([dense], input_shape)[0]
    budget = target.budget_ms(dense_ms)
    log(f"dense: {dense_ms:.3f} ms measured, {dense_pred:.3f} ms predicted; budget {budget:.3f} ms ({target.text})")
    if budget >= dense_ms * (1 - config.tolerance / 100):
        raise BudgetError(f"the target {target.text} ({budget:.4g} ms) is no faster than the dense model "
                          f"({dense_ms:.4g} ms measured on this engine): nothing to prune")

    # Prune: K steps towards the budget, each a closed loop of solve -> cut -> measure.
    plans: list[Plan] = []
    rounds: list[dict[str, Any]] = []
    current, cur_space, cur_surface = subject, space, surface
    note = ""
    for step in range(1, config.steps + 1):
        step_budget = dense_ms - (dense_ms - budget) * step / config.steps
        if step > 1:
            cur_space = current.space(space_config, config.kinds, not config.no_block_removal)
            cur_surface = calibrated(lab, current, cur_space, lm, calibration=surface.calibration)
        # Scored over the unrestricted space: adapters score every removable block of the model,
        # and a restriction (kinds, no block removal) only limits what the solver may choose.
        imp = estimate(config.importance, current.module, current.full_space(space_config), data.batches,
                       config.importance_batches, seed=config.seed, progress=progress, adapter=current.adapter,
                       root=current.root if current.part is not None else None, loss_fn=data.loss_fn)
        last = step == config.steps
        loop = ClosedLoop(lab, current, cur_space, cur_surface, imp, lm, input_shape,
                          tolerance_pct=config.tolerance, max_rounds=config.max_rounds, solver=config.solver, log=log)

        def budget_of(d: float | None, sb: float = step_budget, last: bool = last) -> float:
            return target.budget_ms(d) if last and d is not None else sb

        found = loop.run(budget_of, dense if last else None)
        note = found.note
        rounds += [dict(r, step=step) for r in found.rounds]
        plans.append(found.plan)
        current = current.after(found.model)
        if config.finetune_epochs > 0:
            _finetune(config, current.root, data, step, accuracy, progress)
    chosen = next(r for r in reversed(rounds) if r.get("chosen"))
    pruned, pruned_ms = current.root, chosen["measured_ms"]
    measurement = chosen["measurement"]
    # Dense and pruned as measured side by side in the chosen round: drift moves both.
    dense_ms, budget = chosen.get("dense_ms", dense_ms), chosen["budget_ms"]
    if data.labelled:
        accuracy["pruned" if config.finetune_epochs > 0 else "pruned_no_finetune"] = evaluate(pruned, data.val_loader)

    final = plans[-1]
    met = pruned_ms <= budget * (1 + config.tolerance / 100)
    report = Report(
        model=config.model or subject.name(),
        target={"text": target.text, "kind": target.kind, "value": target.value, "budget_ms": budget},
        engine=lab.identity,
        dense_ms=dense_ms,
        dense_predicted_ms=dense_pred,
        pruned_ms=pruned_ms,
        predicted_ms=chosen["predicted_ms"],
        speedup=chosen.get("speedup", dense_ms / pruned_ms),
        target_met=bool(met) and measurement["reliable"],
        measurement=measurement,
        tolerance_pct=config.tolerance,
        prediction_error_pct=100 * abs(chosen["predicted_ms"] - pruned_ms) / pruned_ms,
        params_before=count_params(model),
        params_after=count_params(pruned),
        flops_before=count_flops(model, (1, *space.input_size)),
        flops_after=count_flops(pruned, (1, *space.input_size)),
        accuracy=accuracy,
        importance=config.importance,
        finetune={"epochs": config.finetune_epochs, "processes": world()[0]},
        steps=config.steps,
        rounds=rounds,
        calibration=surface.calibration.to_dict(),
        interpolated_points=surface.interpolated_points,
        blocks=_blocks(space, surface, final if config.steps == 1 else None),
        dims=_dims(cur_space, final),
        table=str(lab.table_path),
        wall_s=time.time() - t_start,
        note=note,
        part=subject.part,
    )
    return PruneResult(pruned, final, plans, report, current, lab, input_shape)


def _finetune(config: PruneConfig, model: nn.Module, data: Data, step: int, accuracy: dict[str, float],
              progress: bool) -> None:
    """One step's share of the fine-tuning epochs (with the other torchrun processes, if any)."""
    epochs = config.finetune_epochs / config.steps
    if data.labelled and step == 1:
        accuracy["pruned_before_finetune"] = evaluate(model, data.val_loader)
    cfg = TrainConfig(epochs=epochs, batch_size=config.train_batch_size, lr=config.lr, seed=config.seed,
                      progress=progress)
    desc = f"fine-tune step {step}/{config.steps}"
    if world()[0] > 1:  # the other torchrun processes train it too
        share(("train", copy.deepcopy(model).cpu(), data.spec, cfg, desc))
    train(model, data.train_loader.dataset, cfg, desc=desc)


def follow(config: PruneConfig) -> None:
    """A torchrun process other than the first: fine-tune, with the first, each model it hands
    over (see :func:`mdp_trt.finetune.share`), until it says the job is over."""
    datasets: dict[DataSpec, Any] = {}
    while True:
        msg = share(None)
        if msg is None:
            return
        _, model, spec, cfg, desc = msg
        if spec not in datasets:
            train_loader, _ = loaders(config.data, spec, config.train_batch_size, config.train_limit,
                                      config.val_limit, seed=config.seed)
            datasets[spec] = train_loader.dataset
        train(model, datasets[spec], cfg, desc=desc)


def _num_classes(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """The model's classes; for a model without a classifier (``num_classes=0``, e.g. timm's
    masked-image-modelling EVA-02 weights), the width of its pooled output, which the
    synthetic labels then index. Run at the model's input size: ViT-like models take no other."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    timm_model: Any = model  # forward_features and forward_head are timm's, not nn.Module's
    with torch.no_grad():
        out = timm_model.forward_head(timm_model.forward_features(torch.zeros(1, *input_size)))
    return int(out.shape[-1])


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
