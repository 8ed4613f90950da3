"""The real-world corpus tier: every file of ``../shared/corpus`` (199 files from public
toolkits' test sets) through ``classify``, through the SCP as a real process (C-STORE from
dcmtk's storescu and from pynetdicom through ``cxr-node push``), and through ``push``.

Each file must end in exactly one outcome class (an SR, skipped with a reason, failed or
refused with a reason), never a traceback; the node stays alive and still classifies a valid
chest image afterwards; every SR it makes passes dciodvfy, except for the source's own UIDs,
which are referenced as they are even where they are not conformant (``999.999...``).
The expected classes are in ``corpus_expected.tsv``. Skipped, saying so, without the corpus.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from conftest import REPORTS, write_config
from helpers import (
    CORPUS,
    ROOT,
    Sender,
    chest_images,
    free_port,
    sr_sources,
    storescp,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CORPUS.is_dir(),
        reason=f"the real-world corpus tier needs {CORPUS} (absent in a bare clone): skipped",
    ),
]
FILES = sorted(CORPUS.glob("*.dcm")) if CORPUS.is_dir() else []
EXPECTED = ROOT / "tests" / "corpus_expected.tsv"
SOURCE_UID_ERRORS = ("Illegal root for UID", "Leading zeroes", "Empty component")


RECORD = os.environ.get("CXR_CORPUS_RECORD") == "1"  # write what is seen as the expectation
COLUMNS = ("file", "classify", "storescu", "push")


def _rows() -> dict[str, dict[str, str]]:
    if not EXPECTED.is_file():
        return {}
    with EXPECTED.open(newline="") as fh:
        return {row["file"]: row for row in csv.DictReader(fh, delimiter="\t")}


def _expected(column: str, seen: dict[str, str]) -> dict[str, str]:
    """The expected outcome of each file in ``column``; with CXR_CORPUS_RECORD=1, ``seen``
    is written as the new expectation (review the diff before committing it)."""
    if RECORD:
        rows = _rows()
        for name, outcome in seen.items():
            rows.setdefault(name, {"file": name})[column] = outcome
        with EXPECTED.open("w", newline="") as fh:
            out = csv.DictWriter(fh, COLUMNS, delimiter="\t", restval="")
            out.writeheader()
            out.writerows(rows[k] for k in sorted(rows))
    return {name: row[column] for name, row in _rows().items()}


def _dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    errors = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("Error")]
    # the source's UIDs are referenced as they are (a refusal would leave the image unread)
    return [e for e in errors if not any(s in e for s in SOURCE_UID_ERRORS)]


def _table(title: str, counts: Counter[str], unit: str = "files") -> str:
    rows = [f"  {n:4d}  {outcome}" for outcome, n in sorted(counts.items())]
    return "\n".join([f"corpus tier: {title} ({sum(counts.values())} {unit})", *rows])


def _classify_outcomes(stderr: str) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for line in stderr.splitlines():
        for f in FILES:
            if str(f) not in line:
                continue
            if ": skipped: " in line:
                outcomes[f.name] = "skipped"
            elif ": present:" in line:
                outcomes[f.name] = "sr"
            elif " ERROR " in line:
                outcomes[f.name] = "failed"
    return outcomes


def test_every_corpus_file_through_classify(tmp_path, weights_dir):
    conf = write_config(
        tmp_path / "c.toml", {"model": {"cache_dir": str(weights_dir), "allow_download": False}}
    )
    srs = tmp_path / "SR"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "node",
            "classify",
            "--config",
            str(conf),
            "--allow-untrained",
            "--sr-dir",
            str(srs),
            "--json",
            str(tmp_path / "r.json"),
            *map(str, FILES),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert "Traceback" not in done.stderr
    outcomes = _classify_outcomes(done.stderr)
    assert set(outcomes) == {f.name for f in FILES}, "a file without exactly one outcome"
    assert outcomes == _expected("classify", outcomes)
    counts = Counter(outcomes.values())
    assert done.returncode == (1 if counts["failed"] else 0)
    assert f"{counts['sr']} classified, {counts['skipped']} skipped," in done.stderr
    assert len(list(srs.iterdir())) == counts["sr"]
    for sr in srs.iterdir():
        assert _dciodvfy_errors(sr) == [], sr
    REPORTS.append(_table("classify", counts))


# storescu proposes one kind of transfer syntax per run: the file's own, as a PACS would
_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.2": "-xb",
}


def _proposal(path: Path) -> str:
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
    except Exception:  # unreadable: storescu says why it cannot send it
        return "-x="
    return _PROPOSE.get(str(meta.get("TransferSyntaxUID", "")), "-x=")


def _storescu(port: int, path: Path) -> str:
    """One file over its own association, proposed in its own transfer syntax."""
    done = subprocess.run(
        [
            "storescu",
            _proposal(path),
            "-aet",
            "TESTSCU",
            "-aec",
            "CXR_NODE",
            "127.0.0.1",
            str(port),
            str(path),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "stored" if done.returncode == 0 else "not stored"


def _settled(node) -> bool:
    jobs = node.jobs()
    return not jobs.get("received") and not jobs.get("classified")


def test_every_corpus_file_through_the_scp_and_push(node_factory, tmp_path):
    pacs_port = free_port()
    pacs = storescp(tmp_path / "pacs", pacs_port)
    try:
        node = node_factory(pacs_port, model=False)
        started = time.monotonic()
        by_dcmtk = {f.name: _storescu(node.port, f) for f in FILES}
        report = tmp_path / "push.tsv"
        push = node.cli(
            "push",
            str(CORPUS),
            "--port",
            str(node.port),
            "--aet",
            "CXR_NODE",
            "--report",
            str(report),
        )
        assert "Traceback" not in push.stderr
        with report.open(newline="") as fh:
            by_push = {
                Path(r["file"]).name: r["outcome"] for r in csv.DictReader(fh, delimiter="\t")
            }
        wait_for(lambda: _settled(node), 180, "every received job in a final state")
        assert node.proc.poll() is None, node.log_text()
        seen_push = {f.name: by_push.get(f.name, "absent") for f in FILES}
        assert by_dcmtk == _expected("storescu", by_dcmtk)
        assert seen_push == _expected("push", seen_push)
        # still alive and still classifying
        [chest] = chest_images(1, "after-corpus")
        sender = Sender(node.port)
        sender.send([chest])
        assert sender.acked == [str(chest.SOPInstanceUID)]
        wait_for(
            lambda: str(chest.SOPInstanceUID) in sr_sources(tmp_path / "pacs"),
            60,
            "the SR after the corpus",
        )
        text = node.log_text()
        assert "Traceback" not in text and "CRITICAL" not in text
        for sr in (tmp_path / "pacs").iterdir():
            assert _dciodvfy_errors(sr) == [], sr
        REPORTS.append(_table("storescu -> node", Counter(by_dcmtk.values())))
        REPORTS.append(_table("cxr-node push -> node", Counter(by_push.values())))
        REPORTS.append(_table("node jobs by final state", Counter(node.jobs()), "jobs"))
        REPORTS.append(f"corpus tier: SCP round took {time.monotonic() - started:.0f} s")
    finally:
        pacs.terminate()
        pacs.wait(10)
