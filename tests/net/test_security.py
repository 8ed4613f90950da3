"""Security at the network edge: allow-lists, TLS, limits and hostile input."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from helpers import NIH, fast_paths, peer_associate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from node.core.config import ScpConfig, TlsConfig
from node.core.errors import SendError
from node.net.scp import StoreStatus, start_server
from node.net.scu import Peer, client_ssl_context, echo, store_datasets
from node.store.spool import Spool

pytestmark = pytest.mark.network
VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    servers = []
    spool = Spool(tmp_path / "spool", fsync=False)

    def start(tls: TlsConfig | None = None, **scp: object) -> int:
        cfg = ScpConfig(port=0, **{"allowed_calling_aets": ("ORTHANC",), **scp})
        server = start_server(cfg, spool, tls=tls, fast_paths=fast_paths())
        servers.append(server)
        return int(server.server_address[1])

    start.spool = spool  # type: ignore[attr-defined]
    yield start
    for s in servers:
        s.shutdown()


def server_tls(certs: Path) -> TlsConfig:
    """The SCP's TLS settings: the test server certificate, clients checked against the CA."""
    return TlsConfig(
        enabled=True,
        cert_file=certs / "server.pem",
        key_file=certs / "server.key",
        ca_file=certs / "ca.pem",
    )


def _assoc(port: int, calling: str, ssl_ctx=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(
        SecondaryCaptureImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    )
    tls = (ssl_ctx, "localhost") if ssl_ctx is not None else None
    return peer_associate(ae, "127.0.0.1", port, ae_title="CXR_NODE", tls_args=tls)


def test_unknown_calling_ae_rejected_with_reason_known_accepted(serve):
    port = serve()
    bad = _assoc(port, "INTRUDER")
    assert bad.is_rejected
    rsp = bad.acceptor.primitive
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, 0x03)
    good = _assoc(port, "ORTHANC")
    assert good.is_established
    good.release()


@pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk not installed")
def test_dcmtk_echoscu_with_unknown_calling_ae_is_rejected(serve):
    port = serve()
    env = {**os.environ, "TCP_NODELAY": "1"}

    def run(aet: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["echoscu", "-aet", aet, "-aec", "CXR_NODE", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )

    bad = run("INTRUDER")
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    assert run("ORTHANC").returncode == 0


def test_accept_any_switch_accepts_unknown_ae(serve):
    port = serve(accept_any_calling_aet=True)
    assoc = _assoc(port, "ANYONE")
    assert assoc.is_established
    assoc.release()


@pytest.mark.parametrize(("allowed", "ok"), [(("10.0.0.0/8",), False), (("127.0.0.0/8",), True)])
def test_source_host_allow_list(serve, allowed, ok):
    port = serve(allowed_hosts=allowed)
    assoc = _assoc(port, "ORTHANC")
    assert assoc.is_established is ok
    if ok:
        assoc.release()


def test_tls_echo_and_store_with_client_certificate(serve, certs):
    tls = server_tls(certs)
    port = serve(tls=tls)
    ctx = client_ssl_context(certs / "ca.pem", certs / "client.pem", certs / "client.key")
    peer = Peer("localhost", port, "CXR_NODE", "ORTHANC", 10.0, ctx, fast_paths=fast_paths())
    echo(peer)
    assert store_datasets(peer, [pydicom.dcmread(NIH)]) == 1
    assert len(serve.spool.jobs()) == 1


@pytest.mark.parametrize("client", ["none", "rogue", "plain-tcp"])
def test_tls_refuses_clients_without_the_right_certificate(serve, certs, client):
    tls = server_tls(certs)
    port = serve(tls=tls)
    if client == "plain-tcp":
        ctx = None
    elif client == "none":
        ctx = client_ssl_context(certs / "ca.pem")
    else:
        ctx = client_ssl_context(certs / "ca.pem", certs / "rogue.pem", certs / "rogue.key")
    peer = Peer("localhost", port, "CXR_NODE", "ORTHANC", 5.0, ctx, fast_paths=fast_paths())
    with pytest.raises(SendError):
        echo(peer)
    assert serve.spool.jobs() == []


@pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk not installed")
def test_dcmtk_tls_echo(serve, certs):
    tls = server_tls(certs)
    port = serve(tls=tls)
    base = ["echoscu", "-aet", "ORTHANC", "-aec", "CXR_NODE", "+cf", str(certs / "ca.pem")]
    env = {**os.environ, "TCP_NODELAY": "1"}
    ok = subprocess.run(
        [
            *base[:1],
            "+tls",
            str(certs / "client.key"),
            str(certs / "client.pem"),
            *base[1:],
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    anon = subprocess.run(
        [*base[:1], "+tla", *base[1:], "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert anon.returncode != 0


def test_dataset_over_the_size_limit_gets_a700(serve):
    port = serve(max_dataset_mb=1)  # the NIH file is just over 1 MiB
    assoc = _assoc(port, "ORTHANC")
    status = assoc.send_c_store(pydicom.dcmread(NIH))
    assoc.release()
    assert status.Status == StoreStatus.OUT_OF_RESOURCES
    assert serve.spool.jobs() == []


def test_raw_garbage_on_the_socket_does_not_hurt(serve):
    port = serve()
    for payload in (
        b"",
        b"\x00" * 10,
        b"\x01\x00" + b"\xff" * 64,
        os.urandom(4096),
        b"\x01\x00\x00\x00\xff\xff\xff\xff" + b"A" * 100,
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
    assoc = _assoc(port, "ORTHANC")
    assert assoc.is_established
    assoc.release()


def test_scp_config_refuses_empty_allow_list():
    from node.core.config import load_config
    from node.core.errors import ConfigError

    with pytest.raises(ConfigError, match="allowed_calling_aets is empty"):
        load_config(None, {"CXR_NODE_SCP__ALLOWED_CALLING_AETS": "[]"})
