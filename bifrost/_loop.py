"""A private event loop in a daemon thread: bifrost's synchronous facade over asyncssh."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    """Return the shared background loop, starting it on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def _run() -> None:
                # The kernel may deliver a process signal to any thread that does not block it;
                # one landing here would leave the main thread waiting, deaf to Ctrl-C, until
                # the current call ends. Blocking them here sends them to the main thread.
                if hasattr(signal, "pthread_sigmask"):
                    signal.pthread_sigmask(
                        signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
                    )
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=_run, name="bifrost-loop", daemon=True)
            thread.start()
            ready.wait()
            _loop, _thread = loop, thread
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and block until it finishes.

    Ctrl-C in the calling thread cancels the coroutine, so remote cleanup in ``finally`` blocks
    gets a chance to run.
    """
    loop = get_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("bifrost's synchronous API was called from its own event loop thread")
    fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        # Waiting in slices keeps the main thread returning to the interpreter, so a signal
        # handler runs promptly even on platforms that cannot steer signals to it.
        # In 3.11 the builtin TimeoutError *is* concurrent.futures.TimeoutError, so a
        # coroutine that raises TimeoutError looks exactly like an elapsed slice; only
        # ``done()`` tells them apart (a done future re-raises its own error below).
        while not fut.done():
            concurrent.futures.wait([fut], timeout=0.2)
        return fut.result()
    except KeyboardInterrupt:
        fut.cancel()
        with contextlib.suppress(BaseException):  # already unwinding a Ctrl-C
            fut.result(timeout=5)
        raise
