"""Short labels for the device measurements run on: ``cpu``, or a GPU model such as ``a100``.

Latency tables live under ``luts/<label>/``; the profile command checks that the label it
is given matches the device it actually runs on. ``python -m profilers.device_label``
prints the label of this machine's device (the GPU when torch sees one); with
``--engine E`` the label of the device that engine would run on.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from mdp_common.errors import MdpError

_VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla", "quadro"})
_JOINED_PREFIXES = frozenset({"rtx", "gtx", "titan"})


def normalize_label(label: str) -> str:
    """Lower case, letters and digits only: ``A100`` and ``a-100`` both give ``a100``."""
    return re.sub(r"[^a-z0-9]", "", label.lower())


def normalize_gpu_name(name: str) -> str:
    """The model part of a GPU name.

    ``NVIDIA A100-SXM4-80GB`` -> ``a100``, ``NVIDIA H100 80GB HBM3`` -> ``h100``,
    ``NVIDIA GeForce RTX 4090`` -> ``rtx4090``, ``Tesla T4`` -> ``t4``.
    """
    words = [w for w in re.split(r"[\s_]+", name.lower()) if w and w not in _VENDOR_WORDS]
    if not words:
        return "gpu"
    first = words[0]
    if first in _JOINED_PREFIXES and len(words) > 1:
        first += words[1]
    return normalize_label(first.split("-")[0]) or "gpu"


def device_label(device: str | None = None) -> str:
    """``cpu``, or the normalized name of the CUDA device (``cuda``, ``cuda:1``; default: any GPU)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    from profilers.engines.base import cuda_index, gpu_name

    return normalize_gpu_name(gpu_name(cuda_index(device)))


def check_label(label: str, device: str) -> str:
    """The normalized ``label`` when it names ``device``; an MdpError saying what runs otherwise."""
    want = normalize_label(label)
    have = device_label(device)
    if device == "cpu":
        if want != "cpu":
            raise MdpError(f"device label {label!r} does not match the device this runs on: the CPU "
                           "(label 'cpu')")
        return want
    from profilers.engines.base import cuda_index, gpu_name

    full = gpu_name(cuda_index(device))
    if want not in (have, normalize_label(full)):
        raise MdpError(f"GPU label {label!r} does not match the device this runs on: {full} "
                       f"(label {have!r})")
    return have


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m profilers.device_label", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", help="label of the device this engine would run on")
    parser.add_argument("--device", help="cpu, cuda or cuda:<index> (default: the GPU if any)")
    args = parser.parse_args(argv)
    device = args.device
    if args.engine:
        from profilers.engines import get_engine

        kw = {"device": device} if device else {}
        device = get_engine(args.engine, **kw).device
    print(device_label(device))
    return 0


if __name__ == "__main__":
    from mdp_common.cli import run_cli

    sys.exit(run_cli(main))
