"""DenseNet-121's layers as one TorchScript graph (``model.trace``), checked against the
eager module before it is used.

Run from Python, each of the ~400 operations of a forward pass takes the GIL back between
kernels; while a summary image is built in another thread (Python code: highdicom,
pydicom, Pillow's text), the model waits for the GIL at each of them. A traced and frozen
graph runs the whole pass in C++ without the GIL (and folds the batch norms into the
convolutions); it is traced with the weights in the channels-last layout, whose CPU
convolutions are faster. What it gives: bench/RESULTS.md, "The model as one graph" and
"Channels last".

Guards: only where torch offers ``torch.jit.trace`` and ``torch.jit.freeze`` and on the
CPU (the GIL is the reason; CUDA kernels are asynchronous); the graph's output for a fixed
probe batch must equal the eager module's to :data:`TOLERANCE` of its largest value, or
the eager module is kept and a WARNING says why. Whatever tracing raises keeps the eager
module too.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

TOLERANCE = 1e-5
"""Largest difference allowed between the graph's and the eager module's feature maps,
relative to the largest absolute value (float rounding of the folded batch norms is ~1e-6)."""

PROBE_BATCH = 2
WARM_UP = 2
"""Runs on the probe: torch's profiling executor optimises the graph on its second run."""


def traced(features: Any, device: str, channels_last: bool = True) -> Any | None:
    """``features`` (a torch module taking ``(N, 1, 224, 224)``) as a frozen TorchScript
    graph that computes the same, or None (logged) where that cannot be had here;
    ``channels_last``: traced with its weights in that layout (the module is left as it is)."""
    import torch

    jit: Any = getattr(torch, "jit", None)
    if device != "cpu":
        log.info(
            "model.trace: not on %s (the graph is for the CPU); the module runs eagerly", device
        )
        return None
    if not (hasattr(jit, "trace") and hasattr(jit, "freeze")):
        log.warning("model.trace: torch %s has no torch.jit.trace/freeze; eager", torch.__version__)
        return None
    probe = _probe(torch)
    try:
        with torch.inference_mode():
            want = features(probe)
        with torch.no_grad():
            module = _channels_last(torch, features) if channels_last else features
            graph = jit.freeze(jit.trace(module, probe, check_trace=False).eval())
        with torch.inference_mode():
            for _ in range(WARM_UP):
                got = graph(probe)
    except Exception as exc:  # torch's tracer raises many types; the eager module stays
        log.warning("model.trace: tracing failed (%s: %s); eager", type(exc).__name__, exc)
        log.debug("model.trace: tracing failed", exc_info=True)
        return None
    finally:
        if channels_last:
            _contiguous(torch, features)  # the eager module as torchxrayvision built it
    return graph if _same(torch, want, got) else None


def _channels_last(torch: Any, features: Any) -> Any:
    """``features`` with its weights in the channels-last layout (in place), in which the
    CPU convolutions run ~20 % faster at batch 4 (bench/RESULTS.md, "Channels last");
    where this torch lacks the layout, as it is."""
    layout = getattr(torch, "channels_last", None)
    return features if layout is None else features.to(memory_format=layout)


def _contiguous(torch: Any, features: Any) -> None:
    layout = getattr(torch, "contiguous_format", None)
    if layout is not None:
        features.to(memory_format=layout)


def _probe(torch: Any) -> Any:
    """A fixed batch in the model's input range ([-1024, 1024])."""
    gen = torch.Generator().manual_seed(20261129)
    return (torch.rand((PROBE_BATCH, 1, 224, 224), generator=gen) * 2048 - 1024).float()


def _same(torch: Any, want: Any, got: Any) -> bool:
    if tuple(want.shape) != tuple(got.shape):
        log.warning("model.trace: the graph's output is %s, not %s; eager", got.shape, want.shape)
        return False
    scale = float(want.abs().max()) or 1.0
    diff = float((want - got).abs().max()) / scale
    if not diff <= TOLERANCE:  # NaN too
        log.warning(
            "model.trace: the graph differs from the module by %.3g of its largest value "
            "(more than %g); eager",
            diff,
            TOLERANCE,
        )
        return False
    log.info("model.trace: DenseNet-121's layers run as a TorchScript graph (%.1g)", diff)
    return True
