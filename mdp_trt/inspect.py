"""``python -m mdp_trt.inspect --model NAME [--json]``: what can be pruned, what is locked and why."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

from mdp_trt.cli import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdp_trt.inspect", description=__doc__)
    ap.add_argument("--model", required=True, help="timm model name, e.g. resnet50, deit_small_patch16_224")
    ap.add_argument("--resolution", type=int, default=None, help="input resolution (default: the model's)")
    ap.add_argument("--max-choices", type=int, default=None, help="at most this many widths per dim")
    ap.add_argument("--min-step", type=int, default=None, help="channel widths in multiples of this")
    ap.add_argument("--json", action="store_true", help="print the whole space as JSON")
    args = ap.parse_args(argv)

    from mdp_trt.api import create_model, space_of
    from mdp_trt.models import SpaceConfig

    kwargs: dict[str, int] = {}
    if args.resolution:
        kwargs["resolution"] = args.resolution
    if args.max_choices:
        kwargs["max_choices"] = args.max_choices
    if args.min_step:
        kwargs["min_step"] = args.min_step
    model = create_model(args.model, pretrained=False, resolution=args.resolution)
    space = space_of(model, SpaceConfig(**kwargs))
    if args.json:
        json.dump(space.summary(), sys.stdout, indent=2)
        print()
        return 0

    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{space.model}[/bold] ({space.family}), input {space.input_size}, space id {space.space_id}")
    dims = Table(title=f"{len(space.dims)} prunable dims")
    for col in ("dim", "kind", "size", "step", "choices", "owner", "layers"):
        dims.add_column(col)
    for d in space.dims:
        dims.add_row(d.name, d.kind, str(d.size), str(d.step), str(len(d.choices)),
                     d.block or "shared", str(len(d.layers)))
    con.print(dims)
    blocks = Table(title=f"{len(space.blocks)} blocks")
    for col in ("block", "removable", "private dims", "why locked"):
        blocks.add_column(col)
    for b in space.blocks:
        blocks.add_row(b.name, "yes" if b.removable else "no", ", ".join(b.dims), b.reason)
    con.print(blocks)
    sigs = Counter(t.signature for t in space.terms)
    con.print(f"{len(space.terms)} latency terms, {len(sigs)} distinct subgraphs "
              f"({', '.join(f'{k}: {v}' for k, v in Counter(t.kind for t in space.terms).items())})")
    if space.locked:
        con.print("[bold]Locked[/bold]")
        for what, why in space.locked:
            con.print(f"  {what}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
