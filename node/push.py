"""The push tool: C-STORE every DICOM object found in files, folders and zips to a peer."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.archive import Item, iter_items
from node.dicomio import ensure_file_meta
from node.errors import SendError
from node.scu import SUCCESS, Peer, associate, check_status

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128


@dataclass
class Summary:
    sent: int = 0
    warnings: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        mb = self.bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"sent {self.sent}, warnings {self.warnings}, failed {self.failed}, "
            f"skipped {self.skipped} (non-DICOM); {mb:.1f} MB in {self.seconds:.1f} s "
            f"({rate:.1f} MB/s)"
        ]
        lines += [f"  failed: {e}" for e in self.errors]
        return "\n".join(lines)


def _parse(item: Item) -> Dataset | None:
    try:
        ds = pydicom.dcmread(BytesIO(item.data), force=True)
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OSError):
        return None
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return None
    return ensure_file_meta(ds)


def _contexts(datasets: Iterable[Dataset]) -> list[tuple[str, list[str]]]:
    pairs = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets})
    return [
        (c, list(dict.fromkeys([t, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        for c, t in pairs
    ]


def _send_batch(peer: Peer, batch: list[tuple[Item, Dataset]], summary: Summary) -> None:
    done = 0
    try:
        with associate(peer, _contexts(ds for _, ds in batch)) as assoc:
            for item, ds in batch:
                done += 1
                try:
                    code = check_status(assoc.send_c_store(ds), item.name)
                except SendError as exc:
                    summary.failed += 1
                    summary.errors.append(str(exc))
                    continue
                summary.sent += 1
                summary.bytes += len(item.data)
                summary.warnings += code != SUCCESS
    except SendError as exc:
        summary.failed += len(batch) - done
        summary.errors.append(str(exc))


def push(
    paths: list[Path],
    *,
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "CXR_NODE",
    recursive: bool = True,
    dry_run: bool = False,
    timeout: float = 30.0,
) -> Summary:
    """Send every DICOM object under ``paths``; never raises for one bad file."""
    summary = Summary()
    start = time.perf_counter()
    batch: list[tuple[Item, Dataset]] = []
    for item in iter_items(paths, recursive=recursive):
        if isinstance(item, str):
            summary.skipped += 1
            continue
        ds = _parse(item)
        if ds is None:
            summary.failed += 1
            summary.errors.append(f"{item.name}: not a readable DICOM object")
            continue
        batch.append((item, ds))
    peer = Peer(host, port, called_aet, calling_aet, timeout)
    if not dry_run:
        for i in range(0, len(batch), 64):
            _send_batch(peer, batch[i : i + 64], summary)
    summary.seconds = time.perf_counter() - start
    return summary
