"""``cxr-node check``: the pre-flight before ``serve``, one result per check.

Each check returns a :class:`Result` (OK, WARN or FAIL, what was found, and the fix); none
raises for what it finds. The weights are hashed, the spool probed (writable, free space, not
locked by a running node), the ports bound and released, the destination and the catch-up
peer C-ECHOed with the node's own AE titles. Nothing is changed but a probe file in the spool.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from node.core.config import NodeConfig, ReportConfig
from node.core.errors import NodeError

if TYPE_CHECKING:
    from node.net.scu import Peer

Level = Literal["OK", "WARN", "FAIL"]
# pydicom's root, the default of report.uid_root: fine for a test, not for a hospital's SRs
EXAMPLE_UID_ROOT = ReportConfig().uid_root


@dataclass(frozen=True)
class Result:
    level: Level
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level:<4} {self.name}: {self.detail}" + (
            f" -> fix: {self.fix}" if self.fix else ""
        )


def run_checks(cfg: NodeConfig, source: str) -> Iterator[Result]:
    """Every check, in the order an operator fixes things; ``source``: where the config
    came from (shown in the first line)."""
    yield Result("OK", "config", f"{source} is valid")
    yield check_uid_root(cfg)
    yield check_weights(cfg)
    yield check_spool(cfg)
    yield check_port("SCP port", cfg.scp.bind_address, cfg.scp.port, "scp.bind_address, scp.port")
    if cfg.metrics.enabled:
        yield check_port("metrics port", cfg.metrics.bind_address, cfg.metrics.port, "metrics.port")
    network = check_fast_paths(cfg)
    yield network
    cfg = cfg.with_fast_paths(cfg.network.fast_paths and network.level == "OK")
    yield check_destination(cfg)
    if cfg.catchup.enabled:
        yield check_catchup_peer(cfg)


def check_uid_root(cfg: NodeConfig) -> Result:
    root = cfg.report.uid_root
    if root == EXAMPLE_UID_ROOT:
        return Result(
            "WARN",
            "uid root",
            f"report.uid_root {root} is the example root shared by everyone",
            "set report.uid_root to your organisation's registered UID root before go-live",
        )
    return Result("OK", "uid root", f"report.uid_root {root}")


def check_weights(cfg: NodeConfig) -> Result:
    from node.analysis.model import OFFICIAL_SHA256, expected_weights_path, sha256_file

    m = cfg.model
    try:
        path, url = expected_weights_path(m)
    except NodeError as exc:
        return Result("FAIL", "weights", str(exc), "fix model.weights_file")
    untrained: Level = "WARN" if m.allow_untrained else "FAIL"
    if not path.is_file():
        if m.allow_download:
            return Result(
                "WARN",
                "weights",
                f"{path} missing: serve will try to download it",
                f"without internet access, download {url} elsewhere and copy it there",
            )
        return Result(
            untrained,
            "weights",
            f"{path} missing" + (": serve runs UNTRAINED" if m.allow_untrained else ""),
            f"download {url} and copy it to {path} (or set model.cache_dir/weights_file)",
        )
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return Result("FAIL", "weights", f"cannot read {path}: {exc}", "fix its permissions")
    if digest == OFFICIAL_SHA256[m.weights]:
        return Result("OK", "weights", f"{path} SHA-256 {digest} (the published file)")
    return Result(
        untrained,
        "weights",
        f"{path} SHA-256 {digest} is not the published {OFFICIAL_SHA256[m.weights]}"
        + (": serve runs it UNTRAINED" if m.allow_untrained else ": serve refuses it"),
        f"replace it with the file from {url}",
    )


def check_spool(cfg: NodeConfig) -> Result:
    from node.store.spool import lock_holder

    root = cfg.spool.directory
    folder = root if root.exists() else _existing_parent(root)
    if not os.access(folder, os.W_OK | os.X_OK) or not folder.is_dir():
        return Result(
            "FAIL",
            "spool",
            f"{folder} is not a writable folder" + ("" if folder == root else f" (for {root})"),
            "create spool.directory, owned by the node's user (install-host.sh does)",
        )
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".check-"):
            pass
    except OSError as exc:
        return Result("FAIL", "spool", f"cannot write in {folder}: {exc}", "fix its permissions")
    free_mb = shutil.disk_usage(folder).free // 2**20
    floor = cfg.spool.min_free_mb
    if free_mb < floor:
        return Result(
            "FAIL",
            "spool",
            f"{free_mb} MiB free at {folder}, below spool.min_free_mb ({floor} MiB): every "
            "C-STORE would be refused",
            "free disk space or move spool.directory",
        )
    holder = lock_holder(root)
    if holder is not None:
        return Result(
            "FAIL",
            "spool",
            f"{root} is in use by a running cxr-node (pid {holder})",
            "stop it first, or give this config its own spool.directory",
        )
    return Result("OK", "spool", f"{root} writable, {free_mb} MiB free (floor {floor} MiB)")


def _existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def check_port(name: str, address: str, port: int, keys: str) -> Result:
    if port == 0:
        return Result("OK", name, f"{address}:0 (any free port)")
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the node binds
        try:
            s.bind((address, port))
        except OSError as exc:
            return Result(
                "FAIL",
                name,
                f"cannot listen on {address}:{port}: {exc.strerror or exc}",
                f"another cxr-node or program holds it (`ss -ltnp 'sport = :{port}'`), or "
                f"change {keys}",
            )
    return Result("OK", name, f"{address}:{port} free")


def check_fast_paths(cfg: NodeConfig) -> Result:
    """Whether ``network.fast_paths`` can be used with the installed pynetdicom."""
    from node.net.fast.fastpaths import TESTED, problems, version

    name = "network fast paths"
    if not cfg.network.fast_paths:
        return Result("OK", name, "off (network.fast_paths = false): stock pynetdicom")
    found = problems()
    if not found:
        return Result("OK", name, f"on (pynetdicom {version()})")
    return Result(
        "WARN",
        name,
        f"off, stock pynetdicom used: pynetdicom {version()}: {'; '.join(found)}",
        f"install pynetdicom {TESTED}.x (pip install 'pynetdicom=={TESTED}.*'), "
        "or set network.fast_paths = false",
    )


def check_destination(cfg: NodeConfig) -> Result:
    d = cfg.destination
    return _echo(
        "destination",
        lambda: _destination_peer(cfg),
        "destination.host, port, ae_title; the PACS must know calling AE "
        f"{d.calling_ae_title} (destination.calling_ae_title)",
    )


def check_catchup_peer(cfg: NodeConfig) -> Result:
    from node.jobs.catchup import qr_peer

    return _echo(
        "catch-up peer",
        lambda: qr_peer(cfg),
        "catchup.host, port, ae_title, calling_ae_title (default: the destination's); "
        "or catchup.enabled = false",
    )


def _destination_peer(cfg: NodeConfig) -> Peer:
    from node.net.scu import Peer, client_ssl_context

    d = cfg.destination
    tls = client_ssl_context(d.tls_ca_file, d.tls_cert_file, d.tls_key_file) if d.tls else None
    return Peer(
        d.host, d.port, d.ae_title, d.calling_ae_title, d.timeout, tls, cfg.network.fast_paths
    )


def _echo(name: str, make_peer: Callable[[], Peer], keys: str) -> Result:
    from node.net.scu import echo

    try:
        peer = make_peer()
        echo(peer)
    except (NodeError, OSError) as exc:  # OSError: a TLS file that cannot be read
        return Result("FAIL", name, f"C-ECHO: {exc}", f"check {keys}")
    return Result(
        "OK",
        name,
        f"C-ECHO {peer.calling_ae_title} -> {peer.ae_title}@{peer.host}:{peer.port} answered",
    )
