"""Treat SIGTERM and SIGHUP like Ctrl-C, so every exit path runs the same cleanup.

``timeout``, ``docker stop``, a CI cancel and a closed terminal stop a process with SIGTERM or
SIGHUP, whose default action kills it without running ``finally`` blocks or context-manager exits;
a box that was being created or watched would keep billing. Inside :func:`interrupts_as_keyboard`
both signals raise :class:`KeyboardInterrupt` in the main thread instead, so the code that already
cleans up after Ctrl-C (terminate and confirm) runs for them too.

The library itself never installs handlers behind a caller's back: scripts that want this wrap
their work in the context manager (the ``broker`` CLI does for every command that can leave a box).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

#: Signals handled like Ctrl-C (SIGHUP does not exist on Windows).
HANDLED: tuple[int, ...] = tuple(
    int(s) for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s
)


class SignalInterrupt(KeyboardInterrupt):
    """A KeyboardInterrupt raised because the process received SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


@contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`SignalInterrupt` (a KeyboardInterrupt).

    A no-op outside the main thread (Python only delivers signals there). The previous handlers
    are restored on exit. While cleanup runs after the first signal, further signals are ignored
    so that a second ``kill`` cannot cut the terminate short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    fired = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired.is_set():
            return
        fired.set()
        raise SignalInterrupt(signum)

    for sig in HANDLED:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def exit_code(exc: BaseException) -> int:
    """The conventional exit status for an interrupt: 128 + the signal number (130 for Ctrl-C)."""
    if isinstance(exc, SignalInterrupt):
        return 128 + exc.signum
    return 130
