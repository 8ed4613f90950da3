"""The node as one object: the spool, the worker, the delivery, the SCP and the metrics,
wired from the configuration, with ``start``, ``stop`` and ``check`` (``cxr-node serve`` is a
thin shell around it; tests run it in-process).

Stopping is graceful, in an order that never loses or half-answers an image:

1. the listening socket is closed (no new connections);
2. C-STOREs are refused from now on (0xA700, out of resources: the sender keeps the image),
   and those being spooled are waited for (:class:`node.net.intake.Intake`);
3. the open associations are aborted (pynetdicom's ``shutdown`` leaves them, and their
   threads, running), and their threads waited for;
4. the worker finishes its batch, and the delivery its SR round;
5. only then is the job store closed: nothing answers from a closed database.

All of it within ``worker.shutdown_timeout``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from node.core.errors import NodeError
from node.net.intake import Intake

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

    from node.analysis.model import Classifier
    from node.core.config import NodeConfig
    from node.core.metrics import Metrics
    from node.jobs.catchup import CatchUp
    from node.jobs.delivery import Delivery, Destination
    from node.jobs.watchdog import HangWatchdog
    from node.jobs.worker import Worker
    from node.store.spool import Spool

log = logging.getLogger(__name__)


class NodeService:
    """Everything ``serve`` runs. ``start`` returns the SCP's port."""

    def __init__(
        self, cfg: NodeConfig, classifier: Classifier, destination: Destination, spool: Spool
    ) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.destination = destination
        self.spool = spool
        self.intake = Intake()
        self.stopping = threading.Event()
        self.metrics: Metrics | None = None
        self.metrics_port: int | None = None
        self.server: ThreadedAssociationServer | None = None
        self.worker: Worker | None = None
        self._watchdog: HangWatchdog | None = None
        self._thread: threading.Thread | None = None
        self.delivery: Delivery | None = None
        self._delivery_thread: threading.Thread | None = None
        self.catchup: CatchUp | None = None
        self._catchup_thread: threading.Thread | None = None

    def start(self) -> int:
        from node.core.metrics import Metrics
        from node.jobs.delivery import Delivery
        from node.jobs.watchdog import HangWatchdog
        from node.jobs.worker import Worker
        from node.net.scp import start_server

        cfg = self.cfg
        self.metrics = Metrics()
        self.metrics.watch_jobs(self.spool.counts, self.spool.notice_counts)
        self.metrics.model_trained.set(1 if self.classifier.info.trained else 0)
        if cfg.metrics.enabled:
            self.metrics_port = self.metrics.serve(cfg.metrics.bind_address, cfg.metrics.port)
        self._watchdog = HangWatchdog(self.spool.root, cfg.worker.image_timeout)
        self.worker = Worker(
            self.spool,
            self.classifier,
            cfg,
            metrics=self.metrics,
            watchdog=self._watchdog,
        )
        self.delivery = Delivery(self.spool, cfg, self.destination, metrics=self.metrics)
        self.server = start_server(
            cfg.scp, self.spool, self.metrics, cfg.tls, self.intake, cfg.network.fast_paths
        )
        self._thread = threading.Thread(
            target=self.worker.run, args=(self.stopping,), name="worker", daemon=True
        )
        self._thread.start()
        self._delivery_thread = threading.Thread(
            target=self.delivery.run, args=(self.stopping,), name="delivery", daemon=True
        )
        self._delivery_thread.start()
        self._start_catchup()
        return int(self.server.server_address[1])

    def _start_catchup(self) -> None:
        """Query/retrieve what the PACS holds and the node never received (node/jobs/catchup.py)."""
        from node.jobs.catchup import CatchUp

        if not self.cfg.catchup.enabled:
            log.info("catch-up disabled (catchup.enabled = false)")
            return
        self.catchup = CatchUp(self.cfg, self.spool, self.metrics)
        self._warn_if_peer_refused(self.catchup.peer.ae_title)
        self._catchup_thread = threading.Thread(
            target=self.catchup.run, args=(self.stopping,), name="catchup", daemon=True
        )
        self._catchup_thread.start()

    def _warn_if_peer_refused(self, pacs: str) -> None:
        scp = self.cfg.scp
        if not scp.accept_any_calling_aet and pacs not in scp.allowed_calling_aets:
            log.warning(
                "catch-up: the PACS %s is not in scp.allowed_calling_aets: the images it "
                "moves to the node will be refused",
                pacs,
            )

    def check(self) -> None:
        """Raise :class:`NodeError` if a part has died (a bug: a supervisor restarts us)."""
        for name, thread in self._threads():
            if not thread.is_alive() and not self.stopping.is_set():
                raise NodeError(f"the {name} thread died; exiting (see the log above)")

    def _threads(self) -> list[tuple[str, threading.Thread]]:
        named = (
            ("worker", self._thread),
            ("delivery", self._delivery_thread),
            ("catch-up", self._catchup_thread),
        )
        return [(name, thread) for name, thread in named if thread is not None]

    def stop(self) -> None:
        """Stop gracefully (see the module docstring) within ``worker.shutdown_timeout``."""
        deadline = time.monotonic() + self.cfg.worker.shutdown_timeout
        self.stopping.set()  # the worker ends after its batch, the delivery after its SR
        if self.server is not None:
            self.server.shutdown()  # closes the listening socket only

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if not self.intake.close(min(5.0, left())):
            log.warning("C-STOREs still being spooled at shutdown: their peers get no answer")
        if self.catchup is not None:
            self.catchup.interrupt()  # its C-FIND/C-MOVE need not run to their timeout
        self._end_associations(left)
        for name, thread in self._threads():  # the worker finishes its batch first
            thread.join(left())
            if thread.is_alive():
                log.warning("the %s thread did not end within worker.shutdown_timeout", name)
        if self._watchdog is not None:
            self._watchdog.close()
        self.spool.close()

    def _end_associations(self, left: Callable[[], float]) -> None:
        if self.server is None:
            return
        open_ = [a for a in self.server.active_associations if a.is_alive()]
        if open_:
            log.info("aborting %d open association(s)", len(open_))
        for assoc in open_:
            assoc.abort()
        for assoc in open_:
            assoc.join(min(2.0, left()))
