"""Accuracy against measured latency: mdp_trt, its ablations and two baselines on Fashion-MNIST.

    python -m benchmarks.pareto                      # resnet18@32 and vit_tiny_patch16_224@64
    python -m benchmarks.pareto --quick --out runs/pareto-quick   # a smoke run of a few minutes

For each model (trained here on a Fashion-MNIST subset, checkpoint cached in ``--work``) and
each speedup target, every method prunes the same dense checkpoint until its latency,
measured on the engine beside the dense model, meets the target; then every pruned model
gets the same fine-tuning (epochs, batch size, learning rate, seed, data) and is evaluated on
the same test images. Methods:

- ``mdp``: ``mdp_trt.prune`` as shipped (all dim kinds, block removal, surface);
- ``mdp-channels``: channel widths only, no block removal (CNN: ``--kinds channels``; ViT:
  ``--kinds mlp,embed``, i.e. MLP and embedding widths, no attention dims);
- ``mdp-linear``: the full space with the linear latency model (``--latency-model linear``);
- ``torch-pruning``: Torch-Pruning's MetaPruner, group Taylor importance, ``round_to=8``,
  global pruning; its pruning ratio bisected until the measured speedup meets the target;
- ``uniform``: every width scaled by one factor (ViT: embedding, MLP and per-head q/k and v
  widths; the head count is kept), Taylor importance for which units stay; the factor
  bisected the same way.

Equal latency: before any row, the dense model is measured ``3 x --repeats`` times (a new
engine session each time) and the median is the model's dense reference, stored with the
results and reused on a rerun. Each target speedup becomes one latency in milliseconds
(reference / speedup) that every method is given: a ``<ms>ms`` target for ``mdp_trt.prune``,
the bisection goal for the baselines. So the methods meet the same absolute latency, and a
drift of the dense model's own timing (a memory-bound dense model on a shared host moves
by 10-20% from one session to the next) cannot give one method an easier target than another.

All mdp variants share one latency table per model (``--lut``). After fine-tuning, every
pruned model is kept (``<work>/<model>/final/``); once every row of a target is done, all of
its models, every method and seed, are measured together with the dense one, interleaved, in
``--repeats`` rounds: the medians are the rows' latencies, and their speedups are the dense
median over them. Finished rows are kept in
``<out>/pareto_<tag>.json``: a rerun skips them. The table (``.md``) and the plot (``.png``)
are rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdp_trt.cli import run_cli
from mdp_trt.errors import MdpError
from profilers.engines import CLOCKS, resolve_clock

METHODS = ("mdp", "mdp-channels", "mdp-linear", "torch-pruning", "uniform")
LABELS = {
    "mdp": "mdp_trt (full)",
    "mdp-channels": "mdp_trt, channels only",
    "mdp-linear": "mdp_trt, linear latency model",
    "torch-pruning": "Torch-Pruning (Taylor, global)",
    "uniform": "uniform width scaling",
}
DEFAULT_MODELS = ("resnet18@32", "vit_tiny_patch16_224@64")
DEFAULT_TARGETS = ("1.5x", "2x", "3x", "4x")
QUICK_MODELS = ("test_resnet@32",)
QUICK_TARGETS = ("2x",)
PROTOCOL = "dense-reference-ms"
"""Every method gets the same target in ms, from a dense reference measured before any row."""
Log = Callable[[str], None]


# -- settings --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pareto", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, metavar="NAME@RES",
                    help=f"timm models at an input side (default: {' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--targets", nargs="+", default=None, help=f"speedups (default: {' '.join(DEFAULT_TARGETS)})")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--data", default="fashion-mnist", help="fashion-mnist (default) or synthetic")
    ap.add_argument("--train-limit", type=int, default=None, help="training images (default 12000)")
    ap.add_argument("--val-limit", type=int, default=None,
                    help="test images evaluated (default 10000, the whole Fashion-MNIST test set)")
    ap.add_argument("--epochs", type=float, default=None, help="dense training epochs (default 4)")
    ap.add_argument("--finetune-epochs", type=float, default=None, help="fine-tuning epochs per row (default 1)")
    ap.add_argument("--batch-size", type=int, default=128, help="training and fine-tuning batch size")
    ap.add_argument("--lr", type=float, default=2e-3, help="dense training learning rate")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--importance-batches", type=int, default=None, help="Taylor batches (default 8)")
    ap.add_argument("--max-choices", type=int, default=None, help="widths per dim for mdp (default 8)")
    ap.add_argument("--tolerance", type=float, default=3.0, help="latency match tolerance, %% of the target")
    ap.add_argument("--search-steps", type=int, default=None, help="bisection steps of the baselines (default 8)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="measurements of each finished row (median), and 3x as many of the dense reference "
                         "(default 3)")
    ap.add_argument("--engine", default="onnxruntime", help="onnxruntime (default), openvino, tensorrt or torch")
    ap.add_argument("--clock", default="auto", choices=CLOCKS,
                    help="auto (default: onnxruntime or openvino on one CPU thread by that thread's CPU time, which "
                         "other processes on a shared machine do not inflate), wall, or cpu")
    ap.add_argument("--tag", default=None, help="result file stem: pareto_<tag>.* (default fashion_mnist)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints, tables, pruned models (default runs/pareto)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: test_resnet@32, 2x, 600 images, short training (set sizes still apply)")
    ap.add_argument("--fresh", action="store_true", help="drop finished rows of other settings instead of refusing")
    ap.add_argument("--render", action="store_true", help="only rewrite the table and the plot from the JSON")
    ap.add_argument("--seed", type=int, default=0, help="seed of the dense model's training")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds of the rows: importance batches, fine-tuning order (default 0 1 2); the "
                         "table gives the mean and spread over them")
    return ap


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset sizes from the full or the quick profile."""
    q = args.quick
    fill = {
        "models": list(QUICK_MODELS if q else DEFAULT_MODELS),
        "targets": list(QUICK_TARGETS if q else DEFAULT_TARGETS),
        "train_limit": 600 if q else 12000,
        "val_limit": 300 if q else 10000,
        "epochs": 3.0 if q else 4.0,
        "finetune_epochs": 0.5 if q else 1.0,
        "importance_batches": 2 if q else 8,
        "max_choices": 4 if q else 8,
        "search_steps": 6 if q else 8,
        "repeats": 1 if q else 3,
        "seeds": [0] if q else [0, 1, 2],
        "tag": "quick" if q else "fashion_mnist",
        "out": Path("runs/pareto-quick") if q else Path("benchmarks/results"),
        "work": Path("runs/pareto-quick/work") if q else Path("runs/pareto"),
    }
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def _model_spec(text: str) -> tuple[str, int]:
    name, sep, res = text.partition("@")
    if not sep or not res.isdigit():
        raise MdpError(f"model {text!r}: write NAME@RESOLUTION, e.g. resnet18@32")
    return name, int(res)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for a finished row to be reused."""
    keys = ("data", "train_limit", "val_limit", "epochs", "finetune_epochs", "batch_size", "lr", "finetune_lr",
            "importance_batches", "max_choices", "tolerance", "search_steps", "engine", "clock", "seed",
            "repeats")
    return dict({k: getattr(args, k) for k in keys}, protocol=PROTOCOL)


def machine() -> dict[str, Any]:
    from profilers.engines.base import cpu_name

    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "memory_gib": mem_gib, "gpu": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__}


# -- the benchmark ---------------------------------------------------------------------------


class Results:
    """The JSON of finished rows: models (each with the settings its rows were made with) and rows.

    Saved after every row under a file lock, merged with what is on disk, so several processes
    (one per model, say) may fill the same file; the table and the plot are rewritten each time.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.path = args.out / f"pareto_{args.tag}.json"
        self.settings = _settings(args)
        self.fresh = args.fresh
        self.dropped: set[str] = set()
        self.doc: dict[str, Any] = {"models": {}, "rows": []}
        if self.path.is_file():
            self.doc = _upgrade(json.loads(self.path.read_text()))

    def check(self, key: str) -> None:
        """Refuse finished rows of ``key`` made with other settings (``--fresh``: drop them)."""
        old = self.doc["models"].get(key, {}).get("settings")
        if old is None or old == self.settings:
            return
        if not self.fresh:
            raise MdpError(f"{self.path} holds rows of {key} made with other settings ({old}); "
                           "use --fresh to redo them or another --tag/--out")
        self.doc["models"].pop(key)
        self.doc["rows"] = [r for r in self.doc["rows"] if r["model"] != key]
        self.dropped.add(key)

    def done(self, model: str, method: str, target: str, seed: int = 0) -> bool:
        return any(_row_key(r) == (model, method, target, seed) for r in self.doc["rows"])

    def save(self, meta: dict[str, Any]) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.parent, os.O_RDONLY)  # the folder itself: no lock file left behind
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                disk = _upgrade(json.loads(self.path.read_text()))
                dropped = self.dropped
                mine = {_row_key(r) for r in self.doc["rows"]}
                models = {k: v for k, v in disk["models"].items() if k not in dropped}
                models.update(self.doc["models"])
                rows = [r for r in disk["rows"] if _row_key(r) not in mine and r["model"] not in dropped]
                self.doc["models"], self.doc["rows"] = models, rows + self.doc["rows"]
            self.doc.update(meta)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
            os.replace(tmp, self.path)
            self.path.with_suffix(".md").write_text(markdown(self.doc))
            if self.doc["rows"]:
                plot(self.doc, self.path.with_suffix(".png"))
        finally:
            os.close(lock)


def _row_key(r: dict[str, Any]) -> tuple[str, str, str, int]:
    return r["model"], r["method"], r["target"], r.get("seed", 0)


def _upgrade(doc: dict[str, Any]) -> dict[str, Any]:
    """Results written with one top-level ``settings`` for every model."""
    settings = doc.pop("settings", None)
    if settings is not None:
        for info in doc["models"].values():
            info.setdefault("settings", settings)
    return doc


class Bench:
    """One model: dense checkpoint, data, engine lab, and the dense model for measurements."""

    def __init__(self, args: argparse.Namespace, name: str, res: int, log: Log) -> None:
        from mdp_trt.api import create_model
        from mdp_trt.data import DataSpec, evaluate, loaders
        from mdp_trt.engine_io import Lab
        from mdp_trt.finetune import TrainConfig, train
        from profilers.table import default_table_path

        self.args, self.name, self.res, self.log = args, name, res, log
        self.key = f"{name}@{res}"
        self.dir = args.work / f"{name}-r{res}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.dir / f"dense-{args.data}.pt"
        self.lut = default_table_path(".", name, args.engine, "fp32", 1, res, root=self.dir,
                                      clock=resolve_clock(args.engine, args.clock))
        self.spec = DataSpec(1, res, 10)
        self.train_loader, self.val_loader = loaders(args.data, self.spec, args.batch_size, args.train_limit,
                                                     args.val_limit, seed=args.seed)
        self.input_shape = (1, 1, res, res)
        torch.manual_seed(args.seed)
        if not self.ckpt.is_file():
            model = create_model(name, num_classes=10, in_chans=1, resolution=res)
            t0 = time.time()
            train(model, self.train_loader.dataset,
                  TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              progress=False), desc=f"train {self.key}")
            torch.save(model.state_dict(), self.ckpt)
            log(f"{self.key}: dense model trained in {time.time() - t0:.0f} s")
        self.dense = create_model(name, num_classes=10, in_chans=1, resolution=res, checkpoint=self.ckpt).eval()
        self.dense_top1 = evaluate(self.dense, self.val_loader)
        self.lab = Lab(args.engine, "fp32", 1, res, None, self.lut, name, progress=False, log=log,
                       clock=args.clock)
        self.seed = args.seed
        self.finetune_cfg = TrainConfig(epochs=args.finetune_epochs, batch_size=args.batch_size,
                                        lr=args.finetune_lr, seed=args.seed, progress=False)
        self._train, self._evaluate = train, evaluate
        log(f"{self.key}: dense top-1 {self.dense_top1:.2f}% on {len(self.val_loader.dataset)} test images")

    def is_vit(self) -> bool:
        return hasattr(self.dense, "blocks") and hasattr(self.dense, "patch_embed")

    def meta(self) -> dict[str, Any]:
        from mdp_trt.flops import count_params

        return {"resolution": self.res, "dense_top1": self.dense_top1, "dense_params": count_params(self.dense),
                "checkpoint": str(self.ckpt), "lut": str(self.lut), "engine": self.lab.identity,
                "train_images": len(self.train_loader.dataset), "test_images": len(self.val_loader.dataset)}

    def reference(self, stored: dict[str, Any] | None) -> dict[str, Any]:
        """The dense reference latency: ``stored`` (a rerun), else the median of fresh measurements."""
        if stored is None:
            samples = [self.lab.measure([self.dense], self.input_shape)[0] for _ in range(3 * self.args.repeats)]
            stored = {"dense_ref_ms": statistics.median(samples), "dense_ref_samples": samples}
            self.log(f"{self.key}: dense reference {stored['dense_ref_ms']:.3f} ms "
                     f"(median of {len(samples)}: {min(samples):.3f}-{max(samples):.3f} ms)")
        self.ref_ms = float(stored["dense_ref_ms"])
        return stored

    def target_ms(self, target: str) -> float:
        """The latency every method is given for ``target``: the dense reference over the speedup."""
        return self.ref_ms / _speedup(target)

    def measure(self, pruned: nn.Module) -> float:
        """Latency of a candidate (ms), one measurement."""
        return self.lab.measure([pruned], self.input_shape)[0]

    def measure_together(self, modules: Sequence[nn.Module]) -> list[list[float]]:
        """``--repeats`` rounds, each timing the dense model and ``modules`` interleaved (one
        engine session per model for all rounds): per round, dense ms then each module's ms."""
        return self.lab.measure_rounds([self.dense, *modules], self.input_shape, self.args.repeats)

    def finish(self, method: str, target: str, pruned: nn.Module, top1_before: float | None,
               search: dict[str, Any], t0: float) -> dict[str, Any]:
        """Fine-tune (unless the pipeline did), evaluate, keep the model for :func:`measure_target`."""
        from mdp_trt.flops import count_params

        if top1_before is None:
            top1_before = self._evaluate(pruned, self.val_loader)
            cfg = dataclasses.replace(self.finetune_cfg, seed=self.seed)
            self._train(pruned, self.train_loader.dataset, cfg, desc="fine-tune")
        top1 = self._evaluate(pruned, self.val_loader)
        path = self.dir / "final" / f"{method}-{target}-s{self.seed}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pruned.eval(), path)
        search["matched_speedup"] = self.ref_ms / search["matched_ms"]
        return {"model": self.key, "method": method, "target": target, "seed": self.seed,
                "target_speedup": _speedup(target), "target_ms": self.target_ms(target),
                "dense_ref_ms": self.ref_ms, "model_file": str(path),
                "params": count_params(pruned), "dense_params": count_params(self.dense),
                "top1_before_ft": top1_before, "top1": top1, "dense_top1": self.dense_top1,
                "search": search, "wall_s": time.time() - t0}


def _speedup(target: str) -> float:
    from mdp_trt.target import parse_target

    t = parse_target(target)
    if t.kind != "speedup":
        raise MdpError(f"target {target!r}: this benchmark takes speedups (2x)")
    return t.value


# -- methods ---------------------------------------------------------------------------------


def run_mdp(b: Bench, method: str, target: str) -> dict[str, Any]:
    import mdp_trt

    t0 = time.time()
    a = b.args
    out = b.dir / f"{method}-{target}-s{b.seed}"
    options: dict[str, Any] = {
        "checkpoint": b.ckpt, "num_classes": 10, "in_chans": 1, "resolution": b.res, "data": a.data,
        "train_limit": a.train_limit, "val_limit": a.val_limit, "importance_batches": a.importance_batches,
        "max_choices": a.max_choices, "finetune_epochs": a.finetune_epochs, "train_batch_size": a.batch_size,
        "lr": a.finetune_lr, "tolerance": a.tolerance, "seed": b.seed, "clock": a.clock, "lut": b.lut,
        "force": True, "quiet": True}
    if method == "mdp-channels":
        options.update(kinds=("mlp", "embed") if b.is_vit() else ("channels",), no_block_removal=True)
    elif method == "mdp-linear":
        options["latency_model"] = "linear"
    result = mdp_trt.prune(b.name, f"{b.target_ms(target):.5f}ms", engine=a.engine, out=out, **options)
    report = result.report.to_dict()
    pruned = result.model
    acc = report["accuracy"]
    search = {"matched_ms": report["pruned_ms"], "pipeline_dense_ms": report["dense_ms"],
              "pipeline_speedup": report["speedup"], "target_met": report["target_met"],
              "rounds": len(report["rounds"]), "predicted_ms": report["predicted_ms"],
              "removed_blocks": len(result.plan.removed),
              "options": {k: str(v) for k, v in options.items()}, "note": report.get("note", "")}
    before = acc.get("pruned_before_finetune")
    if before is None:  # no fine-tuning asked: evaluated once, after pruning
        before = acc.get("pruned_no_finetune", acc.get("pruned"))
    row = b.finish(method, target, pruned, before, search, t0)
    if "pruned" in acc:
        row["top1"] = acc["pruned"]
    return row


def _bisect(b: Bench, target: str, build: Callable[[float], nn.Module], lo: float, hi: float,
            start: float, increasing: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Search a scalar knob until the measured latency meets the target's within the tolerance.

    ``increasing``: pruning (speed) grows with the knob. Keeps the least-pruned candidate within
    the tolerance either side, else the one closest to the target (a knob whose latency jumps
    past the target, as a global ratio may, gets its nearest side, not the far faster one).
    """
    goal = b.target_ms(target)
    tol = b.args.tolerance / 100
    tried: list[tuple[float, float, nn.Module]] = []
    x = start
    for _ in range(b.args.search_steps):
        model = build(x)
        ms = b.measure(model)
        tried.append((x, ms, model))
        b.log(f"  knob {x:.4f}: {ms:.3f} ms (target {goal:.3f} ms)")
        if abs(ms / goal - 1) <= tol:
            break
        if (ms > goal) == increasing:
            lo = x
        else:
            hi = x
        x = (lo + hi) / 2
    ok = [t for t in tried if abs(t[1] / goal - 1) <= tol]
    if ok:
        pick = max(ok, key=lambda t: t[1])
    else:
        pick = min(tried, key=lambda t: abs(math.log(t[1] / goal)))
    search = {"knob": pick[0], "matched_ms": pick[1], "steps": len(tried),
              "tried": [[t[0], t[1]] for t in tried]}
    return pick[2], search


def _grad_batches(b: Bench) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The row seed's first batches: the same for every target and method, whatever ran before."""
    from torch.utils.data import DataLoader

    loader = DataLoader(b.train_loader.dataset, batch_size=b.args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(b.seed))
    it = iter(loader)
    return [next(it) for _ in range(min(b.args.importance_batches, len(loader)))]


def run_torch_pruning(b: Bench, target: str) -> dict[str, Any]:
    import torch_pruning as tp
    from timm.models.vision_transformer import Attention

    t0 = time.time()
    example = torch.zeros(b.input_shape)
    # Gradients once, on a copy of the dense model in eval mode (as mdp_trt's Taylor scores);
    # every candidate starts from that copy and its gradients (deepcopy does not copy them).
    graded = copy.deepcopy(b.dense).eval()
    for x, y in _grad_batches(b):
        nn.functional.cross_entropy(graded(x), y).backward()

    def build(ratio: float) -> nn.Module:
        model = copy.deepcopy(graded).eval()
        for p, g in zip(model.parameters(), graded.parameters(), strict=True):
            p.grad = None if g.grad is None else g.grad.clone()
        num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
        head = model.get_classifier()
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.GroupTaylorImportance(), global_pruning=True,
            pruning_ratio=ratio, max_pruning_ratio=0.95, round_to=8, ignored_layers=[head],
            num_heads=num_heads, prune_num_heads=False, prune_head_dims=True)
        pruner.step()
        model.zero_grad(set_to_none=True)
        for m in model.modules():
            if isinstance(m, Attention):
                m.num_heads = pruner.num_heads[m.qkv]
                m.head_dim = m.qkv.out_features // (3 * m.num_heads)
                m.attn_dim = m.num_heads * m.head_dim
        return model.eval()

    goal = _speedup(target)
    start = min(0.9, 1 - 1 / math.sqrt(goal))
    pruned, search = _bisect(b, target, build, 0.0, 0.95, start, increasing=True)
    return b.finish("torch-pruning", target, pruned, None, search, t0)


def run_uniform(b: Bench, target: str) -> dict[str, Any]:
    from mdp_trt.api import apply_plan, space_of
    from mdp_trt.importance import estimate
    from mdp_trt.models import SpaceConfig

    t0 = time.time()
    space = space_of(b.dense, SpaceConfig(max_choices=4096, resolution=b.res))
    imp = estimate("taylor", b.dense, space, _grad_batches(b), b.args.importance_batches, seed=b.seed)

    def build(f: float) -> nn.Module:
        widths = {}
        for d in space.dims:
            if d.kind == "heads":
                continue
            widths[d.name] = min(d.choices, key=lambda c: (abs(c - f * d.size), -c))
        return apply_plan(b.dense, space.plan(widths), imp, space=space)

    goal = _speedup(target)
    pruned, search = _bisect(b, target, build, 0.05, 1.0, 1 / math.sqrt(goal), increasing=False)
    return b.finish("uniform", target, pruned, None, search, t0)


def _measurable(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    ok = sorted((r for r in rows if "error" not in r and Path(r.get("model_file", "")).is_file()), key=_row_key)
    return ok, ["/".join(map(str, _row_key(r))) for r in ok]


def _stale(rows: list[dict[str, Any]]) -> bool:
    """Whether the models of these rows (one target) lack a measurement made all together."""
    return _is_stale(*_measurable(rows))


def _is_stale(ok: list[dict[str, Any]], group: list[str]) -> bool:
    return bool(ok) and any(r.get("measured_with") != group for r in ok)


def measure_target(b: Bench, rows: list[dict[str, Any]]) -> bool:
    """Measure every finished model of one target together, interleaved with the dense model.

    Fills each row's ``latency_ms``, ``dense_ms`` and ``speedup`` (dense over pruned, from the
    same rounds): a drift of the machine during the run moves every method alike. Redone when
    the set of rows changes (``measured_with``); returns whether it measured.
    """
    ok, group = _measurable(rows)
    if not _is_stale(ok, group):
        return False
    models = [torch.load(r["model_file"], weights_only=False) for r in ok]
    b.log(f"{b.key} {ok[0]['target']}: measuring {len(models)} pruned models with the dense one, "
          f"{b.args.repeats} round(s)")
    rounds = b.measure_together(models)
    dense = statistics.median(rd[0] for rd in rounds)
    for i, r in enumerate(ok, start=1):
        ms = statistics.median(rd[i] for rd in rounds)
        r.update(dense_ms=dense, latency_ms=ms, speedup=dense / ms, samples=[rd[i] for rd in rounds],
                 dense_samples=[rd[0] for rd in rounds], measured_with=group)
    return True


def run_row(b: Bench, method: str, target: str) -> dict[str, Any]:
    if method.startswith("mdp"):
        return run_mdp(b, method, target)
    if method == "torch-pruning":
        return run_torch_pruning(b, target)
    return run_uniform(b, target)


# -- outputs ---------------------------------------------------------------------------------


BASELINES = ("torch-pruning", "uniform")


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Accuracy against measured latency: {doc.get('title', 'Fashion-MNIST')}", ""]
    if "machine" in doc:
        m = doc["machine"]
        lines += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
                  f"GPU: {'yes' if m['gpu'] else 'no'}.", ""]
    for key, info in doc["models"].items():
        eng, s = info.get("engine", {}), info["settings"]
        tol = s["tolerance"]
        lines += [f"## {key}", "", f"Command: `{info.get('command', doc.get('command', ''))}`", "",
                  f"Dense: trained {s['epochs']} epoch(s) on the first {s['train_limit']} training images, "
                  f"top-1 {info['dense_top1']:.2f}% on the first {s['val_limit']} test images, "
                  f"{info['dense_params'] / 1e6:.2f} M params. Engine {eng.get('engine')} "
                  f"{eng.get('version', '')} {eng.get('precision', '')}, batch 1, {eng.get('threads', '')} "
                  f"thread(s), {s.get('clock', 'wall')} clock.", ""]
        if "dense_ref_ms" in info:
            smp = info.get("dense_ref_samples", [])
            spread = f", range {min(smp):.3f}-{max(smp):.3f} ms" if smp else ""
            lines += [f"Dense reference: {info['dense_ref_ms']:.3f} ms (median of {len(smp)} measurements"
                      f"{spread}). Each target speedup is turned into one latency, reference / speedup, "
                      f"given to every method ('target ms'). Each method meets it within {tol}% on its own "
                      f"measurements (the closed loop of mdp_trt, a bisection for the baselines): 'matched "
                      f"ms'. Every pruned model then gets the same fine-tuning ({s['finetune_epochs']} "
                      f"epoch(s), batch {s['batch_size']}, AdamW lr {s['finetune_lr']}, cosine). Then all "
                      f"models of one target, every method and seed, are measured together with the dense "
                      f"model, interleaved, in {s.get('repeats', 1)} round(s): 'latency' and 'dense' are "
                      f"medians over the rounds and 'speedup' is dense / latency, so a drift of the machine "
                      f"moves every method alike. Seeds (importance batches, fine-tuning order; one dense "
                      f"model): latency and speedup are medians over them, params and top-1 means, '± sd' "
                      f"the standard deviation of top-1, 'n' how many seeds. 'vs mdp_trt': latency over "
                      f"mdp_trt (full)'s at the same target, from the same rounds (below 1: a faster model "
                      f"than mdp_trt's). A speedup more than {tol}% short of the target is marked †.", ""]
        lines += ["| method | target | n | target ms | matched ms | latency (ms) | dense (ms) | speedup | "
                  "vs mdp_trt | params (M) | top-1 before FT | top-1 after FT | ± sd |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        rows = aggregate([r for r in doc["rows"] if r["model"] == key])
        ours = {r["target"]: r.get("latency_ms") for r in rows if r["method"] == "mdp"}
        for r in rows:
            if "error" in r:
                lines.append(f"| {LABELS[r['method']]} | {r['target']} | 0 | — | — | — | — | — | — | — | — | "
                             f"failed: {r['error'][:80]} | — |")
                continue
            sp = r["speedup"]
            late = sp is not None and sp < r["target_speedup"] / (1 + tol / 100)
            speed = "—" if sp is None else f"{sp:.2f}x{' †' if late else ''}"
            base = ours.get(r["target"])
            rel = "—" if base is None or r["latency_ms"] is None else f"{r['latency_ms'] / base:.2f}"
            lines.append(f"| {LABELS[r['method']]} | {r['target']} | {r['n']} | {_fmt(r['target_ms'])} | "
                         f"{_fmt(r['matched_ms'])} | {_fmt(r['latency_ms'])} | {_fmt(r['dense_ms'])} | {speed} | {rel} | "
                         f"{r['params'] / 1e6:.2f} | {r['top1_before_ft']:.2f} | {r['top1']:.2f} | "
                         f"{r['top1_sd']:.2f} |")
        lines += ["", "mdp_trt (full) against the others, top-1 after fine-tuning (means over the seeds), "
                  "in points:", "", *reading(rows), ""]
    return "\n".join(lines)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, target): medians of latencies, means of params and top-1, top-1 sd."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    out = []
    for (method, target), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        head = {"model": rs[0]["model"], "method": method, "target": target,
                "target_speedup": rs[0]["target_speedup"]}
        if not ok:
            out.append(dict(head, error=rs[0]["error"]))
            continue
        top1 = [r["top1"] for r in ok]
        matched = [r["search"]["matched_ms"] for r in ok if "matched_ms" in r["search"]]
        measured = [r for r in ok if "latency_ms" in r]
        out.append(dict(head, n=len(ok), seeds=[r.get("seed", 0) for r in ok], failed=len(rs) - len(ok),
                        target_ms=ok[0].get("target_ms"), matched_ms=statistics.median(matched) if matched else None,
                        latency_ms=_median(measured, "latency_ms"), speedup=_median(measured, "speedup"),
                        dense_ms=_median(measured, "dense_ms"),
                        params=statistics.fmean(r["params"] for r in ok),
                        top1_before_ft=statistics.fmean(r["top1_before_ft"] for r in ok),
                        top1=statistics.fmean(top1), top1_sd=statistics.stdev(top1) if len(top1) > 1 else 0.0))
    out.sort(key=lambda r: (r["target_speedup"], METHODS.index(r["method"])))
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    return statistics.median(r[key] for r in rows) if rows else None


def _fmt(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:.3f}"


def reading(rows: list[dict[str, Any]]) -> list[str]:
    """Per target: mdp_trt's top-1 after fine-tuning against the best baseline and Torch-Pruning.

    ``rows``: one per (method, target), as :func:`aggregate` gives them.
    """
    out = ["| target | mdp_trt (full) | best baseline | mdp_trt minus best baseline | mdp_trt minus "
           "Torch-Pruning | mdp_trt minus best ablation |", "|---|---:|---|---:|---:|---:|"]
    ok = [r for r in rows if "error" not in r]
    for target in sorted({r["target"] for r in ok}, key=_speedup):
        at = {r["method"]: r for r in ok if r["target"] == target}
        if "mdp" not in at:
            continue
        mine = at["mdp"]["top1"]
        base = [at[m] for m in BASELINES if m in at]
        best = max(base, key=lambda r: r["top1"]) if base else None
        abl = [at[m]["top1"] for m in ("mdp-channels", "mdp-linear") if m in at]
        tp = at.get("torch-pruning")
        best_txt = "—" if best is None else f"{LABELS[best['method']]} {best['top1']:.2f}"
        cells = [None if best is None else mine - best["top1"], None if tp is None else mine - tp["top1"],
                 None if not abl else mine - max(abl)]
        diffs = " | ".join("—" if c is None else f"{c:+.2f}" for c in cells)
        out.append(f"| {target} | {mine:.2f} | {best_txt} | {diffs} |")
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(doc["models"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        info = doc["models"][key]
        for method, marker in zip(METHODS, "os^Dv", strict=True):
            rows = [r for r in aggregate([r for r in doc["rows"] if r["model"] == key and r["method"] == method])
                    if "error" not in r and r["speedup"] is not None]
            if rows:
                ax.errorbar([r["speedup"] for r in rows], [r["top1"] for r in rows],
                            yerr=[r["top1_sd"] for r in rows], marker=marker, capsize=3, label=LABELS[method])
        ax.scatter([1.0], [info["dense_top1"]], marker="*", s=120, c="k", label="dense", zorder=5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("measured speedup on the engine (x)")
        ax.set_ylabel("top-1 after fine-tuning (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = doc.get("machine", {})
    fig.suptitle(f"Fashion-MNIST, ONNX Runtime CPU bs1; {m.get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    args = _defaults(args)
    for t in args.targets:
        _speedup(t)
    specs = [_model_spec(m) for m in args.models]
    if args.data == "fashion-mnist":
        from mdp_trt.data import FASHION_MNIST_DIR

        if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
            raise MdpError("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); "
                           "or use --data synthetic")
    results = Results(args)
    if args.render:
        results.save({})
        return results.doc
    args.work.mkdir(parents=True, exist_ok=True)
    log_path = args.work / "progress.log"
    t_start = time.time()

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    meta = {"machine": machine(), "command": "python -m benchmarks.pareto " + shlex.join(argv),
            "title": f"Fashion-MNIST ({args.data})" if args.data != "fashion-mnist" else "Fashion-MNIST"}
    log(f"start: {meta['command']} -> {results.path}")
    for name, res in specs:
        results.check(f"{name}@{res}")
        todo = [(t, seed, m) for t in args.targets for seed in args.seeds for m in args.methods
                if not results.done(f"{name}@{res}", m, t, seed)]
        def rows_at(target: str, key: str = f"{name}@{res}") -> list[dict[str, Any]]:
            return [r for r in results.doc["rows"] if r["model"] == key and r["target"] == target]

        if not todo and f"{name}@{res}" in results.doc["models"] and not any(_stale(rows_at(t)) for t in args.targets):
            log(f"{name}@{res}: every row done")
            continue
        b = Bench(args, name, res, log)
        old = results.doc["models"].get(b.key, {})
        ref = b.reference({k: old[k] for k in ("dense_ref_ms", "dense_ref_samples")} if "dense_ref_ms" in old else None)
        results.doc["models"][b.key] = dict(b.meta(), **ref, settings=results.settings, command=meta["command"])
        results.save(meta)
        for target in args.targets:
            for seed, method in [(s, m) for t, s, m in todo if t == target]:
                what = f"{b.key} {method} {target} seed {seed}"
                log(f"{what}: start")
                b.seed = seed
                torch.manual_seed(seed)
                try:
                    row = run_row(b, method, target)
                except MdpError as exc:  # an unreachable target is a result, not a crash
                    row = {"model": b.key, "method": method, "target": target, "seed": seed,
                           "target_speedup": _speedup(target), "error": str(exc)}
                    log(f"{what}: failed: {exc}")
                else:
                    matched = row["search"]["matched_ms"]
                    log(f"{what}: matched {matched:.3f} ms ({b.ref_ms / matched:.2f}x of the reference), "
                        f"top-1 {row['top1_before_ft']:.2f} -> {row['top1']:.2f}%, {row['wall_s']:.0f} s")
                results.doc["rows"].append(row)
                results.doc["wall_s"] = results.doc.get("wall_s", 0.0) + row.get("wall_s", 0.0)
                results.save(meta)
            if measure_target(b, rows_at(target)):
                results.save(meta)
    log(f"done in {time.time() - t_start:.0f} s: {results.path}")
    return results.doc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    doc = run(args, argv)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
