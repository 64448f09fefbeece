"""Accuracy against measured latency: mdp_trt, its ablations and two baselines on Fashion-MNIST.

    python -m benchmarks.pareto                      # resnet18@32 and vit_tiny_patch16_224@64
    python -m benchmarks.pareto --quick --out runs/pareto-quick   # a smoke run of a few minutes

For each model (trained here on a Fashion-MNIST subset, checkpoint cached in ``--work``) and
each speedup target, every method prunes the same dense checkpoint until its latency,
measured on the engine beside the dense model, meets the target; then every pruned model
gets the same fine-tuning (epochs, batch size, learning rate, seed, data) and is evaluated on
the same test images. Methods:

- ``mdp``: ``python -m mdp_trt.prune`` as shipped (all dim kinds, block removal, surface);
- ``mdp-channels``: channel widths only, no block removal (CNN: ``--kinds channels``; ViT:
  ``--kinds mlp,embed``, i.e. MLP and embedding widths, no attention dims);
- ``mdp-linear``: the full space with the linear latency model (``--latency-model linear``);
- ``torch-pruning``: Torch-Pruning's MetaPruner, group Taylor importance, ``round_to=8``,
  global pruning; its pruning ratio bisected until the measured speedup meets the target;
- ``uniform``: every width scaled by one factor (ViT: embedding, MLP and per-head q/k and v
  widths; the head count is kept), Taylor importance for which units stay; the factor
  bisected the same way.

All mdp variants share one latency table per model (``--lut``). After fine-tuning, every
pruned model is measured once more beside the dense one (interleaved, same engine setting);
that measurement is the row's latency and speedup. Finished rows are kept in
``<out>/pareto_<tag>.json``: a rerun skips them. The table (``.md``) and the plot (``.png``)
are rewritten after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdp_trt.cli import run_cli
from mdp_trt.errors import MdpError

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
    ap.add_argument("--val-limit", type=int, default=None, help="test images evaluated (default 2000)")
    ap.add_argument("--epochs", type=float, default=None, help="dense training epochs (default 4)")
    ap.add_argument("--finetune-epochs", type=float, default=None, help="fine-tuning epochs per row (default 1)")
    ap.add_argument("--batch-size", type=int, default=128, help="training and fine-tuning batch size")
    ap.add_argument("--lr", type=float, default=2e-3, help="dense training learning rate")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--importance-batches", type=int, default=None, help="Taylor batches (default 8)")
    ap.add_argument("--max-choices", type=int, default=None, help="widths per dim for mdp (default 8)")
    ap.add_argument("--tolerance", type=float, default=3.0, help="latency match tolerance, %% of the target")
    ap.add_argument("--search-steps", type=int, default=None, help="bisection steps of the baselines (default 8)")
    ap.add_argument("--engine", default="onnxruntime")
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="wall (default) or cpu: onnxruntime timed by the CPU time of its one thread, "
                         "which other processes on a shared machine do not inflate")
    ap.add_argument("--tag", default=None, help="result file stem: pareto_<tag>.* (default fashion_mnist)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--work", type=Path, default=None, help="checkpoints, tables, pruned models (default runs/pareto)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: test_resnet@32, 2x, 600 images, short training (set sizes still apply)")
    ap.add_argument("--fresh", action="store_true", help="drop finished rows of other settings instead of refusing")
    ap.add_argument("--render", action="store_true", help="only rewrite the table and the plot from the JSON")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset sizes from the full or the quick profile."""
    q = args.quick
    fill = {
        "models": list(QUICK_MODELS if q else DEFAULT_MODELS),
        "targets": list(QUICK_TARGETS if q else DEFAULT_TARGETS),
        "train_limit": 600 if q else 12000,
        "val_limit": 300 if q else 2000,
        "epochs": 3.0 if q else 4.0,
        "finetune_epochs": 0.5 if q else 1.0,
        "importance_batches": 2 if q else 8,
        "max_choices": 4 if q else 8,
        "search_steps": 6 if q else 8,
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
            "importance_batches", "max_choices", "tolerance", "search_steps", "engine", "clock", "seed")
    return {k: getattr(args, k) for k in keys}


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

    def done(self, model: str, method: str, target: str) -> bool:
        return any(_row_key(r) == (model, method, target) for r in self.doc["rows"])

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


def _row_key(r: dict[str, Any]) -> tuple[str, str, str]:
    return r["model"], r["method"], r["target"]


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

        self.args, self.name, self.res, self.log = args, name, res, log
        self.key = f"{name}@{res}"
        self.dir = args.work / f"{name}-r{res}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = self.dir / f"dense-{args.data}.pt"
        clock = "" if args.clock == "wall" else f"-{args.clock}clock"
        self.lut = self.dir / f"{name}-{args.engine}-fp32-bs1-r{res}{clock}.sqlite"
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

    def measure(self, pruned: nn.Module) -> tuple[float, float]:
        """(dense ms, pruned ms), measured interleaved."""
        d, p = self.lab.measure([self.dense, pruned], self.input_shape)
        return d, p

    def finish(self, method: str, target: str, pruned: nn.Module, top1_before: float | None,
               search: dict[str, Any], t0: float) -> dict[str, Any]:
        """Fine-tune (unless the pipeline did), evaluate, measure beside the dense model; the row."""
        from mdp_trt.flops import count_params

        if top1_before is None:
            top1_before = self._evaluate(pruned, self.val_loader)
            self._train(pruned, self.train_loader.dataset, self.finetune_cfg, desc="fine-tune")
        top1 = self._evaluate(pruned, self.val_loader)
        dense_ms, ms = self.measure(pruned)
        return {"model": self.key, "method": method, "target": target, "target_speedup": _speedup(target),
                "dense_ms": dense_ms, "latency_ms": ms, "speedup": dense_ms / ms,
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
    from mdp_trt import prune
    from mdp_trt.api import load_pruned

    t0 = time.time()
    a = b.args
    out = b.dir / f"{method}-{target}"
    argv = ["--model", b.name, "--checkpoint", str(b.ckpt), "--num-classes", "10", "--in-chans", "1",
            "--resolution", str(b.res), "--engine", a.engine, "--engine-target", target,
            "--data", a.data, "--train-limit", str(a.train_limit), "--val-limit", str(a.val_limit),
            "--importance-batches", str(a.importance_batches), "--max-choices", str(a.max_choices),
            "--finetune-epochs", str(a.finetune_epochs), "--train-batch-size", str(a.batch_size),
            "--lr", str(a.finetune_lr), "--tolerance", str(a.tolerance), "--seed", str(a.seed),
            "--clock", a.clock, "--lut", str(b.lut), "--out", str(out), "--force", "--quiet"]
    if method == "mdp-channels":
        argv += ["--kinds", "mlp,embed" if b.is_vit() else "channels", "--no-block-removal"]
    elif method == "mdp-linear":
        argv += ["--latency-model", "linear"]
    prune.run(prune.build_parser().parse_args(argv))
    report = json.loads((out / "report.json").read_text())
    pruned = load_pruned(out / "pruned.pt")
    acc = report["accuracy"]
    search = {"pipeline_dense_ms": report["dense_ms"], "pipeline_pruned_ms": report["pruned_ms"],
              "pipeline_speedup": report["speedup"], "target_met": report["target_met"],
              "rounds": len(report["rounds"]), "predicted_ms": report["predicted_ms"],
              "removed_blocks": len(json.loads((out / "plan.json").read_text())["removed"]),
              "argv": argv, "note": report.get("note", "")}
    before = acc.get("pruned_before_finetune")
    if before is None:  # no fine-tuning asked: evaluated once, after pruning
        before = acc.get("pruned_no_finetune", acc.get("pruned"))
    row = b.finish(method, target, pruned, before, search, t0)
    if "pruned" in acc:
        row["top1"] = acc["pruned"]
    return row


def _bisect(b: Bench, target: str, build: Callable[[float], nn.Module], lo: float, hi: float,
            start: float, increasing: bool) -> tuple[nn.Module, dict[str, Any]]:
    """Search a scalar knob until the measured speedup meets the target within the tolerance.

    ``increasing``: the speedup grows with the knob. Keeps the least-pruned candidate within
    the tolerance (as the prune command does), else the one closest to the target.
    """
    goal = _speedup(target)
    tol = b.args.tolerance / 100
    tried: list[tuple[float, float, nn.Module]] = []
    x = start
    for _ in range(b.args.search_steps):
        model = build(x)
        d, p = b.measure(model)
        s = d / p
        tried.append((x, s, model))
        b.log(f"  knob {x:.4f}: {p:.3f} ms vs dense {d:.3f} ms, {s:.2f}x")
        if abs(s / goal - 1) <= tol:
            break
        if (s < goal) == increasing:
            lo = x
        else:
            hi = x
        x = (lo + hi) / 2
    ok = [t for t in tried if t[1] >= goal / (1 + tol)]
    if ok:
        pick = min(ok, key=lambda t: t[1])
    else:
        pick = min(tried, key=lambda t: abs(math.log(t[1] / goal)))
    search = {"knob": pick[0], "search_speedup": pick[1], "steps": len(tried),
              "tried": [[t[0], t[1]] for t in tried]}
    return pick[2], search


def _grad_batches(b: Bench) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(b.train_loader)
    return [next(it) for _ in range(min(b.args.importance_batches, len(b.train_loader)))]


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
    imp = estimate("taylor", b.dense, space, _grad_batches(b), b.args.importance_batches, seed=b.args.seed)

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


def run_row(b: Bench, method: str, target: str) -> dict[str, Any]:
    if method.startswith("mdp"):
        return run_mdp(b, method, target)
    if method == "torch-pruning":
        return run_torch_pruning(b, target)
    return run_uniform(b, target)


# -- outputs ---------------------------------------------------------------------------------


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Accuracy against measured latency: {doc.get('title', 'Fashion-MNIST')}", ""]
    if "machine" in doc:
        m = doc["machine"]
        lines += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
                  f"GPU: {'yes' if m['gpu'] else 'no'}.", ""]
    for key, info in doc["models"].items():
        eng, s = info.get("engine", {}), info["settings"]
        lines += [f"## {key}", "", f"Command: `{info.get('command', doc.get('command', ''))}`", "",
                  f"Dense: trained {s['epochs']} epoch(s) on the first {s['train_limit']} training images, "
                  f"top-1 {info['dense_top1']:.2f}% on the first {s['val_limit']} test images, "
                  f"{info['dense_params'] / 1e6:.2f} M params. Engine {eng.get('engine')} "
                  f"{eng.get('version', '')} {eng.get('precision', '')}, batch 1, {eng.get('threads', '')} "
                  f"thread(s), {s.get('clock', 'wall')} clock.", "",
                  f"Each method matches the target (within {s['tolerance']}%) on its own measurements "
                  f"(the closed loop of mdp_trt, a bisection for the baselines): 'speedup when matched'. "
                  f"Every pruned model then gets the same fine-tuning ({s['finetune_epochs']} epoch(s), batch "
                  f"{s['batch_size']}, AdamW lr {s['finetune_lr']}, cosine) and is measured once more beside "
                  f"the dense model, interleaved: 'latency', 'dense' and 'speedup', the same protocol for "
                  f"every method.", "",
                  "| method | target | speedup when matched | latency (ms) | dense (ms) | speedup | params (M) | "
                  "top-1 before FT | top-1 after FT |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        rows = [r for r in doc["rows"] if r["model"] == key]
        rows.sort(key=lambda r: (r["target_speedup"], METHODS.index(r["method"])))
        for r in rows:
            if "error" in r:
                lines.append(f"| {LABELS[r['method']]} | {r['target']} | — | — | — | — | — | — | "
                             f"failed: {r['error'][:80]} |")
                continue
            m = r["search"].get("pipeline_speedup", r["search"].get("search_speedup"))
            matched = "—" if m is None else f"{m:.2f}x"
            lines.append(f"| {LABELS[r['method']]} | {r['target']} | {matched} | {r['latency_ms']:.3f} | "
                         f"{r['dense_ms']:.3f} | {r['speedup']:.2f}x | {r['params'] / 1e6:.2f} | "
                         f"{r['top1_before_ft']:.2f} | {r['top1']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(doc["models"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        info = doc["models"][key]
        for method, marker in zip(METHODS, "os^Dv", strict=True):
            rows = sorted((r for r in doc["rows"] if r["model"] == key and r["method"] == method and "error" not in r),
                          key=lambda r: r["target_speedup"])
            if rows:
                ax.plot([r["speedup"] for r in rows], [r["top1"] for r in rows], marker=marker, label=LABELS[method])
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
        todo = [(t, m) for t in args.targets for m in args.methods if not results.done(f"{name}@{res}", m, t)]
        if not todo and f"{name}@{res}" in results.doc["models"]:
            log(f"{name}@{res}: every row done")
            continue
        b = Bench(args, name, res, log)
        results.doc["models"][b.key] = dict(b.meta(), settings=results.settings, command=meta["command"])
        results.save(meta)
        for target, method in todo:
            log(f"{b.key} {method} {target}: start")
            torch.manual_seed(args.seed)
            try:
                row = run_row(b, method, target)
            except MdpError as exc:  # an unreachable target is a result, not a crash
                row = {"model": b.key, "method": method, "target": target, "target_speedup": _speedup(target),
                       "error": str(exc)}
                log(f"{b.key} {method} {target}: failed: {exc}")
            else:
                log(f"{b.key} {method} {target}: {row['speedup']:.2f}x ({row['latency_ms']:.3f} ms), "
                    f"top-1 {row['top1_before_ft']:.2f} -> {row['top1']:.2f}%, {row['wall_s']:.0f} s")
            results.doc["rows"].append(row)
            results.doc["wall_s"] = results.doc.get("wall_s", 0.0) + row.get("wall_s", 0.0)
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
