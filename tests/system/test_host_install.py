"""The bare-metal deployment (deploy/, scripts/install-host.sh): the systemd unit checked by
``systemd-analyze verify`` and key by key, and the install run into a staging root up to a
node answering C-ECHO from the unit's own ExecStart line, and Orthanc letting in only the
generated login."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import site
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stop_process
from helpers import (
    ROOT,
    OrthancRest,
    free_port,
    http_status,
    move_orthanc,
    peer_associate,
    wait_for,
)
from pynetdicom import AE

from node.core.config import load_config

UNIT = ROOT / "deploy" / "cxr-node.service"
HOST_TOML = ROOT / "deploy" / "node.toml"
PREFIX = "/opt/cxr-node"


def unit_keys(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> its values, in order (systemd keys may repeat)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def one(keys: dict[str, list[str]], name: str) -> str:
    [value] = keys[name]
    return value


def test_the_unit_runs_hardened_as_its_own_user_and_stops_in_time():
    keys = unit_keys(UNIT.read_text())
    cfg = load_config(HOST_TOML, {})
    assert one(keys, "Service.User") == "cxr-node" and one(keys, "Service.Group") == "cxr-node"
    assert one(keys, "Service.Restart") == "on-failure"
    for key, want in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "StandardOutput": "journal",
        "StandardError": "journal",
        "UMask": "0077",
    }.items():
        assert one(keys, f"Service.{key}") == want, key
    # the only writable place holds the spool and the weights
    writable = Path(one(keys, "Service.ReadWritePaths"))
    assert writable == Path("/var/lib/cxr-node")
    for path in (cfg.spool.directory, cfg.model.cache_dir):
        assert path.is_absolute() and writable in path.parents, path
    # systemd's SIGKILL comes only after the node's own graceful stop had its time
    assert float(one(keys, "Service.TimeoutStopSec")) > cfg.worker.shutdown_timeout
    argv = shlex.split(one(keys, "Service.ExecStart"))
    assert argv[:2] == [f"{PREFIX}/venv/bin/cxr-node", "serve"]
    assert argv[argv.index("--config") + 1] == "/etc/cxr-node/node.toml"
    # the host's config: loopback, Orthanc's AE title admitted from loopback alone
    assert cfg.scp.bind_address == "127.0.0.1" and cfg.scp.allowed_hosts == ("127.0.0.1/32",)
    orthanc = json.loads((ROOT / "deploy" / "orthanc-host.json").read_text())
    node_entry = orthanc["DicomModalities"]["cxr-node"]
    assert (node_entry["Host"], node_entry["Port"], node_entry["AET"]) == (
        "127.0.0.1",
        cfg.scp.port,
        cfg.scp.ae_title,
    )
    assert (cfg.destination.port, cfg.destination.ae_title) == (
        orthanc["DicomPort"],
        orthanc["DicomAet"],
    )
    assert orthanc["DicomAet"] in cfg.scp.allowed_calling_aets


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    # verify checks that ExecStart's program exists: a stand-in at a temp path
    program = tmp_path / "cxr-node"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    unit = tmp_path / "cxr-node.service"
    unit.write_text(UNIT.read_text().replace(f"{PREFIX}/venv/bin/cxr-node", str(program)))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # an unknown or misplaced key is only a message on stderr, with exit status 0
    assert done.returncode == 0 and done.stderr == "", done.stderr


# -- the install, into a staging root -------------------------------------------------------
@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/install-host.sh of a copy of this checkout: pip builds the node where the
    script is (build/, *.egg-info), which must not be the checkout other tests read."""
    copy = tmp_path_factory.mktemp("src") / "cxr-node"
    skip = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "var", ".*cache")
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*skip, ".hypothesis"))
    return copy / "scripts" / "install-host.sh"


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, install: Path) -> Path:
    """scripts/install-host.sh --destdir ROOT. Offline: the venv it installs into is made
    beforehand, seeing this interpreter's packages (torch, pip, setuptools) through a .pth
    file, and pip runs with --no-index; the node itself is built from this checkout."""
    root = tmp_path_factory.mktemp("root")
    venv = root / PREFIX.lstrip("/") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    [packages] = list(venv.glob("lib/python3*/site-packages"))
    (packages / "parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_INSTALL_ARGS"] = "--no-index --no-build-isolation"
    (root / "etc" / "orthanc").mkdir(parents=True)
    (root / "etc" / "orthanc" / "orthanc.json").write_text("{}")  # Debian's, replaced
    done = subprocess.run(
        [str(install), "--destdir", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "staging root" in done.stdout and "Orthanc login: user cxr-admin" in done.stdout
    return root


def test_the_install_lays_out_the_host(staged, install):
    root = staged
    link = root / "usr/local/bin/cxr-node"
    assert os.readlink(link) == f"{PREFIX}/venv/bin/cxr-node"
    assert (root / "etc/systemd/system/cxr-node.service").read_text() == UNIT.read_text()
    assert (root / "etc/cxr-node/node.toml").read_text() == HOST_TOML.read_text()
    for folder in ("var/lib/cxr-node", "var/lib/cxr-node/spool", "var/lib/cxr-node/models"):
        assert stat.S_IMODE((root / folder).stat().st_mode) == 0o700, folder
    creds = root / "etc/orthanc/credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    [(user, password)] = json.loads(creds.read_text())["RegisteredUsers"].items()
    assert user == "cxr-admin" and len(password) >= 40
    assert (root / "etc/orthanc/orthanc.json.before-cxr-node").read_text() == "{}"
    # the venv runs the installed copy of the node, not this checkout
    where = subprocess.run(
        [
            str(root / PREFIX.lstrip("/") / "venv/bin/python"),
            "-c",
            "import node; print(node.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        cwd=root,
    )
    assert where.stdout.startswith(str(root)), where.stdout
    # a second run keeps the generated password and the operator's config
    again = subprocess.run(
        [str(install), "--destdir", str(root)],
        env={**os.environ, "PIP_INSTALL_ARGS": "--no-index --no-build-isolation"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(creds.read_text())["RegisteredUsers"][user] == password
    assert "node.toml exists: kept" in again.stdout


def _echo(port: int) -> bool:
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = peer_associate(ae, "127.0.0.1", port, ae_title="CXR_NODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status is not None and int(status.Status) == 0


def test_the_units_exec_start_runs_a_node_that_answers_c_echo(staged, tmp_path):
    root = staged
    keys = unit_keys((root / "etc/systemd/system/cxr-node.service").read_text())
    argv = [
        str(root) + a if a.startswith("/") else a
        for a in shlex.split(one(keys, "Service.ExecStart"))
    ]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for assignment in keys["Service.Environment"]:
        env.update(item.split("=", 1) for item in shlex.split(assignment))
    state = root / "var/lib/cxr-node"
    env.update(  # what the staging root moves, and what a test has not (weights, a PACS)
        CXR_NODE_SPOOL__DIRECTORY=str(state / "spool"),
        CXR_NODE_MODEL__CACHE_DIR=str(state / "models"),
        CXR_NODE_MODEL__ALLOW_UNTRAINED="true",
        CXR_NODE_SCP__PORT=str(port),
        CXR_NODE_METRICS__PORT="0",
        CXR_NODE_DESTINATION__PORT=str(free_port()),
        CXR_NODE_CATCHUP__ENABLED="false",
    )
    log = tmp_path / "node.log"
    proc = subprocess.Popen(
        argv, env=env, cwd=state, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: proc.poll() is not None or _echo(port), 120, "the node to answer")
        assert proc.poll() is None, log.read_text()
    finally:
        stop_process(proc, 45)
    assert proc.returncode == 0, log.read_text()  # SIGTERM: a graceful stop, exit 0


@pytest.mark.integration
def test_installed_orthanc_lets_in_the_generated_login_alone(staged, tmp_path):
    """Orthanc from the installed /etc/orthanc folder (every *.json in it merged, as
    Debian's orthanc.service runs it), paths and ports moved to the test's."""
    etc = staged / "etc/orthanc"
    conf = tmp_path / "orthanc"
    conf.mkdir()
    cfg = json.loads((etc / "orthanc.json").read_text())
    http = move_orthanc(cfg, tmp_path, etc)
    assert all(Path(p).is_file() for p in cfg["LuaScripts"])  # installed beside it
    (conf / "orthanc.json").write_text(json.dumps(cfg))
    shutil.copy(etc / "credentials.json", conf / "credentials.json")
    [(user, password)] = json.loads((etc / "credentials.json").read_text())[
        "RegisteredUsers"
    ].items()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORTHANC_")}
    log = tmp_path / "orthanc.log"
    proc = subprocess.Popen(
        ["/usr/sbin/Orthanc", str(conf)], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    try:
        good = OrthancRest(http, user, password)
        wait_for(lambda: proc.poll() is not None or good.alive(), 30, "Orthanc")
        assert proc.poll() is None, log.read_text()
        assert http_status(http, (user, password)) == 200
        assert http_status(http, None) == 401
        assert http_status(http, ("", "")) == 401  # no such user: nobody without the file
        assert http_status(http, (user, "wrong")) == 401
    finally:
        stop_process(proc, 10)
