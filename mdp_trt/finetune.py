"""Training and fine-tuning: one process on CPU or one GPU, or DistributedDataParallel under torchrun.

Under ``torchrun --nproc-per-node N -m mdp_trt.prune ...`` every process starts the same
command. The first process (rank 0) profiles, measures, solves and writes every output; it
hands each model to fine-tune to the others with :func:`share`, and all of them train it
together: this module joins the process group from the environment torchrun sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), shards the data with a DistributedSampler and
averages gradients across processes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


@dataclass
class TrainConfig:
    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    max_steps: int | None = None
    seed: int = 0
    progress: bool = True


def world() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) without it."""
    return (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    return world()[1] == 0


def device_for_rank() -> torch.device:
    _, _, local = world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed() -> bool:
    """Join torchrun's process group (once); ``False`` when not under torchrun.

    The timeout is long: the other processes wait while the first one profiles and solves,
    which can take hours for a large model on a new engine.
    """
    size, _, _ = world()
    if size <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=12))
    return True


def finish_distributed() -> None:
    """Leave the process group (every process, at the end of the job): left to interpreter
    exit, gloo's threads can abort a process that has finished its work."""
    if dist.is_initialized():
        dist.destroy_process_group()


def share(obj: Any) -> Any:
    """The first process's ``obj`` on every process of the group (pickled); ``obj`` without one."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train(model: nn.Module, dataset: Dataset, cfg: TrainConfig, desc: str = "fine-tune") -> list[float]:
    """Train ``model`` in place with AdamW and a cosine schedule; returns the mean loss per epoch."""
    distributed = init_distributed()
    device = device_for_rank()
    model.to(device).train()
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    sampler: DistributedSampler[Any] | None = (DistributedSampler(dataset, shuffle=True, seed=cfg.seed)
                                                if distributed else None)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=g, drop_last=len(dataset) > cfg.batch_size)  # type: ignore[arg-type]
    steps_per_epoch = max(1, len(loader))
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    losses: list[float] = []
    step = epoch = 0
    bar = None
    if cfg.progress and is_main():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), transient=True)
        bar.start()
        task = bar.add_task(desc, total=total, loss=float("nan"))
    try:
        while step < total:
            if sampler is not None:
                sampler.set_epoch(epoch)
            running, n = 0.0, 0
            for x, y in loader:
                if step >= total:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = loss_fn(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach())
                n += 1
                step += 1
                if bar is not None:
                    bar.update(task, advance=1, loss=running / n)
            losses.append(running / max(n, 1))
            epoch += 1
    finally:
        if bar is not None:
            bar.stop()
    model.eval()
    return losses
