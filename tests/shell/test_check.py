"""``cxr-node check``, run as an operator would (a subprocess), against dcmtk's storescp as
the PACS: one line per check, OK/WARN/FAIL with the fix, exit 0 only when nothing FAILs."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config
from helpers import WEIGHTS_NAME, free_port, storescp, wait_for

pytestmark = pytest.mark.integration
ORG_ROOT = "1.2.3.4.5."  # not the example root


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def lines(out: str) -> dict[str, str]:
    """check name -> its line."""
    found = {}
    for line in out.splitlines():
        level, _, rest = line.partition(" ")
        assert level in {"OK", "WARN", "FAIL"}, line
        found[rest.strip().partition(":")[0]] = line
    return found


@pytest.fixture
def pacs(tmp_path):
    port = free_port()
    proc = storescp(tmp_path / "pacs", port)
    wait_for(lambda: _listening(port), 10, "storescp")
    yield port
    proc.terminate()
    proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def config(tmp_path: Path, dest_port: int, **extra: dict[str, object]) -> Path:
    tmp_path.mkdir(exist_ok=True)
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    (weights / WEIGHTS_NAME).write_bytes(b"not the published file")
    sections: dict[str, dict[str, object]] = {
        "scp": {"port": free_port()},
        "destination": {"port": dest_port, "timeout": 5.0},
        "spool": {"directory": str(tmp_path / "spool"), "min_free_mb": 1},
        "model": {"cache_dir": str(weights), "allow_untrained": True, "allow_download": False},
        "metrics": {"port": free_port()},
        "report": {"uid_root": ORG_ROOT},
        "catchup": {"enabled": True},
    }
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    return write_config(tmp_path / "node.toml", sections)


def test_a_ready_host_passes_with_one_line_per_check(tmp_path, pacs):
    done = run_check(config(tmp_path, pacs))
    assert done.returncode == 0, done.stdout + done.stderr
    found = lines(done.stdout)
    assert list(found) == [
        "config",
        "uid root",
        "weights",
        "spool",
        "SCP port",
        "metrics port",
        "network fast paths",
        "destination",
        "catch-up peer",
    ]
    assert (
        found["destination"].startswith("OK")
        and f"ORTHANC@127.0.0.1:{pacs}" in (found["destination"])
    )
    assert "C-ECHO CXR_NODE -> ORTHANC" in found["catch-up peer"]
    # an unpublished weights file with allow_untrained: a warning, with its hash
    assert found["weights"].startswith("WARN") and "UNTRAINED" in found["weights"]
    assert "SHA-256 " in found["weights"] and "-> fix: replace it" in found["weights"]
    assert done.stderr == ""


def test_the_example_uid_root_is_a_warning(tmp_path, pacs):
    done = run_check(config(tmp_path, pacs, report={"uid_root": "1.2.826.0.1.3680043.8.498."}))
    assert done.returncode == 0
    assert lines(done.stdout)["uid root"].startswith("WARN")
    assert "your organisation's registered UID root" in done.stdout


def test_what_would_stop_serve_fails_each_on_its_line(tmp_path, node_factory):
    """A node already running on the config: its spool is locked and its port held; the
    destination does not answer; the weights file is not the published one."""
    dead = free_port()
    running = node_factory(dead, model=False)
    conf = config(
        tmp_path / "check",
        dead,
        scp={"port": running.port},
        spool={"directory": str(running.spool)},
        model={"allow_untrained": False},
    )
    done = run_check(conf)
    assert done.returncode == 1, done.stdout
    found = lines(done.stdout)
    assert found["spool"].startswith("FAIL")
    assert f"in use by a running cxr-node (pid {running.proc.pid})" in found["spool"]
    assert (
        found["SCP port"].startswith("FAIL") and f"127.0.0.1:{running.port}" in (found["SCP port"])
    )
    assert "change scp.bind_address, scp.port" in found["SCP port"]
    assert found["weights"].startswith("FAIL") and "serve refuses it" in found["weights"]
    for peer in ("destination", "catch-up peer"):
        assert found[peer].startswith("FAIL") and f"127.0.0.1:{dead}" in found[peer]
        assert "-> fix: check " in found[peer]
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr


def test_a_spool_below_its_floor_and_missing_weights_fail(tmp_path, pacs):
    conf = config(
        tmp_path,
        pacs,
        spool={"min_free_mb": 2**40},
        model={"cache_dir": str(tmp_path / "empty"), "allow_untrained": False},
    )
    done = run_check(conf)
    assert done.returncode == 1
    found = lines(done.stdout)
    assert found["spool"].startswith("FAIL") and "below spool.min_free_mb" in found["spool"]
    assert found["weights"].startswith("FAIL") and "missing" in found["weights"]
    assert "-> fix: download https://" in found["weights"]
    assert found["destination"].startswith("OK")


def test_an_invalid_config_is_one_fail_line(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text("[scp]\nprot = 104\n")
    done = run_check(conf)
    assert done.returncode == 1
    [line] = done.stdout.splitlines()
    assert line.startswith("FAIL config:") and "scp.prot" in line
    assert "Traceback" not in done.stderr
