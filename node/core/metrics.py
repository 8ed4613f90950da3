"""Prometheus metrics: one registry per node process, passed to whoever records."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class _JobsCollector(Collector):
    """Reads job counts by state from the spool at scrape time (no stale gauges)."""

    def __init__(
        self,
        counts: Callable[[], dict[str, int]],
        notices: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self._counts = counts
        self._notices = notices

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._counts()
        family = GaugeMetricFamily("cxr_node_jobs", "Jobs in the spool by state", labels=["state"])
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family
        yield GaugeMetricFamily(
            "cxr_node_sr_pending",
            "SRs waiting for delivery (jobs classified, not yet sent)",
            value=counts.get("classified", 0),
        )
        if self._notices is not None:
            yield GaugeMetricFamily(
                "cxr_node_notice_pending",
                "Not-analysed notices waiting for delivery",
                value=self._notices().get("pending", 0),
            )


class Metrics:
    """The node's counters and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.associations = Counter(
            "cxr_node_associations", "Associations accepted by the SCP", registry=r
        )
        self.rejected = Counter(
            "cxr_node_associations_rejected",
            "Associations the SCP rejected, by reason (calling_ae_title_not_recognized, "
            "called_ae_title_not_recognized, local_limit_exceeded, ...)",
            ["reason"],
            registry=r,
        )
        self.model_trained = Gauge(
            "cxr_node_model_trained",
            "1 when the published weights are loaded, 0 when the model runs UNTRAINED",
            registry=r,
        )
        self.c_store = Counter(
            "cxr_node_c_store", "C-STORE requests answered, by status", ["status"], registry=r
        )
        self.classified = Counter("cxr_node_images_classified", "Images classified", registry=r)
        self.sr_sent = Counter("cxr_node_sr_sent", "SRs delivered to the destination", registry=r)
        self.sr_send_failures = Counter(
            "cxr_node_sr_send_failures",
            "Failed SR deliveries by kind: connection (destination unreachable: per failed "
            "association or C-ECHO probe; never counts toward dead-lettering) or status (per SR "
            "refused with a C-STORE failure status)",
            ["kind"],
            registry=r,
        )
        self.destination_up = Gauge(
            "cxr_node_destination_up",
            "1 while the destination answers (C-STORE or C-ECHO), 0 while it is unreachable",
            registry=r,
        )
        self.inference_seconds = Histogram(
            "cxr_node_inference_seconds", "Model inference time per image", registry=r
        )
        self.sr_send_seconds = Histogram(
            "cxr_node_sr_send_seconds", "Time to C-STORE one SR", registry=r
        )
        self.catchup_rounds = Counter(
            "cxr_node_catchup_rounds", "Catch-up rounds run (query/retrieve)", registry=r
        )
        self.catchup_fetched = Counter(
            "cxr_node_catchup_fetched", "Instances fetched by the catch-up (C-MOVE)", registry=r
        )
        self.catchup_last_round = Gauge(
            "cxr_node_catchup_last_round_timestamp_seconds",
            "When the last catch-up round started (Unix time; alert when it stops moving)",
            registry=r,
        )
        self.catchup_errors = Counter(
            "cxr_node_catchup_errors",
            "Catch-up errors: failed C-MOVEs and failed rounds",
            registry=r,
        )

    def refused_c_stores(self) -> dict[str, int]:
        """C-STOREs the SCP answered with a status other than success, by status."""
        out: dict[str, int] = {}
        for metric in self.c_store.collect():
            for sample in metric.samples:
                status = sample.labels.get("status", "")
                if sample.name.endswith("_total") and status and status != "0x0000":
                    out[status] = int(sample.value)
        return out

    def watch_jobs(
        self,
        counts: Callable[[], dict[str, int]],
        notices: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        """Job counts by state (and notices by delivery state), read at scrape time."""
        self.registry.register(_JobsCollector(counts, notices))

    def serve(self, address: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP; returns the bound port."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", address, bound)
        return bound
