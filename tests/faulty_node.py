"""``python tests/faulty_node.py serve ...``: the real node, with one image made poisonous.

A test-only wrapper (nothing in ``node/`` knows about it): preprocessing the image whose
SOP Instance UID is ``CXR_TEST_POISON_UID`` kills the process (``exit``: ``os._exit``, as a
segfaulting decoder or the OOM killer would) or hangs it (``hang``: a decoder stuck in a
loop that holds the GIL).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import node.process.pipeline
from node.cli import main

_POISON = os.environ["CXR_TEST_POISON_UID"]
_MODE = os.environ.get("CXR_TEST_POISON_MODE", "exit")
_real = node.process.pipeline.preprocess


def _poisoned(ds, *args, **kwargs):  # type: ignore[no-untyped-def]
    if str(ds.SOPInstanceUID) == _POISON:
        if _MODE == "hang":  # sleep(3) through PyDLL holds the GIL: no Python thread runs
            ctypes.PyDLL(None).sleep(3600)
        os._exit(137)
    return _real(ds, *args, **kwargs)


node.process.pipeline.preprocess = _poisoned  # type: ignore[assignment]
if os.environ.get("CXR_TEST_STAND_IN") == "1":  # the model is not what the test is about
    from modelless_node import stand_in

    stand_in()
sys.exit(main())
