"""Patient data on disk is the node's user's alone: the spool, jobs.sqlite (and its WAL), the
results JSON and the SR copies are 0600 in 0700 folders (``spool.umask``, applied by
``serve`` and ``classify``). The commands run with a stand-in classifier (no torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import stop_process, write_config
from helpers import NIH, ROOT, Recorder, Sender, chest_images, drain, free_port, wait_for

from node.core.config import load_config
from node.core.errors import ConfigError, Unreachable
from node.jobs.delivery import Delivery
from node.store.spool import Spool

WRAPPER = ROOT / "tests" / "modelless_node.py"
LOOSE = 0o022  # the usual login umask: files 0644, folders 0755


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """This process's umask set to 022 for the test, and put back after."""
    previous = os.umask(LOOSE)
    try:
        yield
    finally:
        os.umask(previous)


def modes(*roots: Path) -> dict[str, str]:
    """Every folder and file under ``roots`` (the roots too): path -> octal mode."""
    out = {}
    for root in roots:
        out[str(root)] = oct(root.stat().st_mode & 0o777)
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                out[str(path)] = oct(path.stat().st_mode & 0o777)
    return out


def private(found: dict[str, str]) -> dict[str, str]:
    """What ``found`` should be: folders 0700, files 0600."""
    return {p: oct(0o700 if Path(p).is_dir() else 0o600) for p in found}


def test_spool_umask_is_an_octal_string_that_leaves_the_owner_alone(tmp_path):
    assert load_config(None, {}).spool.umask == 0o077
    assert load_config(None, {"CXR_NODE_SPOOL__UMASK": "0027"}).spool.umask == 0o027
    conf = write_config(tmp_path / "c.toml", {"spool": {"umask": "077"}})
    assert load_config(conf, {}).spool.umask == 0o077
    for bad in (77, "77", "0o077", "0877", "0777", "0477", "00077"):
        conf = write_config(tmp_path / "c.toml", {"spool": {"umask": bad}})
        with pytest.raises(ConfigError, match="umask"):
            load_config(conf, {})


def test_spool_folders_are_0700_whatever_the_umask(tmp_path, loose_umask):
    spool = Spool(tmp_path / "var" / "spool", fsync=False)
    try:
        assert modes(spool.root) == {
            str(spool.root): oct(0o700),
            str(spool.incoming): oct(0o700),
            str(spool.images): oct(0o700),
            str(spool.reports): oct(0o700),
            str(spool.root / "jobs.sqlite"): oct(0o644),  # files: the umask's (022 here)
        } | {str(p): oct(0o644) for p in spool.root.glob("jobs.sqlite-*")}
    finally:
        spool.close()


def test_spool_and_worker_in_process_with_the_configured_umask(tmp_path, loose_umask):
    from modelless_node import INFO, StandIn

    from node.jobs.worker import Worker

    json_dir, sr_dir = tmp_path / "out" / "json", tmp_path / "out" / "SR"
    cfg = load_config(
        None,
        {
            "CXR_NODE_SPOOL__DIRECTORY": str(tmp_path / "spool"),
            "CXR_NODE_REPORT__JSON_DIR": str(json_dir),
            "CXR_NODE_REPORT__SR_DIR": str(sr_dir),
        },
    )
    os.umask(cfg.spool.umask)  # as the command line does
    spool = Spool(cfg.spool.directory, fsync=False)

    dest = Recorder()  # down: the SR stays in the spool
    dest.down = Unreachable("the destination is down")
    try:
        ds = pydicom.dcmread(NIH)
        spool.store(NIH.read_bytes(), ds.SOPInstanceUID, ds.SOPClassUID, "TEST")
        drain(Worker(spool, StandIn(None, INFO, "cpu"), cfg), Delivery(spool, cfg, dest))
        assert spool.jobs()[0].state == "classified"
        found = modes(spool.root, json_dir, sr_dir)
        assert {Path(p).parent.name for p in found if p.endswith(".dcm")} == {
            "images",
            "reports",
            "SR",
        }
        assert any(p.endswith("jobs.sqlite-wal") for p in found)
        assert found == private(found)
    finally:
        spool.close()


def test_serve_makes_its_files_private_in_a_loose_umask(tmp_path):
    """``serve`` started with umask 022: everything it writes is 0600, in 0700 folders."""
    port, spool, out = free_port(), tmp_path / "spool", tmp_path / "out"
    conf = write_config(
        tmp_path / "node.toml",
        {
            "scp": {"port": port, "allowed_calling_aets": ["TESTSCU"]},
            "destination": {"port": free_port(), "timeout": 2.0},  # down: the SR stays
            "spool": {"directory": str(spool), "min_free_mb": 1},
            "report": {"json_dir": str(out / "json"), "sr_dir": str(out / "SR")},
            "model": {"allow_untrained": True, "allow_download": False},
            "worker": {"poll_interval": 0.05, "backoff_base": 30.0},
            "metrics": {"enabled": False},
        },
    )
    ready, log = tmp_path / "ready", tmp_path / "node.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(WRAPPER), "serve", "--config", str(conf), "--ready-file", ready],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            umask=LOOSE,
        )
    try:
        wait_for(lambda: proc.poll() is not None or ready.exists(), 60, "the node to listen")
        assert proc.poll() is None, log.read_text()
        [image] = chest_images(1, "modes")
        sender = Sender(port)
        sender.send([image])
        assert sender.acked == [image.SOPInstanceUID], log.read_text()
        result = out / "json" / f"{image.SOPInstanceUID}.json"
        wait_for(result.exists, 30, "the results JSON")
        found = modes(spool, out)  # while it runs: jobs.sqlite-wal and -shm too
    finally:
        stop_process(proc, 20)
    assert {Path(p).name for p in found} >= {"jobs.sqlite", "jobs.sqlite-wal", "status.json"}
    assert sum(p.endswith(".dcm") for p in found) == 4  # image, SR, summary image, SR copy
    assert sum(p.endswith(".summary.dcm") for p in found) == 1
    assert found == private(found), log.read_text()


def test_classify_writes_private_srs_and_json(tmp_path):
    conf = write_config(tmp_path / "c.toml", {"model": {"allow_download": False}})
    out = tmp_path / "out"
    outputs = ["--json", tmp_path / "results.json", "--sr-dir", out / "SR"]
    done = subprocess.run(
        [sys.executable, WRAPPER, "classify", NIH, "--config", conf, "--allow-untrained", *outputs],
        capture_output=True,
        text=True,
        timeout=120,
        umask=LOOSE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = modes(out / "SR", tmp_path / "results.json")
    assert len(found) == 3 and found == private(found)  # the folder, the SR, the JSON
