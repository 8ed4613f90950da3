"""glibc malloc settings for a process that runs the model (serve, classify, the bench).

torch's CPU allocator hands every activation back to malloc after each layer. glibc's
defaults then return most of it to the kernel, and the next forward pass faults it in
again, zero-filled: thousands of page faults per image, a large share of the pipeline's
time. With large allocations kept on the heap (mmap threshold 32 MiB, the most glibc
takes) and the heap trimmed only past 16 MiB of free space per image of a batch, those
faults stop without raising the node's memory peak. Setting only one of the two makes it
worse: glibc then stops adapting the other (more faults, slower). Measured in
bench/RESULTS.md, third session, Inference: "Page faults".

The start-up (imports, loading the model, the SR encoder's self-check) leaves free memory
in the main thread's heap, which the serving threads, allocating mostly from arenas of
their own, do not reuse: ``serve`` hands it back once before it starts serving, which
lowers the memory peak (measured in bench/RESULTS.md, fifth session, "Start-up garbage
handed back").
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # HEAP_MAX_SIZE / 2 on 64-bit: the largest glibc accepts
TRIM_PER_IMAGE = 16 * 2**20  # of free heap kept per batch image: batch 4 trims past 64 MiB
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory(batch_size: int) -> bool:
    """Apply the settings above for ``batch_size`` images per forward pass, unless the
    environment sets glibc's own; returns whether they were applied (not on other
    platforms or C libraries)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    libc = None if any(name in os.environ for name in _ENVIRONMENT) else _glibc()
    if libc is None:
        return False
    applied: bool = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trim = TRIM_PER_IMAGE * max(2, batch_size)
    applied = libc.mallopt(M_TRIM_THRESHOLD, trim) == 1 and applied
    if not applied:
        log.warning("glibc refused the malloc thresholds: inference may run slower")
    return applied


def release_start_up_garbage() -> bool:
    """Collect the start-up's garbage and hand glibc's free pages back to the kernel
    (``malloc_trim(0)``), once, before serving: imports and the SR self-check leave free
    memory in the main heap that the serving threads, with their own arenas, mostly do not
    reuse.
    Returns whether glibc was asked."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc() -> ctypes.CDLL | None:
    """glibc, or None on other platforms and C libraries (e.g. musl): nothing to tune."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
