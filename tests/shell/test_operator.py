"""The operator's side of the CLI, run as a user would (real commands in subprocesses):
one spool per node, a busy port named, job listings with labelled columns and known states,
and no BrokenPipe traceback when a pipe closes early."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from helpers import ROOT, free_port

pytestmark = pytest.mark.integration
WRAPPER = ROOT / "tests" / "modelless_node.py"  # the real CLI, no torch: starts in ~1 s


@pytest.fixture
def running(node_factory):
    return node_factory(free_port(), entry=(str(WRAPPER),))


def _cli(config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WRAPPER), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_second_serve_on_the_same_spool_refuses_and_status_stays_truthful(running):
    second = _cli(running.config, "serve", "--port", str(free_port()))
    assert second.returncode == 2
    assert f"in use by another cxr-node (pid {running.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    status = running.cli("status")
    assert status.returncode == 0 and "node: running" in status.stdout


def test_serve_on_a_busy_port_names_the_key_and_the_port(node_factory, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(AssertionError) as failed:  # node_factory: it did not start
            node_factory(free_port(), port=port, entry=(str(WRAPPER),))
    text = str(failed.value)
    assert f"cannot listen on 127.0.0.1:{port} (scp.bind_address, scp.port)" in text
    assert "another cxr-node?" in text and "Traceback" not in text


def test_jobs_lists_labelled_columns_and_refuses_unknown_states(running):
    listing = running.cli("jobs")
    assert listing.returncode == 0
    header = listing.stdout.splitlines()[1]
    assert header.split("\t") == [
        "id",
        "state",
        "attempts",
        "next_retry",
        "sop_instance_uid",
        "sr_uid",
        "last_error",
    ]
    bogus = running.cli("jobs", "list", "--state", "bogus")
    assert bogus.returncode == 2 and "invalid choice: 'bogus'" in bogus.stderr
    assert "quarantined" in bogus.stderr


def test_a_pipe_closed_early_is_no_traceback(running):
    """`cxr-node status | head -1`: the reader is gone before the node writes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "status", "--config", str(running.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before it has written anything (it takes ~0.3 s to start)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141
