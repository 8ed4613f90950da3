"""The operator's side of echo, push and the configuration, run as a user would (the real
command in a subprocess): --config read by echo and push, defaults shown in --help,
association failures in words with host:port and both AE titles, config errors in one line
naming the key and its source, relative paths taken from the config file's folder, and a
dry run that lists what it would send."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ACRNEMA, NIH, ROOT, closed_port, fast_paths, free_port
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from node.cli import PEER_DEFAULTS, build_parser
from node.core.config import DestinationConfig, ScpConfig, load_config
from node.core.errors import ConfigError, Unreachable
from node.dicom.assocwords import connect_failure
from node.net.scp import start_server
from node.net.scu import Peer, echo
from node.store.spool import Spool

VERIFICATION = "1.2.840.10008.1.1"


def cli(
    *args: str, cwd: Path = ROOT, entry: tuple[str, ...] = ("-m", "node"), **env: str
) -> subprocess.CompletedProcess[str]:
    """``cxr-node ARGS`` in a fresh process, with no CXR_NODE_ variable but ``env``'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CXR_NODE_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(ROOT), clean.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *entry, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={**clean, **env},
    )


@pytest.fixture
def pacs() -> Iterator[int]:
    """A peer called PACS_X that takes calls from NODE_Y and CXR_PUSH only: C-ECHO and
    C-STORE of anything (stored nowhere)."""
    ae = AE(ae_title="PACS_X")
    ae.require_called_aet = True
    ae.require_calling_aet = ["NODE_Y", "CXR_PUSH"]
    ae.add_supported_context(VERIFICATION)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax)
    handlers = [(evt.EVT_C_STORE, lambda _event: 0x0000)]
    server: ThreadedAssociationServer = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=handlers
    )
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def node_toml(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    path.write_text(text)
    return path


def destination(folder: Path, port: int) -> Path:
    return node_toml(
        folder,
        f'[destination]\nhost = "127.0.0.1"\nport = {port}\nae_title = "PACS_X"\n'
        'calling_ae_title = "NODE_Y"\ntimeout = 5\n',
    )


# -- echo and push read --config ------------------------------------------------------------
def test_echo_goes_to_the_configured_destination_with_its_ae_titles(pacs, tmp_path):
    done = cli("echo", "--config", str(destination(tmp_path, pacs)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"C-ECHO PACS_X@127.0.0.1:{pacs} (calling AE NODE_Y): success\n"


def test_echo_flags_override_the_config_and_the_environment_overrides_the_file(pacs, tmp_path):
    config = destination(tmp_path, free_port())  # nothing there
    refused = cli("echo", "--config", str(config))
    assert refused.returncode == 2
    assert "connection refused by 127.0.0.1:" in refused.stderr
    done = cli("echo", "--config", str(config), "--port", str(pacs))
    assert done.returncode == 0 and f"PACS_X@127.0.0.1:{pacs}" in done.stdout
    env = cli("echo", "--config", str(config), CXR_NODE_DESTINATION__PORT=str(pacs))
    assert env.returncode == 0 and f":{pacs} (calling AE NODE_Y)" in env.stdout


def test_echo_checks_only_the_destination_and_names_its_errors(pacs, tmp_path):
    """A key only serve uses does not fail echo (a healthcheck); the destination's do."""
    config = destination(tmp_path, pacs)
    config.write_text(config.read_text() + "[tls]\nenabled = true\n")  # no cert files
    done = cli("echo", "--config", str(config))
    assert done.returncode == 0, done.stderr
    bad = cli("echo", "--config", str(config), CXR_NODE_DESTINATION__PORT="x")
    assert bad.returncode == 2
    assert bad.stderr == (
        "cxr-node echo: error: CXR_NODE_DESTINATION__PORT='x': destination.port: not an integer\n"
    )


def test_push_sends_to_the_configured_destination(pacs, tmp_path):
    done = cli("push", str(NIH), "--config", str(destination(tmp_path, pacs)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("sent 1, warnings 0, failed 0, skipped 0")


def test_push_reads_the_destination_tls_settings(tmp_path):
    """[destination] tls = true with a CA file that is not there: push tries TLS with it."""
    config = node_toml(
        tmp_path,
        f'[destination]\nport = {free_port()}\ntls = true\ntls_ca_file = "missing-ca.pem"\n',
    )
    done = cli("push", str(NIH), "--config", str(config))
    assert done.returncode != 0
    assert str(tmp_path / "missing-ca.pem") in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_help_shows_the_defaults_and_every_option_has_help():
    echo_help = " ".join(cli("echo", "--help").stdout.split())
    assert "(default: destination.host from --config, else 127.0.0.1)" in echo_help
    assert "else 4242)" in echo_help and "else ORTHANC)" in echo_help
    assert "exit codes:" in echo_help
    push_help = " ".join(cli("push", "--help").stdout.split())
    assert "(default: CXR_PUSH" in push_help and "exit codes:" in push_help
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"cxr-node {name} {action.option_strings or action.dest}"


def test_the_peer_defaults_are_the_destination_defaults():
    d = DestinationConfig()
    assert PEER_DEFAULTS == {
        "host": d.host,
        "port": d.port,
        "ae_title": d.ae_title,
        "calling_ae_title": d.calling_ae_title,
        "timeout": d.timeout,
    }


# -- association failures in words ------------------------------------------------------------
@pytest.fixture
def node_scp(tmp_path) -> Iterator[int]:
    spool = Spool(tmp_path / "spool", fsync=False)
    server = start_server(
        ScpConfig(port=0, allowed_calling_aets=("CXR_PUSH",)), spool, fast_paths=fast_paths()
    )
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        spool.close()


def test_a_wrong_called_ae_is_told_with_the_reason_and_both_titles(node_scp, caplog):
    caplog.set_level(logging.WARNING, logger="node.net.scp")
    done = cli("echo", "--port", str(node_scp), "--aet", "WRONG_AE", "--calling-aet", "CXR_PUSH")
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "rejected (permanent) by the service user: called AE title not recognised" in line
    assert "calling AE CXR_PUSH, called AE WRONG_AE" in line
    assert "\n" not in line and "Traceback" not in line
    # the node's log: the same words, both titles, and its own
    assert "called AE title not recognised (calling AE CXR_PUSH, called AE WRONG_AE; " in (
        caplog.text
    )
    assert "we are CXR_NODE" in caplog.text


def test_an_unknown_calling_ae_is_told_by_push_with_the_reason(node_scp, caplog):
    caplog.set_level(logging.WARNING, logger="node.net.scp")
    done = cli(
        "push", str(NIH), "--port", str(node_scp), "--aet", "CXR_NODE", "--calling-aet", "EVIL"
    )
    assert done.returncode == 1
    assert "rejected (permanent) by the service user: calling AE title not recognised" in (
        done.stdout
    )
    assert "calling AE EVIL, called AE CXR_NODE" in done.stdout
    assert "calling AE EVIL, called AE CXR_NODE; we are CXR_NODE" in caplog.text


def test_a_closed_port_is_connection_refused_with_host_and_port():
    with closed_port() as port:
        _refused(port)


def _refused(port: int) -> None:
    done = cli("push", str(NIH), "--port", str(port))
    assert done.returncode == 1
    assert f"connection refused by 127.0.0.1:{port}" in done.stdout
    echoed = cli("echo", "--port", str(port))
    assert echoed.returncode == 2
    assert f"connection refused by 127.0.0.1:{port}" in echoed.stderr
    assert "pynetdicom" not in echoed.stderr  # the library's own lines are not repeated


def test_a_peer_that_closes_the_connection_is_an_abort_with_host_and_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def close_each() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                conn.recv(1)
                conn.close()

        closer = threading.Thread(target=close_each, daemon=True)
        closer.start()
        with pytest.raises(Unreachable, match=f"association aborted by 127.0.0.1:{port}"):
            echo(Peer("127.0.0.1", port, "ANY", timeout=5, fast_paths=fast_paths()))


def test_a_peer_that_never_answers_the_request_is_a_timeout_with_host_and_port():
    with socket.socket() as listener:  # the kernel accepts; nobody reads
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        done = cli("echo", "--port", str(port), "--timeout", "0.5")
    assert done.returncode == 2
    expected = f"no answer to the association request from 127.0.0.1:{port} within 0.5 s"
    assert expected in done.stderr


def test_connection_failures_in_words():
    assert connect_failure(TimeoutError(), "10.0.0.5:104", 30.0).startswith(
        "no answer from 10.0.0.5:104 within 30 s"
    )
    refused = ConnectionRefusedError(111, "Connection refused")
    assert connect_failure(refused, "127.0.0.1:4243", 30.0).startswith(
        "connection refused by 127.0.0.1:4243"
    )


def test_an_unknown_host_name_is_said():
    with pytest.raises(Unreachable, match=r"cannot resolve the host name 'no-such-host\.invalid'"):
        echo(Peer("no-such-host.invalid", 104, "ANY", timeout=2, fast_paths=fast_paths()))


# -- configuration errors and paths -----------------------------------------------------------
def test_an_environment_error_names_the_variable_without_library_boilerplate(tmp_path):
    config = node_toml(tmp_path, "[scp]\nport = 104\n")
    done = cli("status", "--config", str(config), CXR_NODE_SCP__PORT="abc")
    assert done.returncode == 2
    assert (
        done.stderr
        == "cxr-node status: error: CXR_NODE_SCP__PORT='abc': scp.port: not an integer\n"
    )


def test_a_file_error_names_the_file_and_the_key(tmp_path):
    config = node_toml(tmp_path, '[scp]\nport = 70000\nprot = 1\n[model]\ndevice = "tpu"\n')
    done = cli("status", "--config", str(config))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert f"{config}: scp.port = 70000: must be at most 65535" in lines[0]
    assert f"{config}: scp.prot = 1: unknown key (config/node.toml lists them all)" in lines
    assert f"{config}: model.device = 'tpu': must be 'auto', 'cpu' or 'cuda'" in lines
    assert "pydantic" not in done.stderr and "http" not in done.stderr


def test_a_command_line_error_says_so():
    with pytest.raises(ConfigError) as failed:
        load_config(None, {}, {"scp.port": 70000})
    assert str(failed.value) == "command line: scp.port = 70000: must be at most 65535"


def test_relative_paths_in_the_file_are_taken_from_its_folder(tmp_path):
    config = node_toml(
        tmp_path / "etc",
        '[spool]\ndirectory = "var/spool"\n[report]\njson_dir = "../results"\n'
        '[model]\ncache_dir = "~/models"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = cli("status", "--config", str(config), cwd=elsewhere)
    assert f"node: never started with spool {tmp_path / 'etc' / 'var' / 'spool'}\n" in done.stdout
    cfg = load_config(config, {})
    assert cfg.report.json_dir == tmp_path / "etc" / ".." / "results"
    assert str(cfg.model.cache_dir) == "~/models"  # expanded by its user, not anchored
    # the environment's (and the command line's) stay relative: the current directory's
    env = load_config(config, {"CXR_NODE_SPOOL__DIRECTORY": "here/spool"})
    assert env.spool.directory == Path("here/spool")


def test_a_relative_config_path_anchors_its_paths_absolutely(tmp_path, monkeypatch):
    """`--config etc/node.toml`: the spool is where the file says, not where the command
    happens to run later (a path kept relative would move with the current directory)."""
    node_toml(tmp_path / "etc", '[spool]\ndirectory = "var/spool"\n')
    monkeypatch.chdir(tmp_path)
    directory = load_config(Path("etc/node.toml"), {}).spool.directory
    assert directory == tmp_path / "etc" / "var" / "spool"


# -- push --dry-run ---------------------------------------------------------------------------
def test_push_imports_pydantic_only_to_read_a_configuration():
    """No --config, no CXR_NODE_ variable: push starts without pydantic (~0.15 s) and
    pydantic-settings; with a variable, pydantic-settings reads it."""
    code = (
        "import sys; from node.cli import main; rc = main(sys.argv[1:]); "
        "print('loaded:', *(m for m in ('pydantic', 'pydantic_settings') if m in sys.modules))"
    )
    push = ("push", str(NIH), "--dry-run")
    bare = cli(*push, entry=("-c", code))
    assert bare.stdout.splitlines()[-1] == "loaded:", bare.stdout + bare.stderr
    configured = cli(*push, entry=("-c", code), CXR_NODE_DESTINATION__PORT="4243")
    assert configured.stdout.splitlines()[-1] == "loaded: pydantic pydantic_settings"


def test_a_dry_run_lists_each_object_and_names_skipped_files(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.dcm").write_bytes(NIH.read_bytes())
    (tmp_path / "in" / "sub" / "b.dcm").write_bytes(ACRNEMA.read_bytes())
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    done = cli("push", str(tmp_path / "in"), "--dry-run", "--port", str(free_port()))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert (
        f"would send: {tmp_path / 'in' / 'a.dcm'}: Secondary Capture Image Storage 1." in (lines[0])
    )
    assert lines[1].startswith(
        f"would send: {tmp_path / 'in' / 'sub' / 'b.dcm'}: Computed Radiography Image Storage 1."
    )
    assert "dry run, nothing sent: would send 2, would fail 0, skipped 1" in lines
    assert f"  skipped (not DICOM): {tmp_path / 'in' / 'notes.txt'}" in lines


def test_nothing_to_send_is_a_failure(tmp_path):
    (tmp_path / "notes.txt").write_text("not DICOM")
    done = cli("push", str(tmp_path), "--dry-run")
    assert done.returncode == 1
    assert "nothing would be sent: no DICOM object found in the paths given" in done.stdout
    sent = cli("push", str(tmp_path), "--port", str(free_port()))
    assert sent.returncode == 1 and "nothing sent: no DICOM object found" in sent.stdout


# -- README -----------------------------------------------------------------------------------
def test_readme_names_the_real_keys_and_every_command():
    text = (ROOT / "README.md").read_text()
    assert "worker.batch_size" not in text and "model.batch_size" in text
    for command in ("cxr-node status", "cxr-node jobs purge", "cxr-node echo --config"):
        assert command in text, command
