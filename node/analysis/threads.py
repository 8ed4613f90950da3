"""How torch's OpenMP threads wait between parallel regions (set before torch is imported).

torch's CPU kernels run on libgomp. Between two parallel regions (a DenseNet forward pass
has hundreds) libgomp's threads by default spin for ~300,000 iterations before they sleep.
On a machine whose cores are shared - the node's own threads receiving, decoding and
sending, Orthanc, the senders - a spinning thread burns the core that the thread it waits
for needs, and under load the node's CPU time per image and its throughput get many times
worse (measured in bench/RESULTS.md, "How torch's threads wait"). ``passive`` (libgomp's
OMP_WAIT_POLICY=PASSIVE: sleep at once) gives those cycles back; ``active`` spins without
limit; ``default`` leaves libgomp's own setting. libgomp reads the variable once, when torch
loads it: set it before the first ``import torch`` of the process; an OMP_WAIT_POLICY
already in the environment wins.
"""

from __future__ import annotations

import logging
import os
import sys

from node.core.config import WaitPolicy

log = logging.getLogger(__name__)

VARIABLE = "OMP_WAIT_POLICY"


def apply_wait_policy(policy: WaitPolicy) -> str | None:
    """Put ``policy`` into this process's environment for libgomp; returns the value in
    effect (None: libgomp's default). Too late once torch is imported: then it logs a
    warning and changes nothing."""
    current = os.environ.get(VARIABLE)
    if policy == "default" or current is not None:
        return current
    if "torch" in sys.modules:
        log.warning("model.omp_wait_policy = %r not applied: torch was imported before it", policy)
        return current
    os.environ[VARIABLE] = policy.upper()
    return os.environ[VARIABLE]
