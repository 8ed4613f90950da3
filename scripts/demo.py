"""make demo: a local Orthanc + the node on loopback, one chest X-ray pushed, its SR shown.

Runs from the repo root inside the project's venv (``make demo`` builds it). Orthanc and
dcmtk come from Debian packages: installed here when missing and running as root,
otherwise the script says what to install. Then it prints Orthanc Explorer's address and a
login and keeps both running until Enter or Ctrl-C, so the SR can be looked at in Orthanc
(``--no-wait``: stop at once, for CI). Every port is a free one.

    python scripts/demo.py [--image FILE.dcm] [--no-wait]
"""

from __future__ import annotations

import argparse
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
    """(the published weights are in torchxrayvision's cache, what to say): the same check
    as ``cxr-node check`` (no torch, no download: the demo never waits on the network)."""
    from node.check import check_weights
    from node.core.config import NodeConfig

    result = check_weights(NodeConfig(model={"allow_untrained": True, "allow_download": False}))
    if result.level == "OK":
        return True, result.detail
    return False, f"to run the real model, {result.fix}"


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
    headline: list[str] = []  # the SR's opening texts: the UNTRAINED warning, the summary

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
            elif it.ValueType == "TEXT" and it.RelationshipType == "CONTAINS":
                headline.append(f"{name}: {it.TextValue}")
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    print(
        f"\nSR {sr.SOPInstanceUID}\n  study  {sr.StudyInstanceUID}\n  series {sr.SeriesDescription}"
    )
    print(f"  algorithm: {algo}")
    for line in headline:
        print(f"  {line}")
    print()
    print(f"  {'finding':<28} {'score':>6}  label")
    for name, (score, label) in rows.items():
        print(f"  {name:<28} {score:>6}  {label}")
    print("\n  score: torchxrayvision output, 0.5 = the model's operating threshold")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, default=IMAGE, help=f"DICOM file to push ({IMAGE.name})")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="stop Orthanc and the node as soon as the SR is shown (CI)",
    )
    return p.parse_args(argv)


def orthanc_config(http: int, dicom: int, node_port: int) -> dict[str, object]:
    """The repo's orthanc.json on loopback, free ports, the demo's folder, the repo's Lua."""
    cfg: dict[str, object] = json.loads((ROOT / "orthanc.json").read_text())
    lua = [str(ROOT / "config" / Path(p).name) for p in cfg["LuaScripts"]]  # type: ignore[attr-defined]
    cfg.update(
        StorageDirectory=str(DEMO / "orthanc-db"),
        IndexDirectory=str(DEMO / "orthanc-db"),
        HttpPort=http,
        DicomPort=dicom,
        RemoteAccessAllowed=False,
        LuaScripts=lua,
    )
    cfg["DicomModalities"]["cxr-node"].update(Host="127.0.0.1", Port=node_port)  # type: ignore[index]
    return cfg


def start(argv: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=(DEMO / log).open("wb"), stderr=subprocess.STDOUT)


def wait_for_enter() -> None:
    say("press Enter (or Ctrl-C) to stop Orthanc and the node")
    try:
        input()
    except EOFError:  # no terminal: nothing to wait for
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.image.is_file():
        sys.exit(f"[demo] image not found: {args.image}")
    ensure_orthanc()
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir(parents=True)
    trained, why = weights_state()
    if trained:
        say(f"model: {why}")
    else:
        say("running an UNTRAINED model - results are NOT FOR CLINICAL USE")
        say(why)
    http, dicom, node_port, metrics = free_port(), free_port(), free_port(), free_port()
    (DEMO / "orthanc.json").write_text(json.dumps(orthanc_config(http, dicom, node_port), indent=2))
    password = secrets.token_urlsafe(12)
    auth = base64.b64encode(f"demo:{password}".encode()).decode()
    env = {**os.environ, "TCP_NODELAY": "1", "ORTHANC_USER": "demo", "ORTHANC_PASSWORD": password}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        say(f"starting Orthanc (HTTP {http}, DICOM {dicom}) ...")
        procs.append(start([str(ORTHANC), str(DEMO / "orthanc.json")], env, "orthanc.log"))
        wait(lambda: rest(http, auth, "/system"), 30, "Orthanc")
        node_env = {
            **os.environ,
            "CXR_NODE_SCP__PORT": str(node_port),
            "CXR_NODE_DESTINATION__PORT": str(dicom),
            "CXR_NODE_SPOOL__DIRECTORY": str(DEMO / "spool"),
            "CXR_NODE_METRICS__PORT": str(metrics),
            "CXR_NODE_MODEL__ALLOW_UNTRAINED": "false" if trained else "true",
            "CXR_NODE_MODEL__ALLOW_DOWNLOAD": "false",
        }
        say(f"starting cxr-node (DICOM {node_port}, metrics {metrics}) ...")
        ready = DEMO / "node.ready"
        node = [
            sys.executable,
            "-m",
            "node",
            "serve",
            "--config",
            str(ROOT / "config" / "node.toml"),
        ]
        procs.append(start([*node, "--ready-file", str(ready)], node_env, "node.log"))
        wait(lambda: procs[-1].poll() is not None or ready.exists(), 120, "the node")
        if procs[-1].poll() is not None:
            sys.exit(f"[demo] the node stopped:\n{(DEMO / 'node.log').read_text()}")
        say(f"pushing {args.image.name} to Orthanc with C-STORE (cxr-node push) ...")
        push = [sys.executable, "-m", "node", "push", str(args.image), "--port", str(dicom)]
        sent = subprocess.run(
            [*push, "--aet", "ORTHANC", "--calling-aet", "DEMO_PUSH"], check=False
        )
        if sent.returncode != 0:
            sys.exit(f"[demo] {args.image} was not sent (see the line above); logs in {DEMO}")
        say("Orthanc routes it to the node (Lua); waiting for the SR to come back ...")
        query = {"Level": "Instance", "Query": {"Modality": "SR"}}
        ids = wait(lambda: json.loads(rest(http, auth, "/tools/find", query)), 120, "the SR")
        show_findings(rest(http, auth, f"/instances/{ids[0]}/file"))
        say(f"Orthanc Explorer: http://127.0.0.1:{http}/app/explorer.html")
        say(f"login: demo / {password}")
        say(f"metrics: http://127.0.0.1:{metrics}/metrics; logs and data in {DEMO}")
        if not args.no_wait:
            wait_for_enter()
        return 0
    except KeyboardInterrupt:
        return 0  # Ctrl-C: the way to stop it
    finally:
        say("stopping Orthanc and the node ...")
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    raise SystemExit(main())
