"""``python -m mdp_trt.prune``: the prune command (:mod:`mdp_trt.prune_command`).

``mdp_trt.prune`` is also the Python API's function (:func:`mdp_trt.api.prune`). Importing
this module sets the package's attribute ``prune`` to the module, so the module is made
callable as that function: ``mdp_trt.prune(model, "2x")`` works after any import.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from mdp_trt.api import prune as _prune
from mdp_trt.cli import run_cli
from mdp_trt.outdir import OWNER, remove_stale_temp_dirs
from mdp_trt.prune_command import build_parser, config_of, main, run

__all__ = ["OWNER", "build_parser", "config_of", "main", "remove_stale_temp_dirs", "run"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _prune(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(run_cli(main))
else:
    sys.modules[__name__].__class__ = _CallableModule
