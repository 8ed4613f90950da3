"""A batch's parts through the model at once, each on its own torch threads
(``model.streams``).

On a CPU, DenseNet-121's convolutions split over torch's intra-op threads scale poorly: two
threads run a batch of 4 only ~1.5x as fast as one, and they meet at a barrier after each of
the graph's hundreds of operations, so a thread that loses its core to another (a summary
image, the network, the PACS on the same host) stalls the other. Two halves of the batch,
each run by one thread through the same graph at once, keep both cores busy and wait for
nothing but each other's end: ~25 % more images/s on 2 cores (bench/RESULTS.md, "Two
streams"). Only for the traced graph, which runs without the GIL
(:mod:`node.analysis.graph`); the eager module would take the GIL between operations.

The stream threads are daemons, as the worker's own thread is: a part that hangs must not
keep the process from exiting once ``worker.shutdown_timeout`` has passed
(concurrent.futures' pool joins its threads at the interpreter's exit).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)


_Part = tuple[Future[Any], Callable[[Any], Any], Any]


class Streams:
    """Runs a torch callable on up to ``count`` parts of a batch at once (the caller's
    thread takes the first part) and joins the outputs in the batch's order."""

    def __init__(self, count: int) -> None:
        if count < 2:
            raise ValueError(f"streams: at least 2, got {count}")
        self.count = count
        self._parts: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"model-stream-{i}", daemon=True)
            for i in range(1, count)
        ]
        for thread in self._threads:
            thread.start()

    def __call__(self, fn: Callable[[Any], Any], x: Any) -> Any:
        import torch

        parts = torch.tensor_split(x, min(self.count, len(x)))
        if len(parts) < 2:
            return fn(x)
        others: list[Future[Any]] = []
        for part in parts[1:]:
            others.append(Future())
            self._parts.put((others[-1], fn, part))
        try:
            first = fn(parts[0])
        finally:
            outputs = [future.result() for future in others]  # raises what a part raised
        return torch.cat([first, *outputs])

    def close(self) -> None:
        for _ in self._threads:
            self._parts.put(None)

    def _serve(self) -> None:
        while (item := self._parts.get()) is not None:
            future, fn, part = item
            try:
                future.set_result(_inference(fn, part))
            except BaseException as exc:  # handed to the caller, which raises it
                future.set_exception(exc)


def _inference(fn: Callable[[Any], Any], part: Any) -> Any:
    import torch

    with torch.inference_mode():  # thread-local: as in the caller's thread
        return fn(part)


def start_streams(count: int) -> Streams | None:
    """``count`` streams for the traced graph, torch's intra-op threads shared out among
    them (at least one each); None for one stream (torch's threads as they are)."""
    if count < 2:
        return None
    import torch

    threads = torch.get_num_threads()
    each = max(1, threads // count)
    torch.set_num_threads(each)
    log.info(
        "model.streams: up to %d parts of each batch at once, %d torch thread(s) each", count, each
    )
    return Streams(count)
