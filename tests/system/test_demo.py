"""``make demo``'s script, run as a user would (work files in a temp dir)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest
from helpers import ROOT, http_status

pytestmark = pytest.mark.integration


def _env(tmp_path):
    return {
        **os.environ,
        "CXR_DEMO_DIR": str(tmp_path / "demo"),
        "HOME": str(tmp_path),  # no cached weights: the demo must say so and run untrained
        "HTTPS_PROXY": "http://127.0.0.1:9",  # and no download, even where there is internet
        "HTTP_PROXY": "http://127.0.0.1:9",
    }


def test_demo_pushes_the_image_shows_the_sr_and_keeps_orthanc_up_until_enter(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        env=_env(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    timer = threading.Timer(300, proc.kill)  # never hangs a CI run
    timer.start()
    out: list[str] = []
    try:
        for line in proc.stdout:
            out.append(line)
            if "press Enter" in line:
                break
        text = "".join(out)
        explorer = re.search(
            r"Orthanc Explorer: http://127\.0\.0\.1:(\d+)/app/explorer\.html", text
        )
        login = re.search(r"login: (\S+) / (\S+)", text)
        assert explorer and login, text
        port, auth = int(explorer[1]), (login[1], login[2])
        assert http_status(port, auth, "/app/explorer.html") == 200  # still up, login works
        rest, err = proc.communicate("\n", timeout=60)  # Enter
    finally:
        timer.cancel()
        proc.kill()
    text += rest
    assert proc.returncode == 0, text + err
    assert "running an UNTRAINED model - results are NOT FOR CLINICAL USE" in text
    assert "sent 1, warnings 0, failed 0" in text
    assert "UNTRAINED model: NOT FOR CLINICAL USE" in text  # the SR's own warning
    assert "AI findings above the operating threshold: " in text
    rows = [ln for ln in text.splitlines() if ln.rstrip().endswith(("Present", "Absent"))]
    assert len(rows) == 18
    # no raw library errors: no line left open on a colon, no urllib3/requests trace
    assert not [ln for ln in text.splitlines() if ln.rstrip().endswith("):")], text
    for noise in ("Traceback", "urllib3", "HTTPSConnectionPool", "Max retries"):
        assert noise not in text + err, noise
    ports = re.findall(r"(?:HTTP|DICOM|metrics) (\d+)", text)
    assert len(ports) == 4 and "9108" not in ports and "4242" not in ports, ports


def test_demo_names_a_missing_image_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--no-wait", "--image", "nope.dcm"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1 and done.stderr == "[demo] image not found: nope.dcm\n"


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
        [sys.executable, str(clone / "scripts" / "demo.py"), "--no-wait"],
        stdin=subprocess.DEVNULL,
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
            "tests/core/test_units.py",
            "tests/system/test_corpus.py",
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
