"""``cxr-node push`` against hostile inputs: a zip bomb, a member that lies about its size,
symbolic links out of a pushed folder. An in-process pynetdicom peer on loopback."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import fast_paths
from test_push_isolation import RecordingPeer, write_images

import node.tools.push
from node.net.scu import Peer

pytestmark = pytest.mark.network

BOMB_MEMBER = 1536 * 2**20  # 1.5 GiB of zeros: ~1.5 MB deflated
RSS_LIMIT_KB = 300 * 1024


@pytest.fixture
def peer() -> Iterator[RecordingPeer]:
    from pynetdicom import AE, StoragePresentationContexts, evt

    rec = RecordingPeer()
    ae = AE(ae_title="PEER")
    ae.supported_contexts = StoragePresentationContexts
    rec.server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, rec.on_store)]
    )
    try:
        yield rec
    finally:
        rec.server.shutdown()


TIME = Path("/usr/bin/time")  # GNU time: the child's peak RSS, from its own wait4


def _vm_hwm_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_measured(args: list[str], out: Path, timeout: float) -> tuple[int, int, str]:
    """``cxr-node push ARGS`` in a subprocess: (exit status, peak RSS in KiB, output).

    The peak is what GNU time reports (its child's ``wait4`` rusage; the test process's own
    ``wait4`` would count the pre-exec copy of pytest) and the largest VmHWM polled while
    it runs; past twice the limit, or the deadline, the push is killed (exit -9), so that
    one that reads the bomb into memory fails the test quickly instead of filling RAM."""
    report = out / "time.txt"
    measure = [str(TIME), "-v", "-o", str(report)] if TIME.exists() else []
    with (out / "push.out").open("wb") as fh:
        proc = subprocess.Popen(
            [*measure, sys.executable, "-m", "node", "push", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pids = _children(proc.pid) if measure else [proc.pid]
    deadline, peak = time.monotonic() + timeout, 0
    while proc.poll() is None:
        pids = (_children(proc.pid) or pids) if measure else pids
        peak = max([peak, *(_vm_hwm_kb(pid) for pid in pids)])
        if peak > 2 * RSS_LIMIT_KB or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.05)
    text = (out / "push.out").read_text(errors="replace")
    measured = report.read_text() if report.exists() else ""
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", measured)
    return proc.returncode, max(peak, int(found[1]) if found else 0), text  # time: its status


def write_bomb_zip(path: Path, images: list[tuple[Path, str]]) -> None:
    """The images around a 1.5 GiB member of zeros, written in 4 MiB chunks (the test never
    holds the member; the zip on disk is ~1.5 MB)."""
    zeros = bytes(4 * 2**20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(images[0][0], "study/01.dcm")
        with zf.open("study/bomb.dcm", "w") as fh:
            for _ in range(BOMB_MEMBER // len(zeros)):
                fh.write(zeros)
        for i, (image, _) in enumerate(images[1:], 2):
            zf.write(image, f"study/{i:02d}.dcm")


def test_zip_bomb_member_is_refused_alone_and_the_push_stays_small(tmp_path, peer):
    """Disk: ~1.5 MB for the zip, ~3 MB of images; ~8 s of CPU to deflate the zeros."""
    images = write_images(tmp_path / "images", 3, "bomb")
    bomb = tmp_path / "bomb.zip"
    write_bomb_zip(bomb, images)
    assert bomb.stat().st_size < 8 * 2**20
    args = [str(bomb), "--port", str(peer.port), "--aet", "PEER", "--associations", "1"]
    rc, peak_kb, out = run_measured(args, tmp_path, timeout=60)
    assert peak_kb < RSS_LIMIT_KB, f"peak RSS {peak_kb} KiB (exit {rc}):\n{out}"
    assert rc == 1, out  # a member failed; the others were sent
    assert sorted(peer.stored) == sorted(uid for _, uid in images)
    assert f"failed: {bomb}!study/bomb.dcm: refused: declares {BOMB_MEMBER} bytes" in out
    assert "sent 3, warnings 0, failed 1" in out and "Traceback" not in out


def _declare(path: Path, member: str, size: int) -> None:
    """Rewrite ``member``'s uncompressed size in its local header and central directory
    entry (a zip that lies about what it holds)."""
    with zipfile.ZipFile(path) as zf:
        local, central = zf.getinfo(member).header_offset, zf.start_dir
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, local + 22, size)
    while data[central + 46 : central + 46 + len(member)] != member.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", data, central + 24, size)
    path.write_bytes(bytes(data))


def test_members_over_the_ratio_or_lying_about_their_size_fail_alone(tmp_path):
    from node.tools.archive import Rejected, iter_items

    images = write_images(tmp_path / "images", 1, "ratio")
    path = tmp_path / "mixed.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", bytes(8 * 2**20))  # ~1000x: over the ratio
        zf.writestr("liar.dcm", bytes(128) + b"DICM" + bytes(32 * 2**20))
        zf.writestr("noise.bin", os.urandom(5 * 2**20))  # 1x: read, not DICOM
        zf.write(images[0][0], "image.dcm")
    _declare(path, "liar.dcm", 4096)
    got = {(x.name.rpartition("!")[2]): x for x in iter_items([path], max_member=16 * 2**20)}
    assert isinstance(got["zeros.dcm"], Rejected) and got["zeros.dcm"].failed
    assert "a ratio over 200" in got["zeros.dcm"].reason
    assert isinstance(got["liar.dcm"], Rejected) and got["liar.dcm"].failed  # stopped at 4 KiB
    assert "Bad CRC-32" in got["liar.dcm"].reason or "runs past" in got["liar.dcm"].reason
    assert got["noise.bin"] == Rejected(f"{path}!noise.bin")  # not DICOM: skipped
    assert (
        not isinstance(got["image.dcm"], Rejected)
        and got["image.dcm"].data == images[0][0].read_bytes()
    )
    too_big = list(iter_items([path], max_member=2 * 2**20))
    assert [x.name.rpartition("!")[2] for x in too_big if getattr(x, "failed", False)] == [
        "zeros.dcm",
        "liar.dcm",
        "noise.bin",
    ]


@pytest.fixture
def linked_folder(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, Path]]:
    """``pushed/`` holding one image, a link to an image outside it, a link to a folder of
    images outside it, and links inside it (to its own image and to itself); returns the
    folder, the SOP Instance UIDs by name and the outside links."""
    outside = tmp_path / "outside"
    [(secret, secret_uid)] = write_images(outside, 1, "secret")
    [(other, other_uid)] = write_images(tmp_path / "outside-dir", 1, "other-dir")
    pushed = tmp_path / "pushed"
    [(own, own_uid)] = write_images(pushed, 1, "own")
    (pushed / "secret.dcm").symlink_to(secret)
    (pushed / "series").symlink_to(other.parent, target_is_directory=True)
    (pushed / "again.dcm").symlink_to(own.name)  # inside: followed
    (pushed / "loop").symlink_to(".", target_is_directory=True)  # inside, walked once
    uids = {"own": own_uid, "secret": secret_uid, "other": other_uid}
    return pushed, uids, {"file": pushed / "secret.dcm", "folder": pushed / "series"}


def test_links_out_of_a_pushed_folder_are_skipped_and_named(linked_folder, peer):
    pushed, uids, links = linked_folder
    target = Peer("127.0.0.1", peer.port, "PEER", timeout=10, fast_paths=fast_paths())
    summary = node.tools.push.push([pushed], target, associations=1, progress_stream=None)
    assert set(peer.stored) == {uids["own"]}  # the outside files were never read
    skipped = {name: why for name, what, why in summary.outcomes if what == "skipped"}
    assert set(skipped) == {str(links["file"]), str(links["folder"])}
    for link in links.values():
        assert f"symbolic link to {link.resolve()}, outside the pushed folder" in skipped[str(link)]
        assert f"skipped: {link}: symbolic link to" in summary.describe()
    assert summary.failed == 0 and summary.sent == 2  # own.dcm and again.dcm (a link inside)


def test_follow_symlinks_and_links_named_on_the_command_line_are_read(linked_folder, peer):
    pushed, uids, links = linked_folder
    cmd = [sys.executable, "-m", "node", "push", "--port", str(peer.port), "--aet", "PEER"]
    done = subprocess.run(
        [*cmd, str(pushed), "--follow-symlinks"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(peer.stored) == set(uids.values()) and "skipped 0" in done.stdout
    peer.stored.clear()
    done = subprocess.run([*cmd, str(links["file"])], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and peer.stored == [uids["secret"]], done.stdout
