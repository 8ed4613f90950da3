"""Shared fixtures: the test checkpoint, node configs, real Orthanc and node processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    _LOCAL,
    ACRNEMA,
    NIH,
    ROOT,
    WEIGHTS_NAME,
    OrthancRest,
    free_port,
    torch_threads_kept,
    wait_for,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.keywords:
            for tool in ("Orthanc", "storescu", "dciodvfy"):
                if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                    item.add_marker(pytest.mark.skip(reason=f"{tool} not installed"))


@pytest.fixture(autouse=True)
def _torch_threads_kept() -> Iterator[None]:
    """torch's intra-op threads are process-wide: a test whose worker starts the model's
    streams (one thread each) must not leave every later test of the process on one."""
    with torch_threads_kept():
        yield


@pytest.fixture(scope="session")
def shared_files() -> dict[str, Path]:
    for p in (NIH, ACRNEMA):
        assert p.is_file(), f"sample data missing from the repository: {p}"
    return {"nih": NIH, "acrnema": ACRNEMA}


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, server and client certificates (scripts/make-test-certs.sh)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(
        [str(ROOT / "scripts" / "make-test-certs.sh"), str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def _shared_dir(factory: pytest.TempPathFactory, name: str) -> tuple[Path, Path]:
    """A folder for what every test process of one run can share (``name``) and its lock
    file: under pytest-xdist, beside the workers' own temp folders; otherwise in this
    process's."""
    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return root / name, root / f"{name}.lock"


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained DenseNet saved exactly as torchxrayvision's weights file is, made once
    per run (the first xdist worker to need it writes it; the others wait and reuse it).

    Its classifier is rescaled so that outputs spread over (0, 1) instead of saturating
    and fall on both sides of the operating thresholds: a test comparing values or
    Present/Absent labels must be able to fail.
    """
    import fcntl

    d, lock = _shared_dir(tmp_path_factory, "weights")
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        if not (d / WEIGHTS_NAME).is_file():
            part = d.with_name(d.name + ".part")
            part.mkdir(exist_ok=True)
            _save_test_checkpoint(part / WEIGHTS_NAME)
            part.rename(d)
    return d


def _save_test_checkpoint(path: Path) -> None:
    import torch
    import torchxrayvision as xrv

    torch.manual_seed(1234)
    model = xrv.models.DenseNet(weights=None).eval()
    img = xrv.utils.read_xray_dcm(str(NIH))
    img = xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(img[None]))
    with torch.no_grad():
        logits = model.classifier(model.features2(torch.from_numpy(img)[None]))
        model.classifier.weight.mul_(2.0 / float(logits.abs().max()))
        model.classifier.bias.fill_(-3.0)  # some findings below their threshold, some above
    torch.save(model, path)


def write_config(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """:func:`stop_process` for several at once: each is sent SIGTERM first, so their
    shutdowns overlap instead of adding up."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        stop_process(proc, grace)


@dataclass
class Orthanc:
    proc: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    rest: OrthancRest
    log: Path

    def stop(self) -> None:
        stop_process(self.proc, 15)

    def sr_uids(self) -> list[str]:
        found = self.rest.post(
            "/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}, "Expand": True}
        )
        return [str(i["MainDicomTags"]["SOPInstanceUID"]) for i in found]


def repo_lua_scripts(cfg: dict[str, object]) -> list[str]:
    """orthanc.json's LuaScripts (/etc/orthanc/NAME in the container) as this repo's files."""
    names = [Path(str(p)).name for p in cfg["LuaScripts"]]  # type: ignore[attr-defined]
    return [str(ROOT / "config" / name) for name in names]


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[object]:
    """Start real Orthanc processes with the repo's orthanc.json (ports/paths/hosts overridden).

    ``start(node_port, dicom_port=None)``: a restart with the same ``dicom_port`` reuses the
    same storage, as a restarted PACS would.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def start(node_port: int, dicom_port: int | None = None) -> Orthanc:
        cfg = json.loads((ROOT / "orthanc.json").read_text())
        http, dicom = free_port(), dicom_port or free_port()
        store = tmp_path / "orthanc-db"
        cfg.update(
            StorageDirectory=str(store),
            IndexDirectory=str(store),
            HttpPort=http,
            DicomPort=dicom,
            LuaScripts=repo_lua_scripts(cfg),
        )
        cfg["DicomModalities"]["cxr-node"].update(Host="127.0.0.1", Port=node_port)
        conf = tmp_path / "orthanc.json"
        conf.write_text(json.dumps(cfg))
        env = {
            **os.environ,
            "TCP_NODELAY": "1",
            "ORTHANC_USER": "tester",
            "ORTHANC_PASSWORD": "test-pass",
        }
        log = tmp_path / "orthanc.log"
        proc = subprocess.Popen(
            ["/usr/sbin/Orthanc", str(conf)],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        rest = OrthancRest(http, "tester", "test-pass")
        wait_for(lambda: proc.poll() is not None or rest.alive(), 30, "Orthanc to start")
        assert proc.poll() is None, log.read_text()
        return Orthanc(proc, http, dicom, rest, log)

    yield start
    for p in procs:  # its storage is the test's: no clean stop to wait for (about 3.5 s)
        p.kill()
        p.wait(10)


@dataclass
class NodeProc:
    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    spool: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``cxr-node ARGS --config <this node's config>`` and capture its output."""
        return subprocess.run(
            [sys.executable, "-m", "node", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def status(self) -> dict[str, object]:
        return dict(json.loads((self.spool / "status.json").read_text()))

    def metrics(self) -> dict[str, float]:
        """Scrape /metrics: sample name with labels -> value."""
        port = self.status()["metrics_port"]
        with _LOCAL.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            text = rsp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def jobs(self) -> dict[str, int]:
        """Job counts by state, read from the spool's database (read-only)."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.spool / 'jobs.sqlite'}?mode=ro", uri=True)
        try:
            return dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        finally:
            db.close()


@pytest.fixture
def node_factory(tmp_path: Path, weights_dir: Path) -> Iterator[object]:
    """Start ``cxr-node serve`` as a real process with a config written for the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        dest_port: int,
        port: int | None = None,
        entry: tuple[str, ...] = ("-m", "node"),
        env: dict[str, str] | None = None,
        may_exit: bool = False,
        model: bool = True,
        **extra: dict[str, object],
    ) -> NodeProc:
        """``entry``: what follows ``python`` (a fault-injecting wrapper, say); ``may_exit``:
        the node may already have exited once it listened (it met a poison job); ``model``
        False: a stand-in classifier (tests/modelless_node.py) where the model is not what
        the test is about - the node starts in a second instead of several."""
        if not model and entry == ("-m", "node"):
            entry = (str(ROOT / "tests" / "modelless_node.py"),)
        port = port or free_port()
        spool = tmp_path / "spool"
        sections: dict[str, dict[str, object]] = {
            "scp": {
                "ae_title": "CXR_NODE",
                "port": port,
                "allowed_calling_aets": ["ORTHANC", "TESTSCU", "CXR_PUSH"],
            },
            "destination": {"ae_title": "ORTHANC", "port": dest_port, "timeout": 10.0},
            "spool": {"directory": str(spool), "min_free_mb": 1},
            "model": {
                "cache_dir": str(weights_dir),
                "allow_untrained": True,
                "allow_download": False,
                "threads": 2,
            },
            "worker": {"poll_interval": 0.05, "backoff_base": 0.2, "backoff_max": 2.0},
            "metrics": {"port": 0},
            "catchup": {"enabled": False},  # on where a test says so (tests/jobs/test_catchup.py)
            # a 3 MB Secondary Capture beside every SR: on where the test is about it
            # (tests/system/test_summary_orthanc.py; the worker and delivery tests cover it too)
            "report": {"summary_image": False},
        }
        for section, values in extra.items():
            sections.setdefault(section, {}).update(values)
        conf = write_config(tmp_path / "node.toml", sections)
        log = tmp_path / "node.log"
        ready = tmp_path / "node.ready"
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [
                sys.executable,
                *entry,
                "serve",
                "--config",
                str(conf),
                "--ready-file",
                str(ready),
            ],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, **(env or {})},
        )
        procs.append(proc)
        wait_for(lambda: proc.poll() is not None or ready.exists(), 60, "the node to listen")
        assert may_exit or proc.poll() is None, log.read_text()
        return NodeProc(proc, port, conf, spool, log)

    yield start
    stop_processes(procs, 20)


REPORTS: list[str] = []
"""Tables that tests want shown after the run (the corpus tier's outcome counts)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test's REPORTS travel in its report's user_properties: under pytest-xdist, from the
    worker that ran it to the process that prints the summary."""
    outcome = yield
    if call.when == "teardown" and REPORTS and os.environ.get("PYTEST_XDIST_WORKER"):
        outcome.get_result().user_properties.extend(("report", t) for t in REPORTS)
        REPORTS.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        REPORTS.extend(str(v) for k, v in report.user_properties if k == "report")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for text in REPORTS:
        terminalreporter.write_sep("-", "report")
        terminalreporter.write_line(text)
