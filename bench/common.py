"""Shared bench helpers: peers on loopback, generated images, timing, results."""

from __future__ import annotations

import base64
import copy
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NIH = ROOT / "tests" / "data" / "nih_cxr_dx.dcm"
ORTHANC = "/usr/sbin/Orthanc"
NODELAY = {**os.environ, "TCP_NODELAY": "1"}
WEIGHTS_NAME = (
    "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15"
    "-seed0-best.pt"
)

# loopback peers only: never through an HTTP(S)_PROXY from the environment
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(every)
    raise RuntimeError(f"timed out waiting for {what}")


def make_images(n: int, out: Path, seed: str, study_size: int = 50) -> list[Path]:
    """``n`` copies of the 1 MB NIH radiograph with new UIDs (one study per ``study_size``
    images)."""
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(NIH)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            entropy_srcs=[seed, str(i)]
        )
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[seed, "study", str(i // study_size)])
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Orthanc:
    """The repo's orthanc.json on free ports. ``lua``: True for the repo's routing script, or
    the path of another script; ``settings``: keys that replace orthanc.json's."""

    def __init__(
        self,
        workdir: Path,
        node_port: int | None = None,
        lua: bool | Path = False,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.http, self.dicom = free_port(), free_port()
        cfg = json.loads((ROOT / "orthanc.json").read_text())
        script = ROOT / "config" / "route-to-node.lua" if lua is True else lua
        cfg.update(settings or {})
        cfg.update(
            StorageDirectory=str(workdir / "db"),
            IndexDirectory=str(workdir / "db"),
            HttpPort=self.http,
            DicomPort=self.dicom,
            LuaScripts=[str(script)] if script else [],
        )
        cfg["DicomModalities"]["cxr-node"].update(Host="127.0.0.1", Port=node_port or 1)
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "orthanc.log"
        (workdir / "orthanc.json").write_text(json.dumps(cfg))
        env = {**NODELAY, "ORTHANC_USER": "bench", "ORTHANC_PASSWORD": "bench"}
        self.proc = subprocess.Popen(
            [ORTHANC, str(workdir / "orthanc.json")],
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.auth = base64.b64encode(b"bench:bench").decode()
        wait_for(lambda: self.get("/system"), 60, "Orthanc")

    def request(self, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}{path}",
            data=data,
            headers={"Authorization": f"Basic {self.auth}"},
        )
        with _LOCAL.open(req, timeout=30) as rsp:
            return bytes(rsp.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request(path))

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self.request(path, json.dumps(body).encode()))

    def count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


ENV_PREFIX, OMP = "CXR_NODE_", "OMP_WAIT_POLICY"
WAIT_POLICY_ENV = "CXR_NODE_MODEL__OMP_WAIT_POLICY"
MODEL_ENV = {key: f"CXR_NODE_MODEL__{key.upper()}" for key in ("trace", "channels_last", "streams")}
"""The model settings the inference bench reads from the environment, as the node would."""


def node_settings_env() -> dict[str, str]:
    """The node settings of the bench's own environment, passed on to the node processes
    for an A/B: every ``CXR_NODE_*`` variable (e.g. ``CXR_NODE_MODEL__OMP_WAIT_POLICY``,
    ``CXR_NODE_REPORT__SUMMARY_IMAGE``) and ``OMP_WAIT_POLICY``; the bench's own wiring
    (ports, spool, weights) is set after them and wins."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX) or k == OMP}


def start_node(work: Path, dest_port: int, port: int) -> subprocess.Popen[bytes]:
    """``cxr-node serve`` (untrained model, spool in ``work``) sending SRs to ``dest_port``;
    returns once it listens."""
    ready = work / "node.ready"
    ready.unlink(missing_ok=True)
    env = {
        **NODELAY,
        **node_settings_env(),
        "CXR_NODE_SCP__PORT": str(port),
        "CXR_NODE_SCP__ALLOWED_CALLING_AETS": '["ORTHANC", "STORESCU"]',
        "CXR_NODE_DESTINATION__PORT": str(dest_port),
        "CXR_NODE_SPOOL__DIRECTORY": str(work / "spool"),
        "CXR_NODE_MODEL__CACHE_DIR": str(work / "models"),
        "CXR_NODE_MODEL__ALLOW_UNTRAINED": "true",
        "CXR_NODE_MODEL__ALLOW_DOWNLOAD": "false",
        "CXR_NODE_METRICS__PORT": "0",
        "CXR_NODE_LOGGING__LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node",
            "serve",
            "--config",
            str(ROOT / "config" / "node.toml"),
            "--ready-file",
            str(ready),
        ],
        env=env,
        stderr=(work / "node.log").open("ab"),
    )
    wait_for(lambda: ready.exists() or proc.poll() is not None, 120, "the node")
    assert proc.poll() is None, (work / "node.log").read_text()
    return proc


def settle(*outputs: Path) -> None:
    """Remove a measured run's output and write back the page cache, outside any timing,
    so that the next client does not pay for this one's 200 MB of dirty pages (with the
    outputs left in place, storescp fell from 632 to 141 img/s over four rounds)."""
    for path in outputs:
        shutil.rmtree(path, ignore_errors=True)
    os.sync()


@contextmanager
def orthanc(workdir: Path, **kw: Any) -> Iterator[Orthanc]:
    shutil.rmtree(workdir, ignore_errors=True)
    o = Orthanc(workdir, **kw)
    try:
        yield o
    finally:
        o.stop()
        settle(workdir)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
