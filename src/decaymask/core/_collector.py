"""The cyclic garbage collector, paused while a build runs alone in its process."""

from __future__ import annotations

import gc
import threading

_paused = 0
_paused_lock = threading.Lock()
_disabled_here = False


class _CollectorPaused:
    """Pauses the cyclic garbage collector during a build, where that changes nothing
    for anyone else: only where the building thread is the process's only thread, and
    the collector is on. The collector is one switch for the whole process: another
    thread that turned it off (or on) during a build would find it switched back when
    the build ends, so with other threads running it is left alone. The build that
    turned it off turns it back on, once builds nested in it have ended.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        global _paused, _disabled_here
        with _paused_lock:
            if _paused == 0 and threading.active_count() == 1 and gc.isenabled():
                gc.disable()
                _disabled_here = True
            _paused += 1

    def __exit__(self, *exc: object) -> None:
        global _paused, _disabled_here
        with _paused_lock:
            _paused -= 1
            if _paused == 0 and _disabled_here:
                _disabled_here = False
                gc.enable()


_COLLECTOR_PAUSED = _CollectorPaused()


def collector_paused() -> _CollectorPaused:
    """A context manager that pauses the cyclic garbage collector while a build runs
    alone in its process (see :class:`_CollectorPaused`)."""
    return _COLLECTOR_PAUSED
