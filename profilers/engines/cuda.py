"""A runner for work enqueued on a CUDA stream, timed with CUDA events.

Shared by the torch and TensorRT engines. ``launch`` enqueues one inference on the current
stream (a CUDA-graph replay, or ``execute_async_v3``); nothing is copied between host and
device in the timed region. A call syncs the stream and so measures host latency;
``timed(n)`` enqueues ``n`` inferences back to back with an event between each pair and
syncs once, which gives the GPU compute time of each (as ``trtexec --noDataTransfers``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class CudaRunner:
    """Host latency by call, device time by ``timed``; ``keep`` holds buffers alive."""

    def __init__(self, launch: Callable[[], Any], stream: torch.cuda.Stream,
                 keep: tuple[Any, ...] = (), close: Callable[[], None] | None = None) -> None:
        self._launch = launch
        self._stream = stream
        self._keep: tuple[Any, ...] = keep
        self._close = close

    def __call__(self) -> None:
        with torch.cuda.stream(self._stream):
            self._launch()
        self._stream.synchronize()

    def timed(self, iters: int) -> list[float] | None:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        with torch.cuda.stream(self._stream):
            events[0].record(self._stream)
            for i in range(iters):
                self._launch()
                events[i + 1].record(self._stream)
        self._stream.synchronize()
        return [float(events[i].elapsed_time(events[i + 1])) for i in range(iters)]

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None
        self._keep = ()


def capture_graph(launch: Callable[[], Any], stream: torch.cuda.Stream, warmup: int = 3
                  ) -> torch.cuda.CUDAGraph:
    """Run ``launch`` a few times on ``stream``, then capture one call into a CUDA graph."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            launch()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        launch()
    stream.synchronize()
    return graph
