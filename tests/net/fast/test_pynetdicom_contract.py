"""The pynetdicom internals the node relies on, checked against the installed pynetdicom.

A pynetdicom upgrade that renames, removes or re-signs any of them fails here, by name:
those of the fast paths (node.net.fast.fastpaths's lists, which turn the fast paths off at run time
where they differ), and those used with or without them (below: nothing can turn those
off, so this is their only guard)."""

from __future__ import annotations

import inspect
import re

import pynetdicom
import pytest
from helpers import ROOT
from pynetdicom.pdu import P_DATA_TF

from node.net.fast import fastpaths
from node.net.fast.fastpaths import signature
from node.net.scp import CheapCopyContext

ALWAYS_METHODS = (
    # node.net.scu: the SCU's own C-STORE of encoded bytes (send_raw) and its failed-connect record
    ("pynetdicom.ae.ApplicationEntity", "_create_socket", "(self, assoc, address, tls_args)"),
    (
        "pynetdicom.association.Association",
        "_get_valid_context",
        "(self, ab_syntax, tr_syntax, role=None, context_id=None, allow_conversion=True)",
    ),
    ("pynetdicom.association.Association", "_handle_no_response", "(self)"),
    ("pynetdicom.association.Association", "_check_received_status", "(self, rsp)"),
    # node.net.scp: the server class and the gate's hooks (node.gate)
    (
        "pynetdicom.ae.ApplicationEntity",
        "make_server",
        "(self, address, ae_title=None, contexts=None, ssl_context=None, evt_handlers=None, "
        "server_class=None, **kwargs)",
    ),
    (
        "pynetdicom.transport.ThreadedAssociationServer",
        "process_request_thread",
        "(self, request, client_address)",
    ),
    ("pynetdicom.transport.ThreadedAssociationServer", "get_request", "(self)"),
    (
        "pynetdicom.transport.ThreadedAssociationServer",
        "verify_request",
        "(self, request, client_address)",
    ),
    ("pynetdicom.transport.ThreadedAssociationServer", "shutdown_request", "(self, request)"),
    # node.net.fast.sockopts: the SCP's sockets close where pynetdicom's shutdown fails
    ("pynetdicom.transport.AssociationSocket", "_shutdown_socket", "(self)"),
)
ALWAYS_ATTRIBUTES = (
    # on a new association: node.net.scu's pause of the reactor and its reading of aborts
    "_reactor_checkpoint",
    "_is_paused",
    "_sent_abort",
    "dimse.msg_queue",
)
FAST_PATH_MODULES = ("netopts.py", "sendnow.py", "receive.py", "cstore.py", "uidmemo.py")
_PRIVATE = re.compile(r"(?<![\w.])(?!self\b)[A-Za-z_]\w*(?:\.\w+)*\.(_[a-z]\w*)")


def test_the_installed_pynetdicom_is_the_one_the_fast_paths_were_written_for():
    assert fastpaths.problems() == []
    assert pynetdicom.__version__.startswith(f"{fastpaths.TESTED}.")


@pytest.mark.parametrize(("where", "name", "parameters"), ALWAYS_METHODS)
def test_the_internals_used_without_a_switch_are_there(where, name, parameters):
    module, _, cls = where.rpartition(".")
    owner = getattr(__import__(module, fromlist=[cls]), cls)
    assert signature(inspect.getattr_static(owner, name)) == parameters


def test_the_attributes_used_without_a_switch_are_there():
    assoc, _, ends = fastpaths._specimens()
    for end in ends:
        end.close()
    missing = [p for p in ALWAYS_ATTRIBUTES if not fastpaths._has(assoc, p)]
    assert missing == []
    assert fastpaths._has(
        pynetdicom._config, "LOG_HANDLER_LEVEL"
    )  # node.net.fast.netopts.quiet_pynetdicom


def _private_names(source: str) -> set[str]:
    """``_name`` in ``obj._name`` (not ``self._name``) and in ``_config.NAME``."""
    found = {m.group(1) for m in _PRIVATE.finditer(source)}
    return found | set(re.findall(r"\b_config\.([A-Z_]+)\b", source))


def test_the_guard_names_every_private_name_the_fast_paths_use():
    """Each ``obj._name`` in the fast paths' code (and CheapCopyContext's) is in
    node.net.fast.fastpaths's lists: a new one must be added there, so that the guard checks it."""
    sources = [(ROOT / "node" / "net" / "fast" / name).read_text() for name in FAST_PATH_MODULES]
    sources.append(inspect.getsource(CheapCopyContext))
    used = set().union(*map(_private_names, sources))
    listed = {name for _, name, _ in fastpaths.METHODS}
    listed |= {path.rpartition(".")[2] for path in fastpaths.ASSOCIATION_ATTRIBUTES}
    listed |= set(fastpaths.SOCKET_ATTRIBUTES)
    listed |= {name for _, name in fastpaths.OTHER_ATTRIBUTES}
    listed.add("LOG_HANDLER_LEVEL")  # quiet_pynetdicom: with or without the fast paths
    assert used - listed == set()
    assert {"_read_pdu_data", "_kill_thread", "_transfer_syntax"} <= used  # the scan works


def test_the_guard_finds_a_changed_signature_a_missing_name_and_another_version(monkeypatch):
    def _wrap_generate_items(self, bytestream, start=0):  # type: ignore[no-untyped-def]
        return []

    monkeypatch.setattr(P_DATA_TF, "_wrap_generate_items", _wrap_generate_items)
    gone = ("pynetdicom.dul.DULServiceProvider", "_gone", "(self)")  # a name no longer there
    monkeypatch.setattr(fastpaths, "METHODS", (*fastpaths.METHODS, gone))
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert fastpaths.problems() == [
        "version 3.1.0 is not 3.0.x",
        "P_DATA_TF._wrap_generate_items(self, bytestream, start=0) instead of (self, bytestream)",
        "DULServiceProvider._gone is missing",
    ]
    monkeypatch.setattr(pynetdicom, "__version__", "3.0.99")
    assert "version" not in " ".join(fastpaths.problems())
