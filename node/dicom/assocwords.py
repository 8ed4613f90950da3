"""Association failures in words, the same on both sides of the node (PS3.8 9.3.4, 7.1.1.9).

Pure functions: values in, one line out. The SCU (echo, push, SR delivery, catch-up) says why
it could not associate; the SCP's log says why it rejected a peer, with the same wording.
"""

from __future__ import annotations

import errno
from typing import Final

RESULTS: Final = {1: "permanent", 2: "transient"}
SOURCES: Final = {
    1: "the service user",
    2: "the service provider (ACSE)",
    3: "the service provider (presentation)",
}
REASONS: Final = {  # (source, diagnostic) -> (in words, the metric's label)
    (1, 1): ("no reason given", "no_reason_given"),
    (1, 2): ("application context name not supported", "application_context_not_supported"),
    (1, 3): ("calling AE title not recognised", "calling_ae_title_not_recognized"),
    (1, 7): ("called AE title not recognised", "called_ae_title_not_recognized"),
    (2, 1): ("no reason given", "no_reason_given"),
    (2, 2): ("protocol version not supported", "protocol_version_not_supported"),
    (3, 1): ("temporary congestion", "temporary_congestion"),
    (3, 2): ("local limit exceeded", "local_limit_exceeded"),
}


def rejection(result: int | None, source: int | None, reason: int | None) -> str:
    """An A-ASSOCIATE-RJ in words: "rejected (permanent) by the service user: called AE
    title not recognised"."""
    how = RESULTS.get(result or 0, f"result {result}")
    who = SOURCES.get(source or 0, f"source {source}")
    why = REASONS.get((source or 0, reason or 0), (f"reason {reason}", ""))[0]
    return f"rejected ({how}) by {who}: {why}"


def reason_label(source: int | None, reason: int | None) -> str:
    """A rejection's reason as a metric label (``other`` for an unlisted pair)."""
    return REASONS.get((source or 0, reason or 0), ("", "other"))[1]


def titles(calling: str, called: str) -> str:
    """Both AE titles of an association request."""
    return f"calling AE {calling.strip()}, called AE {called.strip()}"


def connect_failure(exc: OSError | None, address: str, timeout: float) -> str:
    """Why a TCP connection to ``address`` ("host:port") failed."""
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {address} (nothing listening on that port?)"
    if isinstance(exc, TimeoutError):
        return f"no answer from {address} within {timeout:g} s (host down or port filtered?)"
    if exc is None:
        return f"cannot connect to {address}"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"no route to {address}: {exc.strerror}"
    return f"cannot connect to {address}: {exc.strerror or exc}"


def no_answer(address: str, timeout: float) -> str:
    """The peer took the connection but never answered the association request."""
    return f"no answer to the association request from {address} within {timeout:g} s"


def aborted(address: str) -> str:
    """The peer aborted (A-ABORT) or closed the connection during the association request."""
    return f"association aborted by {address} (A-ABORT or connection closed)"


def unknown_host(host: str, exc: OSError) -> str:
    """The peer's host name could not be looked up."""
    return f"cannot resolve the host name {host!r}: {exc.strerror or exc}"
