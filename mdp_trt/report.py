"""The prune command's report: ``report.json``, a readable ``report.md`` and PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Report:
    """What a prune job found, as ``report.json`` holds it (:meth:`to_json`, same keys, same order)."""

    model: str
    target: dict[str, Any]
    engine: dict[str, Any]
    dense_ms: float
    dense_predicted_ms: float
    pruned_ms: float
    predicted_ms: float
    speedup: float
    target_met: bool
    measurement: dict[str, Any]
    tolerance_pct: float
    prediction_error_pct: float
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    accuracy: dict[str, float]
    importance: str
    finetune: dict[str, Any]
    steps: int
    rounds: list[dict[str, Any]]
    calibration: dict[str, Any]
    interpolated_points: int
    blocks: list[dict[str, Any]]
    dims: list[dict[str, Any]]
    table: str
    wall_s: float
    files: list[str] = field(default_factory=list)
    """What :meth:`write` put beside the report (empty until then)."""
    note: str = ""
    part: str | None = None
    """The submodule pruned inside a user's model (``None``: the whole timm model)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["part"] is None:  # reports of whole timm models keep the keys they always had
            del d["part"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        return markdown(self.to_dict())

    @property
    def outcome(self) -> str:
        return outcome(self.to_dict())

    def write(self, out: Path) -> None:
        """``report.json``, ``report.md`` and the plots into ``out``; their names join :attr:`files`."""
        self.files += plots(self.to_dict(), out)
        self.files += ["report.json", "report.md"]
        (out / "report.json").write_text(self.to_json())
        (out / "report.md").write_text(self.to_markdown())


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


ON_TARGET, MISSED, OVER_PRUNED, UNRELIABLE = "on target", "missed", "over-pruned", "unreliable"
EXIT_CODES = {ON_TARGET: 0, MISSED: 3, OVER_PRUNED: 4, UNRELIABLE: 5}
"""Exit status of ``python -m mdp_trt.prune`` by outcome (1: bad input, 2: bad arguments)."""


def outcome(r: dict[str, Any]) -> str:
    """``on target``, ``missed`` (slower than the budget beyond the tolerance), ``over-pruned``
    (faster beyond it), or ``unreliable`` (the measurement cannot be trusted: no verdict)."""
    m = r.get("measurement") or {}
    if not m.get("reliable", True):
        return UNRELIABLE
    off = 100.0 * (r["pruned_ms"] / r["target"]["budget_ms"] - 1.0)
    if abs(off) <= r.get("tolerance_pct", 0.0):
        return ON_TARGET
    return OVER_PRUNED if off < 0 else MISSED


def verdict(r: dict[str, Any]) -> str:
    """One sentence: the measured latency against the budget, within the tolerance or not, or
    why the measurement cannot say."""
    budget, measured, tol = r["target"]["budget_ms"], r["pruned_ms"], r.get("tolerance_pct", 0.0)
    off = 100.0 * (measured / budget - 1.0)
    head = f"Measured {measured:.3f} ms against a budget of {budget:.3f} ms ({off:+.1f}%): "
    kind = outcome(r)
    if kind == UNRELIABLE:
        return head + ("unreliable: the measurement cannot be trusted "
                       f"({r['measurement'].get('reason') or 'see the closed loop'}); no verdict.")
    if kind == ON_TARGET:
        return head + f"on target (tolerance {tol}%)."
    if kind == OVER_PRUNED:
        return head + f"faster than asked, by more than the {tol}% tolerance (over-pruned)."
    return head + f"the target is missed (tolerance {tol}%)."


def summary_line(r: dict[str, Any]) -> str:
    """The prune command's last line: outcome, speedup, latency against the budget."""
    kind = outcome(r)
    line = (f"{kind}: {r['speedup']:.2f}x measured ({r['dense_ms']:.3f} -> {r['pruned_ms']:.3f} ms, budget "
            f"{r['target']['budget_ms']:.3f} ms, {r['engine']['engine']}, {clock_name(r)})")
    if kind == UNRELIABLE:
        line += f"; {r['measurement'].get('reason', '')}"
    return line


def clock_name(r: dict[str, Any]) -> str:
    m = r.get("measurement") or {}
    return {"thread-cpu": "thread CPU time", "host": "wall clock"}.get(m.get("clock", ""), m.get("clock", "clock"))


def markdown(r: dict[str, Any]) -> str:
    """A readable summary of a prune run."""
    eng = r["engine"]
    lines = [
        f"# Pruning report: {r['model']}",
        "",
        f"Target **{r['target']['text']}** on {eng['engine']} {eng['version']} ({eng['device']}, "
        f"{eng['precision']}, batch {eng['batch_size']}, {eng['resolution']}px, {eng['threads']} threads).",
        "",
        "| | dense | pruned | ratio |",
        "|---|---:|---:|---:|",
        f"| latency, measured (ms) | {_fmt(r['dense_ms'])} | {_fmt(r['pruned_ms'])} | {r['speedup']:.2f}x |",
        f"| latency, predicted (ms) | {_fmt(r.get('dense_predicted_ms'))} | {_fmt(r['predicted_ms'])} | |",
        f"| parameters (M) | {r['params_before'] / 1e6:.2f} | {r['params_after'] / 1e6:.2f} | "
        f"{r['params_before'] / max(r['params_after'], 1):.2f}x |",
        f"| GFLOPs | {r['flops_before'] / 1e9:.3f} | {r['flops_after'] / 1e9:.3f} | "
        f"{r['flops_before'] / max(r['flops_after'], 1):.2f}x |",
    ]
    acc = r.get("accuracy") or {}
    if acc:
        lines += [
            "",
            "| top-1 (%) | value |",
            "|---|---:|",
            *[f"| {k.replace('_', ' ')} | {_fmt(v, 2)} |" for k, v in acc.items()],
        ]
    meas = r.get("measurement") or {}
    lines += [
        "",
        verdict(r),
        "",
        f"Prediction error of the pruned latency: {_fmt(r.get('prediction_error_pct'), 1)}%.",
    ]
    if meas:
        others = meas.get("others_cores")
        lines += [
            "",
            f"Measurement: dense and pruned side by side in {meas.get('rounds')} interleaved rounds "
            f"({clock_name(r)}), each round's lower quartile, median over rounds; spread between rounds "
            f"{100 * max(meas.get('spread', [0.0])):.1f}% (speedup {100 * meas.get('ratio_spread', 0.0):.1f}%), "
            f"so the medians are uncertain by {100 * meas.get('error', 0.0):.1f}%, "
            f"{meas.get('attempts', 1)} attempt(s); other processes kept "
            f"{'?' if others is None else f'{others:.1f}'} core(s) busy, load average {_fmt(meas.get('load_avg'), 1)}.",
        ]
    lines += [
        "",
        "## Closed loop",
        "",
        "| round | budget (ms) | predicted (ms) | measured (ms) | speedup | spread | solve (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, rd in enumerate(r.get("rounds", []), 1):
        m = rd.get("measurement") or {}
        spread = f"{100 * max(m['spread']):.1f}%" if m.get("spread") else "-"
        if m and not m.get("reliable", True):
            spread += " (unreliable)"
        lines.append(f"| {i} | {_fmt(rd['budget_ms'])} | {_fmt(rd['predicted_ms'])} | "
                     f"{_fmt(rd['measured_ms'])} | {_fmt(rd.get('speedup'), 2)}x | {spread} | "
                     f"{_fmt(rd.get('solve_s'), 2)} |")
    if r.get("note"):
        lines += ["", r["note"]]
    lines += ["", "## Blocks", "", "| block | kept | dense (ms, raw) | pruned (ms, raw) |", "|---|---|---:|---:|"]
    for b in r.get("blocks", []):
        lines.append(f"| {b['name']} | {'yes' if b['kept'] else 'removed'} | {_fmt(b['dense_ms'])} | "
                     f"{_fmt(b['pruned_ms'])} |")
    lines += ["", "## Widths", "", "| dim | kind | full | kept |", "|---|---|---:|---:|"]
    for d in r.get("dims", []):
        lines.append(f"| {d['name']} | {d['kind']} | {d['size']} | {d['kept'] if d['kept'] is not None else 'removed'} |")
    files = r.get("files", [])
    if files:
        lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files)]
    return "\n".join(lines) + "\n"


def plots(r: dict[str, Any], out: Path) -> list[str]:
    """Per-block latency and per-dim kept fraction; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    blocks = r.get("blocks", [])
    if blocks:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(blocks)), 4))
        x = range(len(blocks))
        ax.bar([i - 0.2 for i in x], [b["dense_ms"] for b in blocks], 0.4, label="dense")
        ax.bar([i + 0.2 for i in x], [b["pruned_ms"] for b in blocks], 0.4, label="pruned")
        ax.set_xticks(list(x), [b["name"] for b in blocks], rotation=90, fontsize=7)
        ax.set_ylabel("latency (ms, sum of terms)")
        ax.set_title(f"{r['model']}: {r['dense_ms']:.2f} ms -> {r['pruned_ms']:.2f} ms measured ({r['speedup']:.2f}x)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "blocks.png", dpi=110)
        plt.close(fig)
        written.append("blocks.png")
    dims = r.get("dims", [])
    if dims:
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(dims)), 4))
        ax.bar(range(len(dims)), [(d["kept"] or 0) / d["size"] for d in dims])
        ax.set_xticks(range(len(dims)), [d["name"] for d in dims], rotation=90, fontsize=6)
        ax.set_ylabel("kept fraction")
        ax.set_ylim(0, 1.05)
        fig.tight_layout()
        fig.savefig(out / "widths.png", dpi=110)
        plt.close(fig)
        written.append("widths.png")
    return written
