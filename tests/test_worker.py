"""The worker with a real spool and model and a fake sender: states, files, retries."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pydicom
import pytest
from helpers import NIH, ROOT

from node.config import NodeConfig
from node.errors import SendError
from node.model import load_classifier
from node.spool import Spool
from node.worker import Worker

SCHEMA = json.loads((ROOT / "node" / "result.schema.json").read_text())


@pytest.fixture
def setup(tmp_path: Path, weights_dir: Path):
    cfg = NodeConfig.model_validate(
        {
            "model": {
                "cache_dir": str(weights_dir),
                "allow_untrained": True,
                "allow_download": False,
            },
            "report": {"json_dir": str(tmp_path / "json"), "sr_dir": str(tmp_path / "SR")},
            "worker": {"max_attempts": 3, "backoff_base": 0.0001, "backoff_max": 0.0001},
        }
    )
    spool = Spool(tmp_path / "spool", fsync=False)
    ds = pydicom.dcmread(NIH)
    spool.store(NIH.read_bytes(), ds.SOPInstanceUID, ds.SOPClassUID, "TEST")
    return cfg, spool, load_classifier(cfg.model), ds


def test_classify_writes_sr_json_and_delivers(setup, tmp_path):
    cfg, spool, clf, ds = setup
    sent: list[bytes] = []
    worker = Worker(spool, clf, cfg, lambda p: sent.append(p.read_bytes()))
    while worker.step():
        pass
    [job] = spool.jobs()
    assert job.state == "sent" and job.sr_uid
    assert (
        len(sent) == 1
        and pydicom.dcmread(__import__("io").BytesIO(sent[0])).SOPInstanceUID == job.sr_uid
    )
    record = json.loads((tmp_path / "json" / f"{ds.SOPInstanceUID}.json").read_text())
    jsonschema.validate(record, SCHEMA)
    assert (tmp_path / "SR" / f"{job.sr_uid}.dcm").is_file()
    assert not job.image.exists() and list(spool.reports.iterdir()) == []  # retention: removed


def test_delivery_failures_dead_letter_then_retry_delivers(setup):
    cfg, spool, clf, _ = setup
    calls: list[Path] = []

    def down(path: Path) -> None:
        calls.append(path)
        raise SendError("association to ORTHANC@127.0.0.1:4242 aborted or unreachable")

    worker = Worker(spool, clf, cfg, down)
    for _ in range(50):
        worker.step()
        if spool.counts()["dead"]:
            break
    [job] = spool.jobs()
    assert job.state == "dead" and job.attempts == 3 and "unreachable" in job.last_error
    assert len(calls) == 3 and job.image.exists() and job.report and job.report.exists()
    spool.requeue("dead")
    ok: list[Path] = []
    Worker(spool, clf, cfg, ok.append).step()
    assert spool.jobs()[0].state == "sent" and len(ok) == 1


def test_same_image_twice_gives_two_deliveries_of_one_sr_uid(setup):
    cfg, spool, clf, ds = setup
    spool.store(NIH.read_bytes(), ds.SOPInstanceUID, ds.SOPClassUID, "TEST")  # again
    sent: list[str] = []
    worker = Worker(spool, clf, cfg, lambda p: sent.append(pydicom.dcmread(p).SOPInstanceUID))
    while worker.step():
        pass
    assert [j.state for j in spool.jobs()] == ["sent", "sent"]
    assert len(sent) == 2 and sent[0] == sent[1]
