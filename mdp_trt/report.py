"""The prune command's report: ``report.json``, a readable ``report.md`` and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def verdict(r: dict[str, Any]) -> str:
    """One sentence: the measured latency against the budget, within the tolerance or not."""
    budget, measured, tol = r["target"]["budget_ms"], r["pruned_ms"], r.get("tolerance_pct", 0.0)
    off = 100.0 * (measured / budget - 1.0)
    head = f"Measured {measured:.3f} ms against a budget of {budget:.3f} ms ({off:+.1f}%): "
    if abs(off) <= tol:
        return head + f"on target (tolerance {tol}%)."
    if off < 0:
        return head + f"faster than asked, by more than the {tol}% tolerance (over-pruned)."
    return head + f"the target is missed (tolerance {tol}%)."


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
    lines += [
        "",
        verdict(r),
        "",
        f"Prediction error of the pruned latency: {_fmt(r.get('prediction_error_pct'), 1)}%.",
        "",
        "## Closed loop",
        "",
        "| round | budget (ms) | predicted (ms) | measured (ms) | speedup | solve (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, rd in enumerate(r.get("rounds", []), 1):
        lines.append(f"| {i} | {_fmt(rd['budget_ms'])} | {_fmt(rd['predicted_ms'])} | "
                     f"{_fmt(rd['measured_ms'])} | {_fmt(rd.get('speedup'), 2)}x | {_fmt(rd.get('solve_s'), 2)} |")
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


def write(r: dict[str, Any], out: Path) -> None:
    """Write ``report.json``, ``report.md`` and the plots into ``out``."""
    r.setdefault("files", [])
    r["files"] += plots(r, out)
    r["files"] += ["report.json", "report.md"]
    (out / "report.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "report.md").write_text(markdown(r))
