"""make demo: a local Orthanc + the node on loopback, one chest X-ray pushed, its SR shown.

Runs from the repo root inside the project's venv (``make demo`` builds it). Orthanc and
dcmtk come from Debian packages: installed here when missing and running as root,
otherwise the script says what to install.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("CXR_DEMO_DIR", ROOT / "var" / "demo"))
IMAGE = ROOT / "tests" / "data" / "nih_cxr_dx.dcm"
ORTHANC = Path("/usr/sbin/Orthanc")

# loopback peers only: never through an HTTP(S)_PROXY from the environment
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_orthanc() -> None:
    if ORTHANC.exists():
        return
    if os.geteuid() != 0:
        sys.exit("[demo] Orthanc is not installed. Run: sudo apt-get install -y orthanc dcmtk")
    say("installing Orthanc and dcmtk with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "orthanc", "dcmtk"], check=True, env=env)


def weights_state() -> tuple[bool, str]:
    """(real weights available, explanation)."""
    from node.config import ModelConfig
    from node.errors import ModelError
    from node.model import load_classifier

    try:
        clf = load_classifier(ModelConfig())
    except ModelError as exc:
        return False, str(exc).splitlines()[0]
    return clf.info.trained, clf.info.name


def rest(port: int, auth: str, path: str, body: object | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers={"Authorization": f"Basic {auth}"},
    )
    with _LOCAL.open(req, timeout=10) as rsp:
        return rsp.read()  # type: ignore[no-any-return]


def wait(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"[demo] timed out waiting for {what}; logs are in {DEMO}")


def show_findings(sr_bytes: bytes) -> None:
    import pydicom

    sr = pydicom.dcmread(BytesIO(sr_bytes))
    rows: dict[str, list[str]] = {}
    algo = ""

    def walk(items):  # type: ignore[no-untyped-def]
        nonlocal algo
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning
            if it.ValueType == "NUM":
                rows.setdefault(name, ["", ""])[0] = (
                    f"{float(it.MeasuredValueSequence[0].NumericValue):.3f}"
                )
            elif it.ValueType == "CODE" and it.ConceptCodeSequence[0].CodeMeaning in (
                "Present",
                "Absent",
            ):
                rows.setdefault(name, ["", ""])[1] = it.ConceptCodeSequence[0].CodeMeaning
            elif it.ValueType == "TEXT" and name == "Algorithm Name":
                algo = it.TextValue
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    print(
        f"\nSR {sr.SOPInstanceUID}\n  study  {sr.StudyInstanceUID}\n  series {sr.SeriesDescription}"
    )
    print(f"  algorithm: {algo}\n")
    print(f"  {'finding':<28} {'score':>6}  label")
    for name, (score, label) in rows.items():
        print(f"  {name:<28} {score:>6}  {label}")
    print("\n  score: torchxrayvision output, 0.5 = the model's operating threshold")


def main() -> int:
    if not IMAGE.is_file():
        sys.exit(f"[demo] sample image not found: {IMAGE}")
    ensure_orthanc()
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir(parents=True)
    trained, why = weights_state()
    if trained:
        say(f"model: {why}")
    else:
        say(f"real weights unavailable ({why}):")
        say("running an UNTRAINED model - results are NOT FOR CLINICAL USE")
    http, dicom, node_port = free_port(), free_port(), free_port()
    cfg = json.loads((ROOT / "orthanc.json").read_text())
    cfg.update(
        StorageDirectory=str(DEMO / "orthanc-db"),
        IndexDirectory=str(DEMO / "orthanc-db"),
        HttpPort=http,
        DicomPort=dicom,
        RemoteAccessAllowed=False,
        LuaScripts=[str(ROOT / "config" / "route-to-node.lua")],
    )
    cfg["DicomModalities"]["cxr-node"].update(Host="127.0.0.1", Port=node_port)
    (DEMO / "orthanc.json").write_text(json.dumps(cfg, indent=2))
    password = secrets.token_urlsafe(12)
    auth = base64.b64encode(f"demo:{password}".encode()).decode()
    env = {
        **os.environ,
        "TCP_NODELAY": "1",
        "ORTHANC_USER": "demo",
        "ORTHANC_PASSWORD": password,
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        say(f"starting Orthanc (HTTP {http}, DICOM {dicom}) ...")
        procs.append(
            subprocess.Popen(
                [str(ORTHANC), str(DEMO / "orthanc.json")],
                env=env,
                stdout=(DEMO / "orthanc.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        wait(lambda: rest(http, auth, "/system"), 30, "Orthanc")
        node_env = {
            **os.environ,
            "CXR_NODE_SCP__PORT": str(node_port),
            "CXR_NODE_DESTINATION__PORT": str(dicom),
            "CXR_NODE_SPOOL__DIRECTORY": str(DEMO / "spool"),
            "CXR_NODE_MODEL__ALLOW_UNTRAINED": "false" if trained else "true",
        }
        say(f"starting cxr-node (DICOM {node_port}) ...")
        ready = DEMO / "node.ready"
        procs.append(
            subprocess.Popen(
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
                env=node_env,
                stdout=(DEMO / "node.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        wait(lambda: procs[-1].poll() is not None or ready.exists(), 120, "the node")
        if procs[-1].poll() is not None:
            sys.exit(f"[demo] the node stopped:\n{(DEMO / 'node.log').read_text()}")
        say(f"pushing {IMAGE.name} to Orthanc with C-STORE (cxr-node push) ...")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "node",
                "push",
                str(IMAGE),
                "--port",
                str(dicom),
                "--aet",
                "ORTHANC",
                "--calling-aet",
                "DEMO_PUSH",
            ],
            check=True,
        )
        say("Orthanc routes it to the node (Lua); waiting for the SR to come back ...")
        query = {"Level": "Instance", "Query": {"Modality": "SR"}}
        ids = wait(lambda: json.loads(rest(http, auth, "/tools/find", query)), 120, "the SR")
        show_findings(rest(http, auth, f"/instances/{ids[0]}/file"))
        say(f"done; logs and data in {DEMO}")
        return 0
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    raise SystemExit(main())
