"""Durable spool: received files on disk plus a job table in SQLite (WAL mode).

A received object is written to ``incoming/`` (temp name), flushed and fsynced, then
renamed into ``images/`` and recorded as a job — all before the C-STORE is answered.
Job states::

    received -> classified -> sent
             -> skipped   (not a chest radiograph / not an image)
             -> failed    (cannot be decoded or reported; kept for inspection)
             -> quarantined (the process died or hung each time it worked on the job:
                           ``worker.max_crash_attempts``; ``jobs retry`` puts it back)
    classified -> dead    (the destination refused the SR with a failure status for longer
                           than destination.retry_for and worker.max_attempts times; an
                           unreachable destination never dead-letters: the SR waits)

A received job's ``attempts`` counts the times the worker *started* on it, recorded before
the work (:meth:`Spool.begin`): a job that kills the process is seen at the next start.

Files in ``images/`` without a job row (a crash between rename and insert) are
re-enqueued by :meth:`Spool.recover` at start-up.

The spool holds patient data: its folders are created 0700; its files are created with the
process's umask (``spool.umask``, 0077 by default, applied by ``serve``: files 0600).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from node.core.errors import SpoolError

log = logging.getLogger(__name__)

STATES = ("received", "classified", "sent", "skipped", "failed", "quarantined", "dead")
FINAL_STATES = ("sent", "skipped", "failed", "quarantined", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image TEXT NOT NULL UNIQUE,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'received',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    report TEXT NOT NULL DEFAULT '',
    sr_uid TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt);
"""

_CATCHUP_SCHEMA = """
CREATE INDEX IF NOT EXISTS jobs_sop ON jobs (sop_instance_uid);
CREATE TABLE IF NOT EXISTS refusals (
    sop_instance_uid TEXT PRIMARY KEY,
    status INTEGER NOT NULL,
    reason TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    created REAL NOT NULL
);
"""
"""What the catch-up (node/jobs/catchup.py) asks: the instances the node has a job for, and those
its SCP refused for good (the data set itself was refused: fetching it again would not help)."""


@dataclass(frozen=True)
class Job:
    id: int
    image: Path
    sop_instance_uid: str
    sop_class_uid: str
    calling_ae: str
    state: str
    attempts: int
    next_attempt: float
    last_error: str
    report: Path | None
    sr_uid: str
    notice: str = ""  # the not-analysed notice: "", "pending", "sent", "dead", "failed"


Buffer = bytes | bytearray | memoryview
Data = Buffer | Sequence[Buffer]
"""What the spool writes: one buffer, or several written back to back (no join, no copy)."""


def _size(data: Data) -> int:
    if isinstance(data, Buffer):
        return len(data)
    return sum(len(part) for part in data)


def summary_path(report: Path) -> Path:
    """Where a job's summary image is kept: beside its SR, ``<SR file's stem>.summary.dcm``."""
    return report.with_name(f"{report.stem}.summary.dcm")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FOLDER_MODE = 0o700


def _private_folder(path: Path) -> None:
    """Create ``path`` (and its parents) as 0700; an existing one open to other users is
    logged (it is the operator's to change, with the files already in it)."""
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "spool folder %s is open to other users (mode %04o): chmod -R go-rwx it", path, mode
        )


def _discard(path: Path) -> None:
    """Remove a temp file after a failed write; a failure to do so is logged, not raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove temp file %s: %s", path, exc)


class Spool:
    """The on-disk spool and job table. Thread-safe; one instance per process."""

    def __init__(self, directory: Path, *, fsync: bool = True, min_free_mb: int = 0) -> None:
        self.root = directory
        self.incoming = directory / "incoming"
        self.images = directory / "images"
        self.reports = directory / "reports"
        self._fsync = fsync
        self._min_free = min_free_mb * 1024 * 1024
        self._lock = threading.Lock()
        try:
            for d in (directory, self.incoming, self.images, self.reports):
                _private_folder(d)
            self._db = sqlite3.connect(
                directory / "jobs.sqlite", check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL" if fsync else "PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._add_failing_since()
            self._add_notice()
            self._db.executescript(_CATCHUP_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open spool at {directory}: {exc}") from exc

    def _add_failing_since(self) -> None:
        """``failing_since``: when the destination first refused the job's SR by status (0:
        not refused). Added to a job table made before it existed."""
        columns = {str(row[1]) for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "failing_since" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN failing_since REAL NOT NULL DEFAULT 0")

    def _add_notice(self) -> None:
        """``notice``: the delivery of a skipped, failed or quarantined job's not-analysed
        notice (its SR file in ``report``, its UID in ``sr_uid``); the job keeps its state.
        Added to a job table made before it existed."""
        columns = {str(row[1]) for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "notice" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN notice TEXT NOT NULL DEFAULT ''")

    LOCK_FILE = "serve.lock"

    def claim(self) -> None:
        """Take the spool for this process alone (``serve``): another node on the same
        spool would answer from the same job table; raises :class:`SpoolError` naming it."""
        path = self.root / self.LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpoolError(
                f"spool {self.root} is in use by another cxr-node (pid {holder}): one node "
                "per spool (`cxr-node status` shows it)"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._claim = fd  # held open (and locked) until the process ends

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing -------------------------------------------------------------------------
    def write_atomic(self, data: Data, final: Path) -> None:
        """Write ``data`` (bytes, or a sequence of buffers written one after the other) to
        ``final`` via a temp file, fsync and rename; nothing half-written."""
        tmp = self.incoming / f"{uuid.uuid4().hex}.part"
        parts = (data,) if isinstance(data, Buffer) else tuple(data)
        try:
            with tmp.open("wb", buffering=0) as fh:
                for part in parts:
                    fh.write(part)
                if self._fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
            if self._fsync:
                _fsync_dir(final.parent)
        except OSError as exc:
            _discard(tmp)
            raise SpoolError(f"cannot write {final.name} to the spool: {exc}") from exc

    def store(self, data: Data, sop_instance_uid: str, sop_class_uid: str, calling_ae: str) -> int:
        """Durably store a received object and enqueue it; returns the job id."""
        self._check_space(_size(data))
        final = self.images / f"{uuid.uuid4().hex}.dcm"
        self.write_atomic(data, final)
        try:
            return self._insert(final, sop_instance_uid, sop_class_uid, calling_ae)
        except sqlite3.Error as exc:
            final.unlink(missing_ok=True)
            raise SpoolError(f"cannot record job for {sop_instance_uid}: {exc}") from exc

    def _check_space(self, size: int) -> None:
        if not self._min_free:
            return
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise SpoolError(f"cannot check free space of {self.root}: {exc}") from exc
        if free - size < self._min_free:
            raise SpoolError(
                f"free disk space {free // 2**20} MiB is below the spool floor "
                f"{self._min_free // 2**20} MiB"
            )

    def _insert(self, image: Path, sop_uid: str, sop_class: str, calling_ae: str) -> int:
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs (image, sop_instance_uid, sop_class_uid, calling_ae, created,"
                " updated) VALUES (?, ?, ?, ?, ?, ?)",
                (image.name, sop_uid, sop_class, calling_ae, now, now),
            )
        return int(cur.lastrowid or 0)

    # -- reading -------------------------------------------------------------------------
    def _job(self, row: tuple[object, ...]) -> Job:
        (jid, image, sop, cls, ae, state, attempts, nxt, err, report, sr_uid, notice) = row
        return Job(
            id=int(str(jid)),
            image=self.images / str(image),
            sop_instance_uid=str(sop),
            sop_class_uid=str(cls),
            calling_ae=str(ae),
            state=str(state),
            attempts=int(str(attempts)),
            next_attempt=float(str(nxt)),
            last_error=str(err),
            report=self.reports / str(report) if report else None,
            sr_uid=str(sr_uid),
            notice=str(notice),
        )

    _COLUMNS = (
        "id, image, sop_instance_uid, sop_class_uid, calling_ae, state, attempts,"
        " next_attempt, last_error, report, sr_uid, notice"
    )

    def jobs(self, state: str | None = None, limit: int = 1000) -> list[Job]:
        query = f"SELECT {self._COLUMNS} FROM jobs"
        args: tuple[object, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [self._job(r) for r in rows]

    def due(self, state: str, now: float, limit: int, exclude: Collection[int] = ()) -> list[Job]:
        """Jobs in ``state`` whose next attempt is due, oldest first, but those in
        ``exclude`` (ids)."""
        skip = " AND id NOT IN ({})".format(",".join("?" * len(exclude))) if exclude else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM jobs WHERE state = ? AND next_attempt <= ?{skip}"
                " ORDER BY next_attempt, id LIMIT ?",
                (state, now, *exclude, limit),
            ).fetchall()
        return [self._job(r) for r in rows]

    def due_deliveries(self, now: float, limit: int) -> list[Job]:
        """The SRs to deliver whose next attempt is due, oldest first: classified jobs' and
        pending not-analysed notices."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM jobs WHERE (state = 'classified' OR"
                " notice = 'pending') AND next_attempt <= ? ORDER BY next_attempt, id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [self._job(r) for r in rows]

    def recent_errors(self, limit: int) -> list[Job]:
        """The most recently updated jobs that carry an error, newest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM jobs WHERE last_error != ''"
                " ORDER BY updated DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [self._job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({str(s): int(n) for s, n in rows})
        return out

    def notice_counts(self) -> dict[str, int]:
        """Not-analysed notices by delivery state: pending, sent, dead, failed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT notice, COUNT(*) FROM jobs WHERE notice != '' GROUP BY notice"
            ).fetchall()
        out = dict.fromkeys(("pending", "sent", "dead", "failed"), 0)
        out.update({str(s): int(n) for s, n in rows})
        return out

    # -- transitions ---------------------------------------------------------------------
    def _update(self, job_id: int, **fields: object) -> None:
        fields["updated"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def mark_classified(self, job_id: int, report: Path, sr_uid: str) -> None:
        self._update(
            job_id,
            state="classified",
            report=report.name,
            sr_uid=sr_uid,
            attempts=0,
            next_attempt=0.0,
            last_error="",
            failing_since=0.0,
        )

    def mark_sent(self, job_id: int, *, notice: bool = False) -> None:
        """The job's SR was delivered (``notice``: its not-analysed notice; the job keeps its
        state and reason)."""
        if notice:
            self._update(job_id, notice="sent")
        else:
            self._update(job_id, state="sent", last_error="")

    def mark_notice(self, job_id: int, report: Path, sr_uid: str) -> None:
        """A skipped, failed or quarantined job has a not-analysed notice to deliver."""
        self._update(
            job_id,
            report=report.name,
            sr_uid=sr_uid,
            notice="pending",
            attempts=0,
            next_attempt=0.0,
            failing_since=0.0,
        )

    def mark_notice_failed(self, job_id: int) -> None:
        """The notice cannot be delivered (its file unreadable); the job keeps its state."""
        self._update(job_id, notice="failed")

    def mark_skipped(self, job_id: int, reason: str) -> None:
        self._update(job_id, state="skipped", last_error=reason)

    def mark_failed(self, job_id: int, error: str) -> None:
        self._update(job_id, state="failed", last_error=error)

    def mark_quarantined(self, job_id: int, reason: str) -> None:
        self._update(job_id, state="quarantined", last_error=reason)

    def begin(self, job_ids: Sequence[int]) -> None:
        """Count one attempt on each received job, durably, *before* it is worked on."""
        if not job_ids:
            return
        marks = ", ".join("?" * len(job_ids))
        with self._lock:
            self._db.execute(
                f"UPDATE jobs SET attempts = attempts + 1, updated = ? WHERE id IN ({marks})",
                (time.time(), *job_ids),
            )

    def postpone(self, job_id: int, error: str, next_attempt: float) -> None:
        """Leave a job in its state, to be tried again at ``next_attempt`` (e.g. disk full)."""
        self._update(job_id, next_attempt=next_attempt, last_error=error)

    def refused(
        self,
        job_id: int,
        error: str,
        now: float,
        plan: Callable[[int, float], tuple[bool, float]],
        *,
        notice: bool = False,
    ) -> tuple[str, int]:
        """Record that the destination refused a job's SR by status at ``now``. ``plan(attempts,
        failing_since)`` says whether it is dead and when to try again. Returns the new state
        (``classified`` or ``dead``) and the attempts counted. For a not-analysed notice
        (``notice``) that state is the notice's, and the job keeps its own and its reason."""
        with self._lock:
            row = self._db.execute(
                "SELECT attempts, failing_since FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        attempts, since = int(row[0]) + 1, float(row[1]) or now
        dead, next_attempt = plan(attempts, since)
        state = "dead" if dead else "classified"
        fields: dict[str, object] = {"state": state, "last_error": error}
        if notice:
            fields = {"notice": "dead" if dead else "pending"}
        self._update(
            job_id, attempts=attempts, next_attempt=next_attempt, failing_since=since, **fields
        )
        return state, attempts

    def purge(self, state: str) -> int:
        """Delete the jobs in ``state`` and their files (an explicit operator action)."""
        if state not in FINAL_STATES:
            raise ValueError(f"refusing to purge jobs in state {state!r}: not a final state")
        for job in self.jobs(state, limit=10**9):
            job.image.unlink(missing_ok=True)
            if job.report is not None:
                job.report.unlink(missing_ok=True)
                summary_path(job.report).unlink(missing_ok=True)
        with self._lock:
            cur = self._db.execute("DELETE FROM jobs WHERE state = ?", (state,))
        return int(cur.rowcount)

    def requeue(self, state: str) -> int:
        """Put every job in ``state`` back in line now: ``dead`` jobs for delivery, others
        (``failed``, ``quarantined``, ``skipped``) to be classified again."""
        target = "classified" if state == "dead" else "received"
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state = ?, attempts = 0, next_attempt = 0, failing_since = 0,"
                " notice = '', updated = ? WHERE state = ?",
                (target, time.time(), state),
            )
            notices = 0
            if state == "dead":  # the dead-lettered not-analysed notices too
                notices = self._db.execute(
                    "UPDATE jobs SET notice = 'pending', attempts = 0, next_attempt = 0,"
                    " failing_since = 0, updated = ? WHERE notice = 'dead'",
                    (time.time(),),
                ).rowcount
        return int(cur.rowcount) + int(notices)

    def recover(self, read_uids: Callable[[Path], tuple[str, str]]) -> int:
        """Enqueue image files that have no job row (crash between rename and insert)."""
        with self._lock:
            known = {str(r[0]) for r in self._db.execute("SELECT image FROM jobs")}
        added = 0
        for path in sorted(self.images.glob("*.dcm")):
            if path.name in known:
                continue
            try:
                sop_uid, sop_class = read_uids(path)
            except Exception as exc:  # any unreadable orphan is recorded, never dropped
                log.error("orphan spool file %s unreadable: %s", path, exc)
                sop_uid, sop_class = "", ""
            job_id = self._insert(path, sop_uid, sop_class, "")
            if not sop_uid:
                self.mark_failed(job_id, "orphan spool file unreadable")
            added += 1
        for tmp in self.incoming.glob("*.part"):  # never acknowledged: safe to remove
            tmp.unlink(missing_ok=True)
        return added

    # -- catch-up ------------------------------------------------------------------------
    def record_refusal(self, sop_uid: str, status: int, reason: str, calling_ae: str) -> None:
        """Remember an instance the SCP refused for good (the catch-up never fetches it)."""
        try:
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO refusals VALUES (?, ?, ?, ?, ?)",
                    (sop_uid, status, reason, calling_ae, time.time()),
                )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot record the refusal of {sop_uid}: {exc}") from exc

    def known_uids(self, uids: Collection[str]) -> set[str]:
        """Those of ``uids`` that have a job, in any state."""
        with self._lock:
            return _matching(self._db, "jobs", uids)

    def refused_uids(self, uids: Collection[str]) -> set[str]:
        """Those of ``uids`` the SCP refused for good."""
        with self._lock:
            return _matching(self._db, "refusals", uids)


_CHUNK = 500  # host parameters per query (SQLite allows 999 at least)


def _matching(db: sqlite3.Connection, table: str, uids: Collection[str]) -> set[str]:
    found: set[str] = set()
    items = list(uids)
    for i in range(0, len(items), _CHUNK):
        chunk = items[i : i + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = db.execute(
            f"SELECT DISTINCT sop_instance_uid FROM {table} WHERE sop_instance_uid IN ({marks})",
            chunk,
        )
        found.update(str(r[0]) for r in rows)
    return found


class SpoolIndex:
    """A read-only view of a node's job table and refusals (``cxr-node backfill``, a separate
    process, asks what the running node already has)."""

    def __init__(self, directory: Path) -> None:
        path = directory / "jobs.sqlite"
        if not path.is_file():
            raise SpoolError(f"no job table at {path}: start the node (cxr-node serve) first")
        try:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            self._db.execute("SELECT 1 FROM refusals LIMIT 1")
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read the job table {path}: {exc}") from exc

    def known_uids(self, uids: Collection[str]) -> set[str]:
        return self._read("jobs", uids)

    def refused_uids(self, uids: Collection[str]) -> set[str]:
        return self._read("refusals", uids)

    def _read(self, table: str, uids: Collection[str]) -> set[str]:
        try:
            return _matching(self._db, table, uids)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot read the job table: {exc}") from exc

    def close(self) -> None:
        self._db.close()


def lock_holder(directory: Path) -> str | None:
    """The pid of the ``serve`` holding the spool at ``directory`` (see :meth:`Spool.claim`),
    or None when no process holds it. Creates nothing and takes nothing."""
    try:
        fd = os.open(directory / Spool.LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # no lock file: never served, or not readable (reported elsewhere)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.read(fd, 32).decode(errors="replace").strip() or "?"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
