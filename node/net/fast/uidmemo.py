"""UID checks remembered: an association request checked in a third of the time.

pynetdicom 3.0 makes a pydicom ``UID`` of every abstract and transfer syntax of an
A-ASSOCIATE-RQ, several times over while it decodes and negotiates it, and checks each
one three ways with a regular expression every time: pydicom's ``UID()`` runs pydicom's
``VALIDATORS["UI"]``, pynetdicom's ``set_uid`` runs ``pynetdicom._config.VALIDATORS["UI"]``
(which makes yet another ``UID``), and both ask ``UID.is_valid``. Orthanc's route and
dcmtk's storescu propose 128 presentation contexts of ~3 transfer syntaxes in every
association, Orthanc's route opens one association per image: ~1,900 UIDs and ~15 ms of
CPU per image before the image's first byte (bench/RESULTS.md, "Association requests").

Each of the three answers depends on the UID's text alone (and, for pynetdicom's, on
``_config.ENFORCE_UID_CONFORMANCE``), so :func:`remember_uid_checks` keeps the last
:data:`MEMO_SIZE` answers (texts of at most 64 characters: a longer one is never a valid
UID, is checked as before and not kept, so that a peer's junk cannot fill the memory).
Whatever is checked gives the answer it gave before: only the repeated regular
expressions go. Installed with the other fast paths (``network.fast_paths``) and guarded
with them (:data:`CHECKED`, :func:`problems`); :func:`forget_uid_checks` puts the
library's own checks back.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

MEMO_SIZE: Final = 4096
"""Answers kept per check: every UID the storage SOP classes and transfer syntaxes use
fits many times over."""

MAX_LENGTH: Final = 64
"""The longest valid UID (PS3.5 9.1); longer texts are checked each time, not kept."""

CHECKED: Final = (
    # (what, the parameters of the function replaced, as inspect.signature shows them)
    ("pydicom.valuerep.VALIDATORS['UI']", "(vr, value)"),
    ("pynetdicom._config.VALIDATORS['UI']", "(value)"),
    ("pydicom.uid.UID.is_valid", "property"),
)

_MARK: Final = "_cxr_node_remembered"
"""Set on the replacements: what they replaced, for :func:`forget_uid_checks`."""


def problems() -> list[str]:
    """What keeps :func:`remember_uid_checks` from being installed (empty: nothing)."""
    import pydicom.valuerep
    from pydicom.uid import UID
    from pynetdicom import _config

    found = []
    checks = (pydicom.valuerep.VALIDATORS.get("UI"), _config.VALIDATORS.get("UI"))
    for (name, parameters), check in zip(CHECKED[:2], checks, strict=True):
        check = getattr(check, _MARK, check)  # installed: the one it replaced
        if not callable(check):
            found.append(f"{name} is missing")
        elif _parameters(check) != parameters:
            found.append(f"{name}{_parameters(check)} instead of {parameters}")
    if not isinstance(inspect.getattr_static(UID, "is_valid", None), property):
        found.append(f"{CHECKED[2][0]} is not a property")
    return found


def _parameters(func: Callable[..., Any]) -> str:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return "(?)"
    return "(" + ", ".join(sig.parameters) + ")"


def remember_uid_checks() -> bool:
    """Install the remembered checks (once per process; again only after
    :func:`forget_uid_checks`). Returns whether they are installed."""
    import pydicom.valuerep
    from pydicom.uid import UID
    from pynetdicom import _config

    if hasattr(_config.VALIDATORS["UI"], _MARK):
        return True
    found = problems()
    if found:
        log.warning(
            "UID checks not remembered (a pydicom or pynetdicom they were not written for): %s",
            "; ".join(found),
        )
        return False
    pydicom.valuerep.VALIDATORS["UI"] = _remembered_pydicom(pydicom.valuerep.VALIDATORS["UI"])
    _config.VALIDATORS["UI"] = _remembered_pynetdicom(_config.VALIDATORS["UI"])
    setattr(UID, "is_valid", _remembered_is_valid(inspect.getattr_static(UID, "is_valid")))  # noqa: B010
    return True


def forget_uid_checks() -> None:
    """Put pydicom's and pynetdicom's own checks back (where installed)."""
    import pydicom.valuerep
    from pydicom.uid import UID
    from pynetdicom import _config

    theirs = pydicom.valuerep.VALIDATORS
    theirs["UI"] = getattr(theirs["UI"], _MARK, theirs["UI"])
    _config.VALIDATORS["UI"] = getattr(_config.VALIDATORS["UI"], _MARK, _config.VALIDATORS["UI"])
    current = inspect.getattr_static(UID, "is_valid")
    setattr(UID, "is_valid", getattr(current.fget, _MARK, current))  # noqa: B010


def _remembered_pydicom(
    check: Callable[[str, Any], tuple[bool, str]],
) -> Callable[[str, Any], tuple[bool, str]]:
    kept = functools.lru_cache(maxsize=MEMO_SIZE)(check)

    def validate(vr: str, value: Any) -> tuple[bool, str]:
        if isinstance(value, str) and len(value) <= MAX_LENGTH:
            return kept(vr, value)
        return check(vr, value)

    setattr(validate, _MARK, check)
    return validate


def _remembered_pynetdicom(
    check: Callable[[Any], tuple[bool, str]],
) -> Callable[[Any], tuple[bool, str]]:
    from pynetdicom import _config

    @functools.lru_cache(maxsize=MEMO_SIZE)
    def kept(value: str, _enforced: bool) -> tuple[bool, str]:
        return check(value)

    def validate_ui(value: Any) -> tuple[bool, str]:
        if isinstance(value, str) and len(value) <= MAX_LENGTH:
            return kept(value, _config.ENFORCE_UID_CONFORMANCE)
        return check(value)

    setattr(validate_ui, _MARK, check)
    return validate_ui


def _remembered_is_valid(original: property) -> property:
    test = original.fget
    assert test is not None
    kept = functools.lru_cache(maxsize=MEMO_SIZE)(test)

    def is_valid(self: str) -> bool:
        return bool(kept(self)) if len(self) <= MAX_LENGTH else bool(test(self))

    setattr(is_valid, _MARK, original)
    return property(is_valid, doc=original.__doc__)
