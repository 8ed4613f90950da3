"""The worker and the delivery with a real spool and model and a fake destination: states,
files, deliveries (the delivery's retry rules: tests/jobs/test_delivery.py)."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import jsonschema
import pydicom
import pytest
from helpers import NIH, ROOT, Recorder, drain

from node.analysis.model import load_classifier
from node.core.config import NodeConfig
from node.jobs.delivery import Delivery
from node.jobs.worker import Worker
from node.store.spool import Spool

SCHEMA = json.loads((ROOT / "node" / "process" / "result.schema.json").read_text())


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
    dest = Recorder()
    sent = dest.sent
    drain(Worker(spool, clf, cfg), Delivery(spool, cfg, dest))
    [job] = spool.jobs()
    assert job.state == "sent" and job.sr_uid
    sr, summary = (pydicom.dcmread(BytesIO(b)) for b in sent)  # over the same association
    assert sr.SOPInstanceUID == job.sr_uid
    assert summary.Modality == "OT" and summary.BurnedInAnnotation == "YES"
    assert summary.StudyInstanceUID == ds.StudyInstanceUID
    record = json.loads((tmp_path / "json" / f"{ds.SOPInstanceUID}.json").read_text())
    jsonschema.validate(record, SCHEMA)
    assert record["summary"]["sop_instance_uid"] == summary.SOPInstanceUID
    assert (tmp_path / "SR" / f"{job.sr_uid}.dcm").is_file()
    assert not job.image.exists() and list(spool.reports.iterdir()) == []  # retention: removed


def test_summary_image_off_sends_the_sr_alone(setup, tmp_path):
    cfg, spool, clf, _ds = setup
    cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"summary_image": False})})
    dest = Recorder()
    drain(Worker(spool, clf, cfg), Delivery(spool, cfg, dest))
    [job] = spool.jobs()
    assert job.state == "sent" and len(dest.sent) == 1
    assert pydicom.dcmread(BytesIO(dest.sent[0])).SOPInstanceUID == job.sr_uid
    [record] = (tmp_path / "json").iterdir()
    assert json.loads(record.read_text())["summary"] is None


def test_same_image_twice_gives_two_deliveries_of_one_sr_uid(setup):
    cfg, spool, clf, ds = setup
    spool.store(NIH.read_bytes(), ds.SOPInstanceUID, ds.SOPClassUID, "TEST")  # again
    sent: list[str] = []
    dest = Recorder(
        lambda b: sent.append(pydicom.dcmread(__import__("io").BytesIO(b)).SOPInstanceUID)
    )
    drain(Worker(spool, clf, cfg), Delivery(spool, cfg, dest))
    assert [j.state for j in spool.jobs()] == ["sent", "sent"]
    assert len(sent) == 4 and sent[0] == sent[2] and sent[1] == sent[3]  # SR, summary, twice
