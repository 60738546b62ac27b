"""The cyclic garbage collector, paused while any thread builds."""

from __future__ import annotations

import gc
import threading

_paused = 0
_paused_lock = threading.Lock()
_was_enabled = False


class _CollectorPaused:
    """Pauses the cyclic garbage collector while any thread builds; the first build to
    start records whether it was on, and the last one to end turns it back on."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _paused, _was_enabled
        with _paused_lock:
            if _paused == 0:
                _was_enabled = gc.isenabled()
                gc.disable()
            _paused += 1

    def __exit__(self, *exc: object) -> None:
        global _paused
        with _paused_lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()


_COLLECTOR_PAUSED = _CollectorPaused()


def collector_paused() -> _CollectorPaused:
    """A context manager that pauses the cyclic garbage collector while any thread
    builds (see :class:`_CollectorPaused`)."""
    return _COLLECTOR_PAUSED
