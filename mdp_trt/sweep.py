"""``python -m mdp_trt.sweep``: the budget sweep command (:mod:`mdp_trt.budgets`).

``mdp_trt.sweep`` is also the Python function (:func:`mdp_trt.budgets.sweep`); as for
:mod:`mdp_trt.prune`, importing this module leaves ``mdp_trt.sweep(...)`` callable.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from mdp_trt.budgets import build_parser, main, sweep
from mdp_trt.cli import run_cli

__all__ = ["build_parser", "main", "sweep"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return sweep(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(run_cli(main))
else:
    sys.modules[__name__].__class__ = _CallableModule
