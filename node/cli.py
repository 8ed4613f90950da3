"""Command line: ``cxr-node serve | check | echo | classify | push | status | jobs | backfill``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import date, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

from node import __version__
from node.analysis.allocator import keep_freed_memory, release_start_up_garbage
from node.core.errors import ConfigError, NodeError
from node.core.logs import setup_logging

if TYPE_CHECKING:
    from node.analysis.model import ModelInfo
    from node.core.config import NodeConfig
    from node.jobs.delivery import PeerDestination
    from node.net.scu import Peer
    from node.store.spool import Spool

log = logging.getLogger("node.cli")
# node.store.spool.STATES, without importing sqlite3 into every command's start-up
JOB_STATES = ("received", "classified", "sent", "skipped", "failed", "quarantined", "dead")


def _config(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """The configuration; logging set up, and ``spool.umask`` applied to the process: every
    file the command writes (spool, jobs.sqlite, results JSON, SRs) is the user's alone."""
    from node.core.config import load_config  # pydantic: imported only where a config is read

    cfg = load_config(args.config, os.environ, overrides or {})
    setup_logging(args.log_level or cfg.logging.level, cfg.logging.json_format)
    previous = os.umask(cfg.spool.umask)
    log.debug("umask %04o (was %04o)", cfg.spool.umask, previous)
    return cfg


# -- serve -------------------------------------------------------------------------------
def _destination(cfg: NodeConfig) -> PeerDestination:
    from node.jobs.delivery import PeerDestination
    from node.net.scu import Peer, client_ssl_context

    d = cfg.destination
    tls = client_ssl_context(d.tls_ca_file, d.tls_cert_file, d.tls_key_file) if d.tls else None
    fast = cfg.network.fast_paths
    return PeerDestination(
        Peer(d.host, d.port, d.ae_title, d.calling_ae_title, d.timeout, tls, fast)
    )


def _fast_paths_checked(cfg: NodeConfig) -> NodeConfig:
    """``cfg`` with ``network.fast_paths`` as it can be used: off where the installed
    pynetdicom is not the one they were written for (node.net.fast.fastpaths logs one WARNING)."""
    from node.net.fast.fastpaths import resolve

    return cfg.with_fast_paths(resolve(cfg.network.fast_paths))


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop


STATUS_FILE = "status.json"


def _spool(cfg: NodeConfig, min_free_mb: int = 0) -> Spool:
    from node.store.spool import Spool  # sqlite3: not imported by push

    return Spool(cfg.spool.directory, fsync=cfg.spool.fsync, min_free_mb=min_free_mb)


def _write_status(spool: Spool, info: ModelInfo, port: int, metrics_port: int | None) -> None:
    """What ``cxr-node status`` shows about the running process."""
    status = {
        "pid": os.getpid(),
        "started": time.time(),
        "scp_port": port,
        "metrics_port": metrics_port,
        "model": info.name,
        "weights_sha256": info.weights_sha256,
        "trained": info.trained,
    }
    spool.write_atomic(json.dumps(status).encode(), spool.root / STATUS_FILE)


def cmd_serve(args: argparse.Namespace) -> int:
    from node.analysis.model import load_classifier
    from node.dicom.dicomio import read_uids
    from node.jobs.watchdog import report_last_hang
    from node.service import NodeService

    overrides = {"scp.port": args.port, "model.allow_untrained": args.allow_untrained or None}
    cfg = _fast_paths_checked(_config(args, overrides))
    keep_freed_memory(cfg.model.batch_size)
    classifier = load_classifier(cfg.model)
    spool = _spool(cfg, min_free_mb=cfg.spool.min_free_mb)
    spool.claim()  # one node per spool: a second one refuses to start
    if recovered := spool.recover(read_uids):
        log.warning("recovered %d spooled file(s) without a job record", recovered)
    for job_id in report_last_hang(spool.root):
        limit = cfg.worker.image_timeout
        spool.postpone(job_id, f"exceeded worker.image_timeout ({limit:g} s per image)", 0.0)
    service = NodeService(cfg, classifier, _destination(cfg), spool)
    release_start_up_garbage()
    stop = _stop_on_signals()
    threading.excepthook = _log_thread_death
    port = service.start()
    _write_status(spool, classifier.info, port, service.metrics_port)
    if args.ready_file:
        args.ready_file.write_text(str(port))
    try:
        while not stop.wait(0.5):
            service.check()
    finally:
        service.stop()
    log.info("stopped")
    return 0


def _log_thread_death(args: threading.ExceptHookArgs) -> None:
    """A thread that dies logs one line (type and message), its traceback at DEBUG."""
    name = args.thread.name if args.thread is not None else "?"
    log.critical("thread %s died: %s: %s", name, args.exc_type.__name__, args.exc_value)
    if args.exc_value is not None:
        log.debug("thread %s traceback", name, exc_info=args.exc_value)


# -- echo ----------------------------------------------------------------------------------
PEER_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 4242,
    "ae_title": "ORTHANC",
    "calling_ae_title": "CXR_NODE",
    "timeout": 30.0,
}
"""``[destination]``'s defaults (node.core.config.DestinationConfig; tests/core/test_units.py checks
they agree), here so that ``push`` without a config never imports pydantic (its import time:
bench/RESULTS.md, "What changed, and what each change bought", Push)."""
ENV_PREFIX = "CXR_NODE_"  # node.core.config.ENV_PREFIX
ECHO_EXIT_CODES = """exit codes:
  0  the peer answered the C-ECHO with success
  2  no association (refused, timed out, aborted, rejected: the reason is printed),
     no success, or an invalid command line or configuration"""
PUSH_EXIT_CODES = """exit codes:
  0  every DICOM object found was sent (warning statuses included; --dry-run: would be)
  1  a file failed, or nothing was sent (no DICOM object found, the peer unreachable)
  2  an invalid command line or configuration, or an unreadable path
  130  interrupted"""
PUSH_CALLING_AET = "CXR_PUSH"
"""push's own calling AE title: Orthanc's route ignores what comes from the node's."""


def _destination_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[destination]`` section (defaults < file < environment), read only when a
    config file or a ``CXR_NODE_`` variable is there to read; other sections are not
    checked (a healthcheck's echo does not fail for a key only serve uses)."""
    if _nothing_configured(args):
        return {**PEER_DEFAULTS, "tls": False}
    from node.core.config import load_destination

    return load_destination(args.config, os.environ).model_dump()


def _nothing_configured(args: argparse.Namespace) -> bool:
    """No config file, no ``CXR_NODE_`` variable: the defaults, without pydantic."""
    return args.config is None and not any(k.startswith(ENV_PREFIX) for k in os.environ)


def _cli_peer(args: argparse.Namespace, calling_default: str | None = None) -> Peer:
    """The peer: command-line flags > ``--config``'s ``[destination]`` (and environment) >
    defaults. ``calling_default`` replaces destination.calling_ae_title when given."""
    from node.net.scu import Peer, client_ssl_context

    d = _destination_settings(args)
    calling = args.calling_aet or calling_default or d["calling_ae_title"]
    ca = _first(args.tls_ca, d.get("tls_ca_file"))
    cert = _first(args.tls_cert, d.get("tls_cert_file"))
    key = _first(args.tls_key, d.get("tls_key_file"))
    tls = client_ssl_context(ca, cert, key) if args.tls or d["tls"] else None
    return Peer(
        _first(args.host, d["host"]),
        _first(args.port, d["port"]),
        _first(args.aet, d["ae_title"]),
        calling,
        _first(args.timeout, d["timeout"]),
        tls,
        _fast_paths(args),
    )


def _fast_paths(args: argparse.Namespace) -> bool:
    """``network.fast_paths`` for push and echo (a config file or ``CXR_NODE_`` variables
    read as for ``[destination]``), as node.net.fast.fastpaths allows it."""
    from node.net.fast.fastpaths import resolve

    if _nothing_configured(args):
        return resolve(True)
    from node.core.config import load_network

    return resolve(load_network(args.config, os.environ).fast_paths)


def _first(flag: Any, configured: Any) -> Any:
    return configured if flag is None else flag


def cmd_echo(args: argparse.Namespace) -> int:
    from node.net.scu import echo

    setup_logging(args.log_level or "WARNING")
    if args.log_level != "DEBUG":  # its failures are in the one line printed
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    peer = _cli_peer(args)
    echo(peer)
    sys.stdout.write(
        f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port} "
        f"(calling AE {peer.calling_ae_title}{', TLS' if peer.tls else ''}): success\n"
    )
    return 0


# -- check -------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    """The pre-flight (node/check.py): one line per check, exit 1 if any FAILs."""
    from node.check import Result, run_checks
    from node.core.config import load_config

    setup_logging(args.log_level or "ERROR")
    if args.log_level != "DEBUG":  # a failed C-ECHO is reported on its check's line, once
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    source = str(args.config) if args.config else "the defaults and environment"
    try:
        cfg = load_config(args.config, os.environ)
    except ConfigError as exc:
        fix = "correct the key named above (config/node.toml documents every key)"
        detail = "; ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
        sys.stdout.write(Result("FAIL", "config", detail, fix).line() + "\n")
        return 1
    failed = False
    for result in run_checks(cfg, source):
        sys.stdout.write(result.line() + "\n")
        sys.stdout.flush()  # each line as soon as it is known (the C-ECHOs take time)
        failed = failed or result.level == "FAIL"
    return 1 if failed else 0


# -- classify ----------------------------------------------------------------------------
def cmd_classify(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from node.analysis.model import load_classifier
    from node.jobs.worker import report_context, summarizer
    from node.sr.srtemplate import ReportEncoder
    from node.tools.classify import Options, Outputs, Run, count_inputs

    start = time.perf_counter()
    cfg = _config(args, {"model.allow_untrained": args.allow_untrained or None})
    if args.resume and args.csv is None and args.json is None:
        raise ConfigError("--resume needs --csv or --json: the output to resume")
    opts = Options(
        no_filter=args.no_filter,
        csv_path=args.csv,
        json_path=None if args.json is None or str(args.json) == "-" else args.json,
        sr_dir=args.sr_dir,
        summary_dir=args.summary_dir,
        resume=args.resume,
        recursive=args.recursive,
        follow_symlinks=args.follow_symlinks,
    )
    keep_freed_memory(cfg.model.batch_size)
    classifier = load_classifier(cfg.model)
    context = report_context(cfg)
    reports = ReportEncoder(classifier.info, context, fast=cfg.report.fast_encoder)
    outputs = Outputs(opts, classifier.info.pathologies, sys.stdout)
    summaries = None
    if args.summary_dir is not None:  # asked for: whatever report.summary_image says
        summaries = summarizer(classifier, context, cfg.report.summary_compression)
    run = Run(cfg, classifier, reports, opts, outputs, summaries)
    bar = tqdm(
        total=count_inputs(args.paths, args.recursive),
        unit="img",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    try:
        with bar, logging_redirect_tqdm():
            counts = run.run(args.paths, bar)
    except KeyboardInterrupt:
        sys.stderr.write(
            run.counts.line(time.perf_counter() - start)
            + "\nclassify: interrupted; what is written is kept (--resume goes on)\n"
        )
        return 130
    finally:
        outputs.close()
    sys.stderr.write(counts.line(time.perf_counter() - start) + "\n")
    return 1 if counts.failed else 0


# -- push --------------------------------------------------------------------------------
def cmd_push(args: argparse.Namespace) -> int:
    from node.core.imports import PUSH_NEVER_USES, hidden

    with hidden(PUSH_NEVER_USES):  # kept out of push's start-up: node.core.imports
        from node.tools.push import push

    setup_logging(args.log_level or "WARNING")
    if args.log_level != "DEBUG":  # failures are reported in the summary, once
        _quiet_readers()
    peer = _cli_peer(args, PUSH_CALLING_AET)
    with ExitStack() as stack:  # the report file opened first: a bad path fails before sending
        report = stack.enter_context(_report_file(args.report)) if args.report else None
        summary = push(
            args.paths,
            peer,
            recursive=args.recursive,
            dry_run=args.dry_run,
            associations=args.associations,
            max_member=args.max_member_mb * 2**20,
            follow_symlinks=args.follow_symlinks,
        )
        sys.stdout.write(summary.describe() + "\n")
        if report is not None:
            summary.write_report(report, tab=args.report.suffix.lower() == ".tsv")
    return 0 if summary.failed == 0 and summary.sent > 0 else 1


def _quiet_readers() -> None:
    """No per-file warnings from pynetdicom and pydicom (invalid values, VR guesses): the
    summary names every file that fails, with its reason."""
    from pydicom import config

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    config.settings.reading_validation_mode = config.IGNORE
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")


def _report_file(path: Path) -> TextIO:
    try:
        return path.open("w", newline="", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--report {path}: cannot write it: {exc}") from exc


# -- status ------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _counts_line(spool: Spool) -> str:
    return " ".join(f"{state}={n}" for state, n in spool.counts().items())


def _delivery_lines(cfg: NodeConfig, spool: Spool) -> list[str]:
    """The destination as the node last found it, the SRs pending, the C-STOREs refused."""
    from node.jobs.delivery import read_state

    d = cfg.destination
    counts = spool.counts()
    state = read_state(spool.root, f"{d.ae_title}@{d.host}:{d.port}")
    return state.lines(counts["classified"], counts["dead"], spool.notice_counts())


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    spool = _spool(cfg)
    out = sys.stdout
    status_path = spool.root / STATUS_FILE
    running = False
    if status_path.is_file():
        st = json.loads(status_path.read_text())
        running = _alive(int(st["pid"]))
        uptime = time.time() - float(st["started"])
        out.write(
            f"node: {'running' if running else 'NOT running'} (pid {st['pid']}"
            + (f", uptime {uptime:.0f} s" if running else "")
            + f"), SCP port {st['scp_port']}, metrics port {st['metrics_port']}\n"
            f"model: {st['model']}\nweights sha256: {st['weights_sha256']}\n"
        )
    else:
        out.write(f"node: never started with spool {spool.root}\n")
    out.write(f"jobs: {_counts_line(spool)}\n")
    out.writelines(f"{line}\n" for line in _delivery_lines(cfg, spool))
    for job in spool.recent_errors(5):
        out.write(
            f"last error: job {job.id} ({job.state}) {job.sop_instance_uid}: {job.last_error}\n"
        )
    out.write(_catchup_line(spool.root))
    return 0 if running else 3


def _catchup_line(root: Path) -> str:
    """The last catch-up round, as the node saved it (node/jobs/catchup.py)."""
    from node.jobs.catchup import STATUS_FILE as CATCHUP_FILE

    path = root / CATCHUP_FILE
    if not path.is_file():
        return "catch-up: no round yet\n"
    last = json.loads(path.read_text())
    when = datetime.fromtimestamp(float(last["time"])).isoformat(sep=" ", timespec="seconds")
    line = (
        f"catch-up: last round {when} ({time.time() - float(last['time']):.0f} s ago): "
        f"found {last['found']}, fetched {last['fetched']}, errors {last['errors']}"
    )
    if last.get("error"):
        line += f" (last: {last['error']})"
    return line + "\n"


# -- backfill ----------------------------------------------------------------------------
class _Bar:
    """A tqdm progress bar on a terminal (stderr), nothing otherwise."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, total: int) -> None:
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="image", desc="backfill", file=sys.stderr)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _date(text: str) -> date:
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD or YYYYMMDD)")


def cmd_backfill(args: argparse.Namespace) -> int:
    from node.jobs.catchup import backfill, date_range
    from node.store.spool import SpoolIndex

    cfg = _fast_paths_checked(_config(args))
    if args.since is None and not args.study:
        raise ConfigError("backfill needs --since DATE, or --study UID")
    status_path = cfg.spool.directory / STATUS_FILE
    if not status_path.is_file() or not _alive(int(json.loads(status_path.read_text())["pid"])):
        raise ConfigError(
            f"the node (spool {cfg.spool.directory}) is not running: it receives what "
            "backfill moves; start cxr-node serve first"
        )
    index = SpoolIndex(cfg.spool.directory)
    bar = _Bar()
    try:
        report = backfill(cfg, index, date_range(args.since, args.until), args.study or [], bar)
    finally:
        bar.close()
        index.close()
    sys.stdout.write(report.describe() + "\n")
    if report.last_error:
        sys.stdout.write(f"backfill: last error: {report.last_error}\n")
    return 0 if report.errors == 0 else 1


# -- jobs --------------------------------------------------------------------------------
def cmd_jobs(args: argparse.Namespace) -> int:
    cfg = _config(args)
    spool = _spool(cfg)
    if args.action == "retry":
        n = spool.requeue(args.state or "dead")
        sys.stdout.write(f"{n} job(s) requeued\n")
        return 0
    if args.action == "purge":
        if not args.state:
            raise ConfigError("jobs purge needs --state (sent, skipped, failed or dead)")
        try:
            n = spool.purge(args.state)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        sys.stdout.write(f"{n} job(s) purged\n")
        return 0
    sys.stdout.write(f"{_counts_line(spool)}\n")
    sys.stdout.write("\t".join(JOB_COLUMNS) + "\n")
    for job in spool.jobs(args.state):
        sys.stdout.write("\t".join(_job_row(job)) + "\n")
    return 0


JOB_COLUMNS = (
    "id",
    "state",
    "attempts",
    "next_retry",
    "sop_instance_uid",
    "sr_uid",
    "last_error",
)


def _job_row(job: Any) -> list[str]:
    nxt = job.next_attempt
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(nxt)) if nxt > time.time() else "-"
    error = job.last_error.replace("\t", " ").replace("\n", " ")
    ids = [str(job.id), job.state, str(job.attempts), when]
    return [*ids, job.sop_instance_uid, job.sr_uid, error]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-node", description=__doc__)
    p.add_argument("--version", action="version", version=f"cxr-node {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, log_default: str = "logging.level, else INFO") -> None:
        sp.add_argument(
            "--config",
            type=Path,
            help="TOML config file (see config/node.toml; relative paths in it are taken from "
            "its folder); CXR_NODE_<SECTION>__<KEY> variables override it (default: none)",
        )
        sp.add_argument(
            "--log-level",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help=f"messages logged on stderr (default: {log_default})",
        )

    s = sub.add_parser("serve", help="run the Storage SCP and the worker")
    common(s)
    s.add_argument("--port", type=int, help="override scp.port (default: scp.port, else 11112)")
    _allow_untrained(s)
    s.add_argument(
        "--ready-file", type=Path, help="write the listening port here when ready (default: none)"
    )
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser(
        "echo",
        help="C-ECHO a remote AE (by default the configured destination)",
        description=textwrap.fill(
            "C-ECHO a remote AE: by default [destination] of --config, with its AE titles "
            "and TLS settings; each flag overrides its key."
        ),
        epilog=ECHO_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(e, "WARNING")
    _peer_args(
        e,
        "(default: destination.calling_ae_title from --config, else "
        f"{PEER_DEFAULTS['calling_ae_title']})",
    )
    e.set_defaults(func=cmd_echo)

    k = sub.add_parser(
        "check",
        help="pre-flight: config, weights, spool, ports, destination and catch-up peer "
        "(C-ECHO); one line per check with the fix; exit 1 if any FAILs",
    )
    common(k)
    k.set_defaults(func=cmd_check)

    c = sub.add_parser(
        "classify", help="classify DICOM files, folders and zip archives offline (no network)"
    )
    common(c)
    c.add_argument("paths", nargs="+", type=Path, help="files, folders, zip archives")
    c.add_argument(
        "--json", type=Path, help="one record per classified image ('-' = stdout, default)"
    )
    c.add_argument(
        "--csv",
        type=Path,
        help="one row per image: file, UIDs, modality, body part, view, each finding's "
        "probability, score and label, status and reason",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="skip the images already in --csv / --json (an interrupted run goes on)",
    )
    c.add_argument(
        "--recursive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="walk sub-folders (default: yes)",
    )
    c.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="follow links in a folder that point outside it (default: skipped, named)",
    )
    c.add_argument("--sr-dir", type=Path, help="write one SR file per image here (default: none)")
    c.add_argument(
        "--summary-dir",
        type=Path,
        help="write one summary image per image here (a DICOM Secondary Capture: the "
        "image, the findings' class activation maps, their names and scores; default: none)",
    )
    _allow_untrained(c)
    c.add_argument(
        "--no-filter",
        action="store_true",
        help="run the model on every image, not only frontal chest radiographs (filter.*)",
    )
    c.set_defaults(func=cmd_classify)

    u = sub.add_parser(
        "push",
        help="C-STORE files, folders and zip archives to a remote AE",
        description=textwrap.fill(
            "C-STORE every DICOM object in files, folders and zip archives to a remote AE: "
            "by default [destination] of --config (host, port, called AE title, TLS); each "
            "flag overrides its key."
        ),
        epilog=PUSH_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(u, "WARNING")
    u.add_argument("paths", nargs="+", type=Path, help="DICOM files, folders, zip archives")
    _peer_args(
        u,
        f"(default: {PUSH_CALLING_AET}, not destination.calling_ae_title: Orthanc's route "
        "ignores what comes from the node's AE title)",
    )
    u.add_argument(
        "--recursive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="walk sub-folders (default: yes)",
    )
    u.add_argument(
        "--associations",
        type=int,
        default=4,
        help="parallel associations (default: 4; 1 sends in order over one association)",
    )
    u.add_argument(
        "--max-member-mb",
        type=_positive_int,
        default=1024,
        help="refuse zip members declaring more than this many MiB uncompressed (default: "
        "1024), and those over 4 MiB declaring more than 200 times their compressed size "
        "(zip bombs); the archive's other members are still sent",
    )
    u.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="follow symbolic links in folders to files and folders outside them (default: "
        "skipped, named in the summary; a link named on the command line is always followed)",
    )
    u.add_argument(
        "--dry-run",
        action="store_true",
        help="send nothing: list each object that would be sent (file, SOP class, SOP "
        "instance UID) and each file skipped or failing its checks",
    )
    u.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="write every input file's outcome (sent, warning, failed, skipped) and reason "
        "to FILE, as CSV (TSV if FILE ends in .tsv)",
    )
    u.set_defaults(func=cmd_push)

    st = sub.add_parser("status", help="queue depth, last errors, model, uptime")
    common(st)
    st.set_defaults(func=cmd_status)

    b = sub.add_parser(
        "backfill",
        help="fetch from the PACS (C-FIND, C-MOVE) the CR/DX images the running node never "
        "received, over a date range or a list of studies",
    )
    common(b)
    b.add_argument("--since", type=_date, help="first StudyDate (YYYY-MM-DD)")
    b.add_argument("--until", type=_date, help="last StudyDate (YYYY-MM-DD; default: no limit)")
    b.add_argument(
        "--study",
        action="append",
        metavar="UID",
        help="only this StudyInstanceUID (repeat for several)",
    )
    b.set_defaults(func=cmd_backfill)

    j = sub.add_parser("jobs", help="list, retry (re-deliver) or purge the node's jobs")
    common(j)
    j.add_argument(
        "action",
        nargs="?",
        choices=["list", "retry", "purge"],
        default="list",
        help="list the jobs, retry (re-deliver) them, or purge them from the spool (default: list)",
    )
    j.add_argument(
        "--state",
        choices=JOB_STATES,
        help="only jobs in this state (retry: default dead). States: received (waiting), "
        "classified (SR waiting for delivery), sent, skipped (not a frontal chest radiograph), "
        "failed (cannot be decoded or reported), quarantined (the node died or hung on it), "
        "dead (SR refused by the PACS past destination.retry_for)",
    )
    j.set_defaults(func=cmd_jobs)
    return p


def _allow_untrained(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--allow-untrained",
        action="store_true",
        help="override model.allow_untrained (default: model.allow_untrained, else off)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _peer_args(sp: argparse.ArgumentParser, calling_default: str) -> None:
    """The peer's flags: each one overrides ``--config``'s [destination] key (and its
    environment variable), which overrides the default shown."""
    d = PEER_DEFAULTS

    def given(key: str, default: Any) -> str:
        return f"(default: destination.{key} from --config, else {default})"

    sp.add_argument("--host", help=f"the peer's host name or IP {given('host', d['host'])}")
    sp.add_argument("--port", type=int, help=f"the peer's port {given('port', d['port'])}")
    sp.add_argument("--aet", help=f"called AE title {given('ae_title', d['ae_title'])}")
    sp.add_argument("--calling-aet", help=f"our AE title {calling_default}")
    sp.add_argument(
        "--timeout",
        type=float,
        help=f"seconds to connect, associate and wait for each answer "
        f"{given('timeout', d['timeout'])}",
    )
    sp.add_argument(
        "--tls", action="store_true", help="DICOM TLS (default: destination.tls, else off)"
    )
    sp.add_argument(
        "--tls-ca",
        type=Path,
        help="CA file to verify the peer (default: destination.tls_ca_file, else the system's CAs)",
    )
    sp.add_argument(
        "--tls-cert",
        type=Path,
        help="our client certificate (default: destination.tls_cert_file, else none)",
    )
    sp.add_argument(
        "--tls-key", type=Path, help="our client key (default: destination.tls_key_file)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except NodeError as exc:
        sys.stderr.write(f"cxr-node {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `cxr-node status | head -1`: the reader left, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
