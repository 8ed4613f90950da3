"""``cxr-node push``: one bad file fails alone. In-process pynetdicom peers on loopback that
abort or never answer on chosen SOP Instance UIDs; bad files are built at test time."""

from __future__ import annotations

import csv
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from helpers import chest_images, fast_paths
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt

import node.tools.push
from node.net.scu import Peer

pytestmark = pytest.mark.network

TIMEOUT = 10.0  # the push's DIMSE timeout: no test may wait it out more than once


@dataclass
class RecordingPeer:
    """A Storage SCP "PEER" that records every C-STORE request it gets (``seen``) and the
    SOP Instance UIDs it stored; it aborts the association on those in ``abort_on`` and
    never answers those in ``silent_on`` (until the test ends)."""

    abort_on: set[str] = field(default_factory=set)
    silent_on: set[str] = field(default_factory=set)
    seen: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    hold: threading.Event = field(default_factory=threading.Event)
    server: Any = None

    def on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        self.seen.append(uid)
        if uid in self.abort_on:
            event.assoc.abort()
            return 0xC000
        if uid in self.silent_on:
            self.hold.wait(3 * TIMEOUT)
            return 0xC000
        self.stored.append(uid)
        return 0x0000

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@pytest.fixture
def peer() -> Iterator[RecordingPeer]:
    rec = RecordingPeer()
    ae = AE(ae_title="PEER")
    ae.supported_contexts = StoragePresentationContexts
    rec.server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, rec.on_store)]
    )
    try:
        yield rec
    finally:
        rec.hold.set()
        rec.server.shutdown()


def part10(ds: Dataset, *, enforce: bool = True) -> bytes:
    """The Part 10 bytes of ``ds``; ``enforce=False`` lets empty meta UIDs through."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=enforce)
    return buf.getvalue()


def write_images(folder: Path, n: int, seed: str) -> list[tuple[Path, str]]:
    """``n`` distinct chest images as ``folder/NN.dcm``; (path, SOP Instance UID) each."""
    folder.mkdir(exist_ok=True)
    out = []
    for i, ds in enumerate(chest_images(n, seed)):
        path = folder / f"{i:02d}.dcm"
        path.write_bytes(part10(ds))
        out.append((path, str(ds.SOPInstanceUID)))
    return out


def push_to(peer: RecordingPeer, paths: list[Path], timeout: float = TIMEOUT) -> Any:
    target = Peer("127.0.0.1", peer.port, "PEER", timeout=timeout, fast_paths=fast_paths())
    return node.tools.push.push(paths, target, associations=1, progress_stream=None)


def test_peer_abort_fails_that_file_alone_and_the_rest_go_at_once(tmp_path, peer):
    """1 file that makes the peer abort (twice, on fresh associations) + 5 good ones over
    one association: the 5 are stored, the bad one is named with the reason, the push is
    not 'unreachable' and does not wait out the DIMSE timeout."""
    files = write_images(tmp_path / "in", 6, "abort")
    bad_path, bad_uid = files[1]
    peer.abort_on.add(bad_uid)
    start = time.monotonic()
    summary = push_to(peer, [tmp_path / "in"])
    elapsed = time.monotonic() - start
    text = summary.describe()
    assert sorted(peer.stored) == sorted(uid for _, uid in files if uid != bad_uid), text
    assert (summary.sent, summary.failed) == (5, 1), text
    where = f"PEER@127.0.0.1:{peer.port}"
    assert f"{bad_path}: {where}: peer aborted the association while receiving it" in text
    assert peer.seen.count(bad_uid) == 2  # tried once more on a fresh association
    assert summary.unreachable == "" and summary.not_attempted == 0
    assert elapsed < 5, f"{elapsed:.1f} s: a DIMSE timeout ({TIMEOUT} s) was waited out"


def test_peer_that_never_answers_costs_one_timeout_for_that_file_only(tmp_path, peer):
    """No response for one file: only that file waits the timeout (once, no retry), and
    the files after it go over a new association."""
    files = write_images(tmp_path / "in", 4, "silent")
    bad_path, bad_uid = files[0]
    peer.silent_on.add(bad_uid)
    start = time.monotonic()
    summary = push_to(peer, [tmp_path / "in"], timeout=2.0)
    elapsed = time.monotonic() - start
    text = summary.describe()
    assert sorted(peer.stored) == sorted(uid for _, uid in files[1:]), text
    assert (summary.sent, summary.failed) == (3, 1), text
    assert f"{bad_path}: no response from PEER@127.0.0.1:{peer.port} within 2 s" in text
    assert peer.seen.count(bad_uid) == 1
    assert elapsed < 2 * 2.0, f"{elapsed:.1f} s: the 2 s timeout was waited out more than once"


def odd_pixel_data(ds: Dataset) -> bytes:
    """The Part 10 bytes of ``ds`` (Implicit VR Little Endian) with its Pixel Data one
    byte shorter: an odd value length, as in highdicom's dx_image.dcm."""
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    data = part10(ds)
    at = data.rindex(b"\xe0\x7f\x10\x00")  # (7FE0,0010), then a 4-byte length
    (length,) = struct.unpack_from("<L", data, at + 4)
    return data[: at + 4] + struct.pack("<L", length - 1) + data[at + 8 : -1]


UID_CASES = {  # file name: (attribute, value, expected reason)
    "empty_uid.dcm": ("SOPInstanceUID", "", "invalid SOP Instance UID '' (empty)"),
    "letters_uid.dcm": ("SOPInstanceUID", "1.2.abc", "invalid SOP Instance UID '1.2.abc'"),
    "long_uid.dcm": ("SOPInstanceUID", "1." * 32 + "1", "(65 characters, over 64)"),
    "empty_class.dcm": ("SOPClassUID", "", "invalid SOP Class UID '' (empty)"),
}


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files that must fail before anything is sent: {file name: expected reason}."""
    folder.mkdir(exist_ok=True)
    reasons = {}
    images = chest_images(len(UID_CASES), "bad")
    for ds, (name, (keyword, value, reason)) in zip(images, UID_CASES.items(), strict=True):
        setattr(ds, keyword, value)
        setattr(ds.file_meta, f"MediaStorage{keyword}", value)
        with warnings.catch_warnings():  # pydicom warns about the invalid values
            warnings.simplefilter("ignore")
            (folder / name).write_bytes(part10(ds, enforce=False))
        reasons[name] = reason
    [odd] = chest_images(1, "odd")
    (folder / "odd_pixels.dcm").write_bytes(odd_pixel_data(odd))
    reasons["odd_pixels.dcm"] = "(7FE0,0010) Pixel Data has an odd length"
    [cut] = chest_images(1, "truncated")
    (folder / "truncated.dcm").write_bytes(part10(cut)[:-1000])
    reasons["truncated.dcm"] = "(7FE0,0010) Pixel Data declares 1048576 bytes, 1047576 left"
    return reasons


def test_invalid_uids_and_odd_lengths_fail_before_sending(tmp_path, peer):
    """Empty, too long or non-numeric SOP UIDs and an odd-length Pixel Data fail with
    their reason and are never sent; a UID that is safe but not conformant (a component
    with a leading zero) is sent as it is; the good files around them all go."""
    reasons = write_bad_files(tmp_path / "in")
    good = write_images(tmp_path / "in", 2, "good")
    [leading_zero] = chest_images(1, "zero")
    leading_zero.SOPInstanceUID = leading_zero.file_meta.MediaStorageSOPInstanceUID = (
        "999.999.01.23"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (tmp_path / "in" / "zero.dcm").write_bytes(part10(leading_zero))
    summary = push_to(peer, [tmp_path / "in"])
    text = summary.describe()
    assert sorted(peer.seen) == sorted([uid for _, uid in good] + ["999.999.01.23"]), text
    assert (summary.sent, summary.failed) == (3, len(reasons)), text
    for name, reason in reasons.items():
        [line] = [x for x in text.splitlines() if name in x]
        assert reason in line, line
    assert summary.unreachable == ""


def test_report_names_every_file_and_messages_name_each_once(tmp_path, peer):
    """``--report`` writes one row per input file (sent / failed / skipped, with the
    reason); the summary names every failed and skipped file, each path once per line,
    and nothing reaches stderr as a traceback."""
    folder = tmp_path / "in"
    files = write_images(folder, 3, "report")
    peer.abort_on.add(files[0][1])
    reasons = write_bad_files(folder)
    (folder / "notes.txt").write_text("not DICOM\n")
    (folder / "damaged.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    report = tmp_path / "report.csv"
    args = ["--port", str(peer.port), "--aet", "PEER", "--associations", "1", "--timeout", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "node", "push", str(folder), *args, "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == "", done.stderr  # no traceback, no per-file warnings
    out = done.stdout
    assert f"skipped (not DICOM): {folder / 'notes.txt'}" in out
    for name in [*reasons, "damaged.dcm", "00.dcm"]:
        [line] = [x for x in out.splitlines() if name in x]
        assert line.count(str(folder / name)) == 1, line
    with report.open(newline="") as fh:
        rows = {row["file"]: row for row in csv.DictReader(fh)}
    assert sorted(rows) == sorted(str(p) for p in folder.iterdir())
    assert rows[str(files[0][0])]["outcome"] == "failed"
    assert "peer aborted the association" in rows[str(files[0][0])]["reason"]
    for path, _ in files[1:]:
        assert rows[str(path)]["outcome"] == "sent"
    assert rows[str(folder / "notes.txt")]["outcome"] == "skipped"
    for name, reason in reasons.items():
        assert rows[str(folder / name)]["outcome"] == "failed"
        assert reason in rows[str(folder / name)]["reason"]
    assert rows[str(folder / "damaged.dcm")]["outcome"] == "failed"


def test_summary_names_the_first_failures_and_counts_the_rest():
    """The summary names 20 failed and 20 skipped files at most, then says how many more."""
    summary = node.tools.push.Summary()
    for i in range(25):
        summary.fail(f"f{i}.dcm", "bad")
        summary.skip(f"s{i}.txt")
    lines = summary.describe().splitlines()
    assert "  failed: f19.dcm: bad" in lines and "  failed: f20.dcm: bad" not in lines
    assert "  ... and 5 more failed (--report lists all)" in lines
    assert "  skipped (not DICOM): s19.txt" in lines
    assert "  ... and 5 more skipped (not DICOM) (--report lists all)" in lines
    assert lines[-1] == "nothing sent: every DICOM object failed (see above)"
    assert len(lines) == 1 + 2 * 21 + 1
