"""The guard of the network fast paths: whether the installed pynetdicom is the one they
were written for.

The fast paths (``netopts``, with ``sendnow``, ``receive`` and ``cstore`` of this package;
``node.net.scp.CheapCopyContext``) replace or call pynetdicom 3.0 internals; ``uidmemo``
replaces pydicom's and pynetdicom's UID checks with remembered ones (its own
:func:`node.net.fast.uidmemo.problems` are part of :func:`problems`).
``network.fast_paths = true`` installs them only where :func:`problems` finds nothing: a
pynetdicom 3.0.x whose every private name they patch or call is there, methods with the
parameters they were written against. Anything else turns them off with one WARNING line
naming the version, and the node serves and sends with stock pynetdicom
(:func:`node.net.fast.sockopts.plain_socket` only). tests/net/fast/test_fastpaths.py checks
the installed pynetdicom against these lists, and that the lists name every private name
the fast paths' code uses: a pynetdicom upgrade fails there, loudly, rather than in the node.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

from node.net.fast import uidmemo

log = logging.getLogger(__name__)

TESTED: Final = "3.0"
"""The pynetdicom release series (major.minor) the fast paths were written and tested on."""

METHODS: Final = (
    # (class, method, its parameters without annotations, as inspect.signature shows them)
    ("pynetdicom.association.Association", "_run_reactor", "(self)"),
    ("pynetdicom.association.Association", "_serve_request", "(self, msg, context_id)"),
    ("pynetdicom.association.Association", "get_handlers", "(self, event)"),
    ("pynetdicom.association.Association", "abort", "(self, block=True)"),
    ("pynetdicom.association.Association", "kill", "(self)"),
    ("pynetdicom.acse.ACSE", "is_release_requested", "(self)"),
    ("pynetdicom.acse.ACSE", "send_release", "(self, is_response=False)"),
    ("pynetdicom.acse.ACSE", "is_aborted", "(self, abort_type='both')"),
    ("pynetdicom.dul.DULServiceProvider", "run_reactor", "(self)"),
    ("pynetdicom.dul.DULServiceProvider", "_is_transport_event", "(self)"),
    ("pynetdicom.dul.DULServiceProvider", "_read_pdu_data", "(self)"),
    ("pynetdicom.dul.DULServiceProvider", "_decode_pdu", "(self, bytestream)"),
    ("pynetdicom.dul.DULServiceProvider", "kill_dul", "(self)"),
    ("pynetdicom.dul.DULServiceProvider", "stop_dul", "(self)"),
    ("pynetdicom.dul.DULServiceProvider", "send_pdu", "(self, primitive)"),
    ("pynetdicom.dul.DULServiceProvider", "receive_pdu", "(self, wait=False, timeout=None)"),
    ("pynetdicom.dul.DULServiceProvider", "idle_timer_expired", "(self)"),
    ("pynetdicom.dimse.DIMSEServiceProvider", "send_msg", "(self, primitive, context_id)"),
    ("pynetdicom.dimse.DIMSEServiceProvider", "receive_primitive", "(self, primitive)"),
    ("pynetdicom.fsm.StateMachine", "do_action", "(self, event)"),
    ("pynetdicom.transport.AssociationSocket", "ready", "property"),
    ("pynetdicom.transport.AssociationSocket", "recv", "(self, nr_bytes)"),
    ("pynetdicom.transport.AssociationSocket", "send", "(self, bytestream)"),
    ("pynetdicom.transport.AssociationSocket", "close", "(self)"),
    ("pynetdicom.transport.AssociationSocket", "_shutdown_socket", "(self)"),
    ("pynetdicom.pdu.P_DATA_TF", "_wrap_generate_items", "(self, bytestream)"),
    ("pynetdicom.timer.Timer", "restart", "(self)"),
)

ASSOCIATION_ATTRIBUTES: Final = (
    # on a new (requestor) association, as dotted paths from it
    "_reactor_checkpoint",
    "_is_paused",
    "_kill",
    "is_established",
    "is_released",
    "is_aborted",
    "is_acceptor",
    "network_timeout",
    "acse",
    "acceptor.maximum_length",
    "requestor.maximum_length",
    "dimse.assoc",
    "dimse.dul",
    "dimse.message",
    "dimse.msg_queue",
    "dimse.maximum_pdu_size",
    "dul.assoc",
    "dul.socket",
    "dul.event_queue",
    "dul.to_provider_queue",
    "dul._kill_thread",
    "dul._run_loop_delay",
    "dul._recv_pdu",
    "dul._idle_timer",
    "dul.state_machine.current_state",
)

SOCKET_ATTRIBUTES: Final = ("socket", "_is_connected", "event_queue", "assoc")
"""On an ``AssociationSocket`` wrapping a connected socket (as the SCP's are)."""

OTHER_ATTRIBUTES: Final = (
    # (module or class, attribute); a class's instance attributes on a new instance
    ("pynetdicom._config", "STORE_RECV_CHUNKED_DATASET"),
    ("pynetdicom", "_config"),  # uidmemo: its VALIDATORS and ENFORCE_UID_CONFORMANCE
    ("pynetdicom._config", "VALIDATORS"),
    ("pynetdicom._config", "ENFORCE_UID_CONFORMANCE"),
    ("pynetdicom.dimse_primitives.C_STORE", "_context_id"),
    ("pynetdicom.pdu_primitives.P_DATA", "presentation_data_value_list"),
    ("pynetdicom.presentation.PresentationContext", "_transfer_syntax"),
)


def version() -> str:
    """The installed pynetdicom's version ("?" where it does not say)."""
    import pynetdicom

    return str(getattr(pynetdicom, "__version__", "?"))


def problems() -> list[str]:
    """What keeps the fast paths off: the installed pynetdicom outside :data:`TESTED`, or
    a private name they patch or call missing or with other parameters (one entry each;
    empty when they may be installed)."""
    found = []
    current = version()
    if current.split(".")[:2] != TESTED.split("."):
        found.append(f"version {current} is not {TESTED}.x")
    for where, name, parameters in METHODS:
        found += _method_problem(where, name, parameters)
    found += _attribute_problems()
    found += uidmemo.problems()
    return found


def usable() -> bool:
    """Whether the fast paths may be installed (:func:`problems` finds nothing); logs one
    WARNING line, naming the version and what differs, where they may not."""
    found = problems()
    if found:
        log.warning(
            "pynetdicom %s: network fast paths off, stock pynetdicom used (they were written "
            "for pynetdicom %s.x): %s",
            version(),
            TESTED,
            "; ".join(found),
        )
    return not found


def resolve(requested: bool) -> bool:
    """The ``network.fast_paths`` to use: ``requested`` where :func:`usable`, else False."""
    if not requested:
        log.debug("network fast paths off (network.fast_paths = false): stock pynetdicom")
        return False
    return usable()


def signature(func: Callable[..., Any]) -> str:
    """``func``'s parameters without annotations, "(self, wait=False, timeout=None)"."""
    sig = inspect.signature(func)
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def _resolve(dotted: str) -> Any:
    """The module, or the class (or other attribute) of a module, that ``dotted`` names."""
    module, _, attribute = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ImportError:
        return getattr(importlib.import_module(module), attribute)


def _method_problem(where: str, name: str, parameters: str) -> list[str]:
    label = f"{where.rpartition('.')[2]}.{name}"
    try:
        owner = _resolve(where)
        found = inspect.getattr_static(owner, name)
    except (ImportError, AttributeError):
        return [f"{label} is missing"]
    if parameters == "property":
        return [] if isinstance(found, property) else [f"{label} is no longer a property"]
    if not callable(found):
        return [f"{label} is not a method"]
    try:
        actual = signature(found)
    except (TypeError, ValueError) as exc:  # no signature to read
        return [f"{label}: {exc}"]
    return [] if actual == parameters else [f"{label}{actual} instead of {parameters}"]


def _attribute_problems() -> list[str]:
    """The attributes of :data:`ASSOCIATION_ATTRIBUTES`, :data:`SOCKET_ATTRIBUTES` and
    :data:`OTHER_ATTRIBUTES` that are missing, on new objects that start nothing."""
    try:
        assoc, wrapper, ends = _specimens()
    except Exception as exc:  # an unknown pynetdicom: whatever it raises, the guard says it
        return [f"cannot make an association to inspect: {type(exc).__name__}: {exc}"]
    try:
        found = [
            f"Association.{p} is missing" for p in ASSOCIATION_ATTRIBUTES if not _has(assoc, p)
        ]
        found += [
            f"AssociationSocket.{n} is missing" for n in SOCKET_ATTRIBUTES if not _has(wrapper, n)
        ]
    finally:
        for end in ends:
            end.close()
    for where, name in OTHER_ATTRIBUTES:
        try:
            owner = _resolve(where)
            present = _has(owner() if inspect.isclass(owner) else owner, name)
        except Exception:  # as above: an import or a constructor that changed
            present = False
        if not present:
            found.append(f"{where.rpartition('.')[2]}.{name} is missing")
    return found


def _specimens() -> tuple[Any, Any, tuple[socket.socket, socket.socket]]:
    """A new requestor association (its threads not started) and an ``AssociationSocket``
    of it around one end of a socket pair (both ends returned, to be closed)."""
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.transport import AssociationSocket

    assoc = Association(AE(), "requestor")
    ends = socket.socketpair()
    try:
        wrapper = AssociationSocket(assoc, client_socket=ends[0])
    except Exception:
        for end in ends:
            end.close()
        raise
    return assoc, wrapper, ends


def _has(obj: Any, dotted: str) -> bool:
    """Whether ``obj`` has the attribute at ``dotted`` (the last one looked up without
    running a property)."""
    *path, last = dotted.split(".")
    try:
        for name in path:
            obj = getattr(obj, name)
        inspect.getattr_static(obj, last)
    except AttributeError:
        return False
    return True
