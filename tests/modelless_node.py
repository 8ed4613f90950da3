"""``python tests/modelless_node.py serve|classify ...``: the real command line with a
stand-in classifier (no torch: the process starts in about a second).

A test-only wrapper, like ``faulty_node.py``: every image scores 0.25 on each label; the
rest (the SCP, the spool, the worker, the SR and JSON files, the CLI) is the node's own.
``CXR_TEST_STAND_IN_SECONDS``: seconds each image takes (a sleep, no CPU), for a test that
must catch the command half-way. The SR template is used without its start-up check
against highdicom's build (~2 s of CPU in every process; tests/sr/test_srtemplate.py checks
the equivalence, and the nodes with the real model still check it at start).
Imported, it only defines the stand-in (``StandIn(None, INFO, "cpu")``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import node.analysis.model
import node.sr.srtemplate
from node.cli import main
from node.core.config import ModelConfig
from node.sr.codes import PATHOLOGY_CODES

LABELS = tuple(PATHOLOGY_CODES)
INFO = node.analysis.model.ModelInfo(
    weights="densenet121-res224-all",
    weights_file="",
    weights_sha256="0" * 64,
    library_version="stand-in",
    trained=False,
    pathologies=LABELS,
    op_threshs=(0.5,) * len(LABELS),
)


class StandIn(node.analysis.model.Classifier):
    def predict(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        time.sleep(len(batch) * float(os.environ.get("CXR_TEST_STAND_IN_SECONDS", "0")))
        return np.full((len(batch), len(LABELS)), 0.25, dtype=np.float32)

    def predict_with_maps(
        self, batch: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        return self.predict(batch), np.zeros((len(batch), 1024, 7, 7), dtype=np.float32)

    def class_weights(self) -> npt.NDArray[np.float32]:
        return np.zeros((len(LABELS), 1024), dtype=np.float32)

    def trace(self, channels_last: bool = True, streams: int = 1) -> bool:
        return False  # no layers to trace


def load_classifier(cfg: ModelConfig) -> node.analysis.model.Classifier:
    return StandIn(None, INFO, "cpu")


def stand_in() -> None:
    """Patch this process's node: the stand-in classifier, the SR template unchecked."""
    node.analysis.model.load_classifier = load_classifier
    defaults = node.sr.srtemplate.ReportEncoder.__init__.__kwdefaults__
    assert defaults is not None and "verify" in defaults, "ReportEncoder(verify=) is gone"
    defaults["verify"] = False


if __name__ == "__main__":
    stand_in()
    sys.exit(main())
