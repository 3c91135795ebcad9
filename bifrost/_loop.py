"""A private event loop in a daemon thread: bifrost's synchronous facade over asyncssh."""

from __future__ import annotations

import asyncio
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
    finished = threading.Event()
    holder: dict[str, asyncio.Task[T]] = {}

    def _start() -> None:
        task = loop.create_task(coro)
        holder["task"] = task
        task.add_done_callback(lambda _t: finished.set())

    def _cancel() -> None:
        task = holder.get("task")
        if task is not None:
            task.cancel()

    loop.call_soon_threadsafe(_start)
    try:
        # Waiting in slices keeps the main thread returning to the interpreter, so a signal
        # handler runs promptly even on platforms that cannot steer signals to it. The wait is
        # on the task itself, not on a chained future: a TimeoutError raised by the coroutine
        # cannot be mistaken for an elapsed slice.
        while not finished.wait(0.2):
            pass
    except KeyboardInterrupt:
        # Cancel the task and wait until its own cleanup (killing the remote process group,
        # removing a secrets file) has run: cancelling a chained concurrent future returns at
        # once, and the process would exit with that cleanup cut off mid-way.
        loop.call_soon_threadsafe(_cancel)
        finished.wait(5)
        raise
    return holder["task"].result()
