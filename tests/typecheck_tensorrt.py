"""Type-check the TensorRT engine against TensorRT's own stubs, in a way that can fail.

The ``tensorrt-stubs`` package ships its stubs without a ``py.typed`` marker and with a few
lines that are not valid Python, so a plain ``mypy profilers/engines/tensorrt.py`` sees
``tensorrt`` as untyped (everything ``Any``) and passes any misuse. This copies the stubs
into ``.mypy_cache/tensorrt-typings``, repairs those lines, and runs mypy on the engine with
them, together with a canary holding a known misuse (``config.set_flag("FP16")``) that must
be reported: a check that no longer sees the stubs fails instead of passing.

``python tests/typecheck_tensorrt.py [FILE ...]`` (default: the engine) prints mypy's errors
in the files and exits 1 if there are any, 2 if the check itself cannot run (no stubs, the
canary not caught); ``make test`` runs it. Imports nothing of the project.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "profilers" / "engines" / "tensorrt.py"
WORK = ROOT / ".mypy_cache" / "tensorrt-typings"
CANARY = ("import tensorrt as trt\n\n\n"
          "def misuse(config: trt.IBuilderConfig) -> None:\n"
          "    config.set_flag('FP16')\n")
CANARY_ERROR = re.compile(r'trt_canary\.py:5: error: .*"set_flag".*BuilderFlag')


class CheckError(Exception):
    """The check cannot run or cannot be trusted (its result would mean nothing)."""


def stub_root() -> Path | None:
    """The site directory holding the installed ``tensorrt`` stubs, or None."""
    try:
        dist = importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == "tensorrt/__init__.pyi":
            return Path(str(dist.locate_file(f))).parent.parent
    return None


def repaired_stubs(dest: Path) -> Path:
    """A copy of the stubs in ``dest`` with the lines that are not valid Python fixed."""
    src = stub_root()
    if src is None:
        raise CheckError("tensorrt-stubs is not installed (make setup installs it)")
    shutil.rmtree(dest, ignore_errors=True)
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(src / pkg, dest / pkg)
    init = dest / "tensorrt" / "__init__.pyi"
    init.write_text(re.sub(r"^import tensorrt_libs as tensorrt_libs$", "", init.read_text(), flags=re.M))
    for pyi in (dest / "tensorrt_bindings").glob("*.pyi"):
        text = pyi.read_text()
        text = re.sub(r"\bin: ", "in_: ", text)  # a parameter named `in`
        text = re.sub(r", channel_axis: int\)", ", channel_axis: int = ...)", text)
        pyi.write_text(text)
    return dest


def check(files: Sequence[Path] = (ENGINE,), work: Path = WORK) -> list[str]:
    """mypy's errors in ``files`` against the repaired stubs (empty: clean).

    Raises :class:`CheckError` when the stubs are missing, mypy stops early, or the canary's
    misuse goes unreported (then ``tensorrt`` is not typed and nothing was checked).
    """
    stubs = repaired_stubs(work / "stubs")
    canary = work / "trt_canary.py"
    canary.write_text(CANARY)
    cfg = work / "mypy.ini"
    # follow_imports=silent: the project's other modules are read for their types, not reported.
    cfg.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\nfollow_imports = silent\n"
        f"mypy_path = {stubs}:{ROOT}\ncache_dir = {work / 'cache'}\n"
        "[mypy-tensorrt.*]\nignore_missing_imports = False\nignore_errors = True\n"
        "[mypy-tensorrt_bindings.*]\nignore_errors = True\n"
    )
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(cfg), "--no-error-summary",
                        "--show-absolute-path", *map(str, files), str(canary)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = (r.stdout + r.stderr).splitlines()
    if r.returncode not in (0, 1) or any("prevented further checking" in line for line in lines):
        raise CheckError("mypy did not run through:\n" + "\n".join(lines))
    if not any(CANARY_ERROR.search(line) for line in lines):
        raise CheckError("the canary's misuse (set_flag('FP16')) went unreported, so the stubs are not "
                         "in use:\n" + "\n".join(lines))
    return [line for line in lines if not line.startswith(str(canary))]


def main(argv: Sequence[str] | None = None) -> int:
    files = [Path(f).resolve() for f in (sys.argv[1:] if argv is None else argv)] or [ENGINE]
    try:
        errors = check(files)
    except CheckError as exc:
        print(f"tensorrt type check: {exc}", file=sys.stderr)
        return 2
    print("\n".join(errors) if errors else
          f"tensorrt type check: no issues in {len(files)} file(s), against the repaired stubs")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
