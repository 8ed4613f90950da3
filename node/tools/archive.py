"""Input discovery for the push tool: single files, folders and zip archives (in memory).

What a push is given is not trusted further than it must be:

- A zip member is checked before it is read: one that declares more than ``max_member``
  bytes, or whose declared size is over :data:`MAX_RATIO` times its compressed size (from
  :data:`RATIO_CHECKED_FROM` bytes on: DICOM compresses 2-10x, a zip bomb ~1000x), is
  refused, and the push goes on with the archive's other members. A member is then read in
  chunks, never past its declared size (nor ``max_member``): one whose data runs on is
  stopped there and refused.
- In a folder, a symbolic link (to a file or a folder) whose target is outside the folder
  is not followed unless ``follow_symlinks``: it is skipped and named. A path given
  directly (on the command line) is followed: the user named it.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from node.core.errors import ArchiveError

log = logging.getLogger(__name__)

MAX_MEMBER_BYTES = 1024 * 2**20
MAX_RATIO = 200  # uncompressed / compressed; DICOM: ~2-10x, zeros: ~1000x
RATIO_CHECKED_FROM = 4 * 2**20  # smaller members cannot do harm, whatever their ratio
READ_CHUNK = 2**20


@dataclass(frozen=True)
class Item:
    """One candidate DICOM object: where it came from and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Rejected:
    """An input that is not sent: skipped (not DICOM, or a symbolic link not followed) or
    failed (``failed``: a zip member refused or unreadable); ``reason`` says why ("" for a
    file that is not DICOM)."""

    name: str
    reason: str = ""
    failed: bool = False


@dataclass
class Walk:
    """How paths are walked: sub-folders or not, links out of a folder followed or not;
    ``seen`` holds the real paths of the folders walked (a link loop is walked once)."""

    recursive: bool = True
    follow_symlinks: bool = False
    max_member: int = MAX_MEMBER_BYTES
    seen: set[Path] = field(default_factory=set)


def looks_like_dicom(data: bytes) -> bool:
    """DICM magic at 128, or (ACR-NEMA style, no preamble) a group 0x0008 tag at the start.

    Candidates without a readable SOP Class are reported as failures by the caller; other
    files are skipped as non-DICOM.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    return len(data) >= 8 and data[0:2] in (b"\x08\x00", b"\x00\x08")


def _candidate(name: str, data: bytes) -> Item | Rejected:
    return Item(name, data) if looks_like_dicom(data) else Rejected(name)


# -- zip archives ------------------------------------------------------------------------
def member_problem(info: zipfile.ZipInfo, max_member: int) -> str:
    """Why the member must not be read ("" when it may be), from its declared sizes."""
    size, packed = info.file_size, info.compress_size
    if size > max_member:
        return (
            f"refused: declares {size} bytes uncompressed, over the {max_member}-byte limit "
            "(--max-member-mb; a zip bomb?)"
        )
    if size >= RATIO_CHECKED_FROM and size > MAX_RATIO * max(packed, 1):
        return (
            f"refused: declares {size} bytes uncompressed from {packed} compressed, a ratio "
            f"over {MAX_RATIO} (a zip bomb?)"
        )
    return ""


class _Overrun(Exception):
    """A member's data runs past what it declared (or past the limit)."""


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, max_member: int) -> bytes:
    """The member's bytes, read in chunks and never more than its declared size or
    ``max_member`` (:class:`_Overrun` if there is more). CPython's zipfile itself stops at
    the declared size (then fails the CRC check); this limit holds whatever it does."""
    limit = min(info.file_size, max_member)
    chunks: list[bytes] = []
    total = 0
    with zf.open(info) as fh:
        while total <= limit:
            chunk = fh.read(min(READ_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise _Overrun(f"refused: its data runs past {limit} bytes (stopped reading there)")
    return b"".join(chunks)


_MEMBER_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    RuntimeError,  # encrypted
    EOFError,
    NotImplementedError,  # a compression zipfile does not support
)


def _zip_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, max_member: int
) -> Item | Rejected:
    if info.filename.startswith("__MACOSX/") or Path(info.filename).name == "DICOMDIR":
        return Rejected(name)
    if why := member_problem(info, max_member):
        return Rejected(name, why, failed=True)
    try:
        data = read_member(zf, info, max_member)
    except _Overrun as exc:
        return Rejected(name, str(exc), failed=True)
    except _MEMBER_ERRORS as exc:
        return Rejected(name, f"cannot read member: {exc}", failed=True)
    return _candidate(name, data)


def _zip_items(path: Path, max_member: int) -> Iterator[Item | Rejected]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{path}: not a readable zip archive: {exc}") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if not members:
            raise ArchiveError(f"{path}: the zip archive is empty")
        for info in members:
            item = _zip_member(zf, info, f"{path}!{info.filename}", max_member)
            if isinstance(item, Rejected) and item.failed:
                log.info("%s: %s", item.name, item.reason)  # the summary names it
            yield item


def _is_zip(path: Path) -> bool:
    """A zip by name, magic or content (so that a damaged zip is an error, not skipped).

    A Part 10 DICOM file (``DICM`` after its preamble) is not searched for a zip directory:
    ``zipfile.is_zipfile`` reads and scans up to 64 KiB of its end, for every file pushed
    (measured in bench/RESULTS.md, third session, Push).
    """
    if not path.is_file():
        return False
    if path.suffix.lower() == ".zip":
        return True
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[:4] == b"PK\x03\x04":
        return True
    return head[128:132] != b"DICM" and zipfile.is_zipfile(path)


# -- folders -----------------------------------------------------------------------------
def _link_outside(entry: os.DirEntry[str], root: Path) -> Rejected | None:
    """A symbolic link out of ``root`` (the real path of the pushed folder), skipped."""
    target = Path(entry.path).resolve()
    if target.is_relative_to(root):
        return None
    return Rejected(
        entry.path,
        f"symbolic link to {target}, outside the pushed folder: not followed "
        "(--follow-symlinks follows it)",
    )


def _walk(folder: Path, root: Path, walk: Walk) -> Iterator[Path | Rejected]:
    """The files under ``folder``, depth first in name order (as the sorted paths); links
    out of ``root``, broken links and special files are rejected, named. A folder already
    walked (a link to it, or a loop) is not walked again."""
    real = folder.resolve()
    if real in walk.seen:
        return
    walk.seen.add(real)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise ArchiveError(f"{folder}: cannot list the folder: {exc}") from exc
    for entry in entries:
        if entry.is_symlink() and not walk.follow_symlinks:
            if (outside := _link_outside(entry, root)) is not None:
                yield outside
                continue
        if entry.is_dir():
            if walk.recursive:
                yield from _walk(Path(entry.path), root, walk)
        elif entry.is_file():
            yield Path(entry.path)
        elif entry.is_symlink():
            yield Rejected(entry.path, "broken symbolic link")
        else:
            yield Rejected(entry.path, "not a regular file")


def _path_items(path: Path, walk: Walk) -> Iterator[Item | Rejected]:
    if _is_zip(path):
        yield from _zip_items(path, walk.max_member)
    elif path.is_file():
        yield _candidate(str(path), path.read_bytes())
    else:
        raise ArchiveError(f"{path}: no such file or folder")


def iter_items(
    paths: list[Path],
    *,
    recursive: bool = True,
    max_member: int = MAX_MEMBER_BYTES,
    follow_symlinks: bool = False,
) -> Iterator[Item | Rejected]:
    """Yield an :class:`Item` for each DICOM candidate and a :class:`Rejected` for each
    input that is not sent (named, with the reason)."""
    for path in paths:
        walk = Walk(recursive, follow_symlinks, max_member)
        if not path.is_dir():
            yield from _path_items(path, walk)
            continue
        for found in _walk(path, path.resolve(), walk):
            if isinstance(found, Rejected):
                yield found
            else:
                yield from _path_items(found, walk)
