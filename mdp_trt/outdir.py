"""Output directories written whole or not at all: a temporary directory beside the target,
marked with its owner, renamed at the end; those of dead processes are removed by the next run."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mdp_trt.errors import MdpError

OWNER = ".owner"
"""File in a temporary output directory naming the host and process that write it."""


def check_out(out: Path, force: bool) -> None:
    """Refuse an output path that is a file, or a directory with content (unless ``force``)."""
    if out.exists() and not out.is_dir():
        raise MdpError(f"--out {out} is a file; give the path of a directory to create")
    if out.exists() and any(out.iterdir()) and not force:
        raise MdpError(f"output directory {out} exists and is not empty (use --force to replace it)")


@contextmanager
def written_into(out: Path, force: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside ``out`` to write into; on leaving the block without
    an error it replaces ``out``, and in every case it is gone afterwards."""
    check_out(out, force)
    tmp = temp_dir(out)
    try:
        yield tmp
        try:
            (tmp / OWNER).unlink()
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except OSError as exc:
            raise MdpError(f"cannot move the results into {out}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temp_dir(out: Path) -> Path:
    """A new temporary directory beside ``out`` (``.<out>.<random>``), marked with its owner;
    those left by dead processes of this host (``kill -9``) are removed first."""
    from profilers.export import current_umask

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's private mode would stay on the renamed result
    except OSError as exc:
        raise MdpError(f"cannot create the output directory {out}: {exc}") from exc
    return tmp


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove the temporary directories of ``out`` whose owner (a process of this host) is dead;
    never one of a live process, of another host, or without an owner file. Returns them."""
    removed = []
    for d in sorted(Path(p) for p in glob.glob(glob.escape(str(out.parent / f".{out.name}.")) + "*")):
        try:
            host, pid = (d / OWNER).read_text().split()
            alive = host != socket.gethostname() or _alive(int(pid))
        except (OSError, ValueError):
            continue
        if not alive:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
