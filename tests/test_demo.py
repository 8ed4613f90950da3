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


def test_a_fresh_clone_with_nothing_beside_it_runs_the_demo_and_the_tests(tmp_path):
    """``git clone`` into an empty folder: the demo and the core tests need nothing beside
    the clone (sample data is in tests/data); the corpus tier skips, saying why."""
    clone = tmp_path / "x"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (tmp_path / "shared").exists()
    env = {
        **os.environ,
        "PYTHONPATH": str(clone),  # the clone's code, not this checkout's
        "CXR_DEMO_DIR": str(tmp_path / "demo"),
        "HOME": str(tmp_path),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    demo = subprocess.run(
        [sys.executable, str(clone / "scripts" / "demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=clone,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "sent 1, warnings 0, failed 0" in demo.stdout
    tests = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/test_units.py",
            "tests/test_corpus.py",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=clone,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "needs" in tests.stdout and "corpus" in tests.stdout and "skipped" in tests.stdout
