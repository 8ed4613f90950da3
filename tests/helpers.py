"""Test helpers: free ports, deadline polling, raw C-STORE, real peers."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from pydicom.dataset import Dataset
from pynetdicom.association import Association

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "tests" / "data"  # kept in the repository: a fresh clone runs on its own
CORPUS = ROOT.parent / "shared" / "corpus"  # optional real-world tier
NIH = SHARED / "nih_cxr_dx.dcm"
ACRNEMA = SHARED / "cr_chest_mono1_10bit_acrnema.dcm"
WEIGHTS_NAME = (
    "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15"
    "-seed0-best.pt"
)
T = TypeVar("T")


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """torch's intra-op thread count as it was before, once the block is left (where torch
    is imported). Set again whatever this thread reads: a count set in another thread
    (the worker's, by start_streams) leaves this thread's as it was and is what every
    thread started later gets."""
    torch = sys.modules.get("torch")
    before = None if torch is None else torch.get_num_threads()
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None:
        torch.set_num_threads(before)


# loopback peers only: never through an HTTP(S)_PROXY from the environment
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fast_paths() -> bool:
    """``network.fast_paths`` for the in-process SCPs and SCUs: as node processes read it,
    from ``CXR_NODE_NETWORK__FAST_PATHS`` (default on), so that one variable runs the
    network tests with stock pynetdicom."""
    import os

    from node.core.config import load_network

    return load_network(None, os.environ).fast_paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens, held for the block: bound, never listening,
    so a connection is refused and no other test's peer (tests run in parallel) can take
    it, as one could take a port that :func:`free_port` only found free."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def send_raw_c_store(assoc: Association, sop_class: str, sop_uid: str, payload: bytes) -> Dataset:
    """Send a C-STORE whose data set is ``payload`` as is (no encoding); return the status."""
    from node.net.scu import send_raw

    [cx] = [c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class]
    return send_raw(assoc, sop_class, sop_uid, cx.transfer_syntax[0], payload)


class OrthancRest:
    """Minimal Orthanc REST client (urllib, basic auth)."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}

    def _req(self, path: str, data: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.base + path, data=data, headers=self.headers)
        with _LOCAL.open(req, timeout=10) as rsp:
            return cast(bytes, rsp.read())

    def get(self, path: str) -> Any:
        return json.loads(self._req(path))

    def post(self, path: str, body: Any) -> Any:
        return json.loads(self._req(path, json.dumps(body).encode()))

    def file(self, instance_id: str) -> bytes:
        return self._req(f"/instances/{instance_id}/file")

    def find(self, level: str, query: dict[str, str]) -> list[str]:
        return cast(list[str], self.post("/tools/find", {"Level": level, "Query": query}))

    def alive(self) -> bool:
        try:
            self.get("/system")
        except OSError:
            return False
        return True


def move_orthanc(cfg: dict[str, Any], folder: Path, lua_dir: Path) -> int:
    """An orthanc.json (``cfg``, changed in place) moved to free ports, its storage into
    ``folder``, its LuaScripts to the files of the same names in ``lua_dir``; returns the
    HTTP port."""
    http = free_port()
    cfg.update(
        StorageDirectory=str(folder / "db"),
        IndexDirectory=str(folder / "db"),
        HttpPort=http,
        DicomPort=free_port(),
        LuaScripts=[str(lua_dir / Path(p).name) for p in cfg["LuaScripts"]],
    )
    return http


def http_status(port: int, auth: tuple[str, str] | None, path: str = "/system") -> int:
    """The HTTP status Orthanc answers to GET ``path`` with these credentials (user,
    password; None: no Authorization header)."""
    import urllib.error

    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with _LOCAL.open(req, timeout=10) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def chest_images(n: int, seed: str = "t") -> list[Dataset]:
    """``n`` copies of the NIH radiograph as distinct instances (new SOP Instance UIDs)."""
    import pydicom
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(NIH)
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        uid = generate_uid(entropy_srcs=[seed, str(i)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        out.append(ds)
    return out


class Sender:
    """Sends datasets one by one to a node, re-associating after a failure; records who got
    a success status (acked) and who did not (failed)."""

    def __init__(self, port: int, called: str = "CXR_NODE") -> None:
        self.port, self.called = port, called
        self.acked: list[str] = []
        self.failed: list[str] = []
        self._assoc: Association | None = None

    def _association(self, ds: Dataset) -> Association | None:
        from pynetdicom import AE

        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        ae = AE(ae_title="TESTSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
        assoc = peer_associate(ae, "127.0.0.1", self.port, ae_title=self.called)
        self._assoc = assoc if assoc.is_established else None
        return self._assoc

    def send(self, datasets: list[Dataset], pause: float = 0.0) -> None:
        for ds in datasets:
            time.sleep(pause)
            assoc = self._association(ds)
            status = None
            if assoc is not None:
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, ValueError, OSError):
                    status = None
            if status is not None and status.get("Status") == 0x0000:
                self.acked.append(str(ds.SOPInstanceUID))
            else:
                self.failed.append(str(ds.SOPInstanceUID))
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()


class Recorder:
    """A destination (``node.jobs.delivery.Destination``) in memory: takes every SR, hands each to
    ``take`` as a Part 10 file (the data set bytes as sent, behind a File Meta group), or
    raises ``down`` (a connection failure) while it is set."""

    name = "RECORDER@127.0.0.1:0"

    def __init__(self, take: Callable[[bytes], object] | None = None) -> None:
        self.sent: list[bytes] = []
        self.take = take or self.sent.append
        self.down: Exception | None = None
        self.associations = 0

    def store(self, items: Any, stop: Callable[[], bool]) -> Any:
        from node.dicom.wire import file_meta_bytes
        from node.net.scu import BatchResult

        if self.down is not None:
            raise self.down
        self.associations += 1
        for e in items:
            self.take(
                file_meta_bytes(e.sop_class_uid, e.sop_instance_uid, e.transfer_syntax) + e.dataset
            )
        return BatchResult([""] * len(items))

    def echo(self) -> None:
        if self.down is not None:
            raise self.down


def drain(*parts: Any, rounds: int = 50) -> None:
    """Step the worker (and delivery) until a round finds nothing to do."""
    for _ in range(rounds):
        if not sum(p.step() for p in parts):
            return
    raise AssertionError("the worker and delivery did not settle")


def storescp(out: Path, port: int, *extra: str) -> Any:
    """dcmtk's storescp as the PACS (AE ORTHANC), writing what it receives into ``out``."""
    import os
    import subprocess

    out.mkdir()
    return subprocess.Popen(
        ["storescp", *extra, "-aet", "ORTHANC", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def sr_source(path: Path) -> str:
    """The SOP Instance UID of the image an SR file reports on (its evidence)."""
    import pydicom

    sr = pydicom.dcmread(path)
    series = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return str(series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _modality(path: Path) -> str | None:
    """A received file's Modality; None while storescp is still writing its header."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
    except (InvalidDicomError, EOFError, OSError):
        return None


def sr_sources(folder: Path) -> set[str]:
    """The images the SRs in ``folder`` report on (the summary images beside them left out)."""
    return {sr_source(p) for p in folder.iterdir() if _modality(p) == "SR"}


def deeply_nested(ds: Dataset, depth: int = 2500) -> Dataset:
    """``ds`` with a Referenced Image Sequence nested ``depth`` deep (hostile input)."""
    from pydicom.sequence import Sequence

    inner = Dataset()
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = Sequence([inner])
    return ds


def peer_associate(ae: Any, *args: Any, **kwargs: Any) -> Association:
    """``ae.associate(...)`` for a test's own pynetdicom peer, without stock pynetdicom
    3.0's pause race: its association loop may take a response off the queue while the
    peer's ``send_c_*`` waits for it, and drop it ("Received unexpected C-STORE service
    message"; the send then times out). A peer that only requests has nothing for that
    loop to take: here it takes only requests. The node's own associations are not
    changed (the fast paths close the race; without them the node recovers by itself)."""
    assoc: Association = ae.associate(*args, **kwargs)
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            with dimse.msg_queue.mutex:
                head = dimse.msg_queue.queue[0] if dimse.msg_queue.queue else None
            if head is None or head[1] is None or not head[1].is_valid_request:
                return None, None
        return take(block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]
    return assoc
