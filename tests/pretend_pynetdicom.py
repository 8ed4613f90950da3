"""``python tests/pretend_pynetdicom.py serve ...``: the node with the stand-in classifier
(tests/modelless_node.py), on a pynetdicom that says it is ``CXR_TEST_PYNETDICOM_VERSION``
where that is set (the fast paths' guard must then turn them off). A test-only wrapper,
like faulty_node.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pynetdicom
from modelless_node import load_classifier

import node.analysis.model
from node.cli import main

if __name__ == "__main__":
    pynetdicom.__version__ = os.environ.get("CXR_TEST_PYNETDICOM_VERSION", pynetdicom.__version__)
    node.analysis.model.load_classifier = load_classifier
    sys.exit(main())
