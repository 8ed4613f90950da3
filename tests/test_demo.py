"""``make demo``'s script, run as a user would (work files in a temp dir)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT

pytestmark = pytest.mark.integration


def test_demo_pushes_the_image_and_prints_the_sr(tmp_path):
    env = {
        **os.environ,
        "CXR_DEMO_DIR": str(tmp_path / "demo"),
        "HOME": str(tmp_path),  # no cached weights: the demo must say so and run untrained
        "HTTPS_PROXY": "http://127.0.0.1:9",  # and no download, even where there is internet
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "running an UNTRAINED model - results are NOT FOR CLINICAL USE" in out
    assert "sent 1, warnings 0, failed 0" in out
    assert "[UNTRAINED - NOT FOR CLINICAL USE]" in out
    rows = [ln for ln in out.splitlines() if ln.rstrip().endswith(("Present", "Absent"))]
    assert len(rows) == 18
    assert "Traceback" not in done.stderr
