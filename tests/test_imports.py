"""Imports go one way: ``profilers`` and ``solvers`` load nothing of ``mdp_trt``, and the table,
profiling and solver modules load neither torch nor timm (a tool that reads a latency table or
solves a plan starts in well under a second). Checked in a fresh interpreter, by the modules it
ends up holding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mdp_common.cli
import mdp_common.errors
import mdp_common.space
import mdp_trt.cli
import mdp_trt.errors
import mdp_trt.space

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_table_profile_and_solvers_load_neither_torch_nor_timm() -> None:
    loaded = _loaded_after("import profilers.table, profilers.profile, profilers.engines, solvers")
    assert {"profilers", "solvers", "mdp_common"} <= loaded
    assert not loaded & {"torch", "timm", "mdp_trt"}, sorted(loaded & {"torch", "timm", "mdp_trt"})


def test_no_module_of_profilers_or_solvers_loads_mdp_trt() -> None:
    """Every module, engines included (those load torch, which is theirs to need)."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for pkg in ("profilers", "solvers") for p in (ROOT / pkg).rglob("*.py")
    )
    assert "profilers.engines.tensorrt" in modules and "solvers.mip" in modules
    loaded = _loaded_after("\n".join(f"import {m}" for m in modules))
    assert "mdp_trt" not in loaded and "timm" not in loaded, sorted(loaded)


def test_mdp_trt_modules_re_export_the_shared_types() -> None:
    """Old imports keep working and give the very same classes (``except`` clauses still match)."""
    assert mdp_trt.errors.MdpError is mdp_common.errors.MdpError
    assert mdp_trt.errors.EngineError is mdp_common.errors.EngineError
    assert mdp_trt.space.PruningSpace is mdp_common.space.PruningSpace
    assert mdp_trt.space.Plan is mdp_common.space.Plan
    assert mdp_trt.cli.run_cli is mdp_common.cli.run_cli
