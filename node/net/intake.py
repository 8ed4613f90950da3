"""Whether the SCP still takes C-STOREs, and how many are being spooled right now: the
second step of a graceful stop (:mod:`node.service`) closes it and waits for them."""

from __future__ import annotations

import threading


class Intake:
    """Whether C-STOREs are still taken, and how many are being spooled right now."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._busy = 0

    def enter(self) -> bool:
        """Begin a C-STORE; False once closing (the caller refuses it)."""
        with self._cond:
            if not self._open:
                return False
            self._busy += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Take no more C-STOREs; wait up to ``timeout`` s for those in progress."""
        with self._cond:
            self._open = False
            return self._cond.wait_for(lambda: self._busy == 0, timeout)
