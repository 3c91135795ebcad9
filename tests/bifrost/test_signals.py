"""Ctrl-C reaches the caller promptly while a synchronous bifrost call waits on its loop thread."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import bifrost._loop as loop_mod
from bifrost import Host


def test_loop_thread_blocks_process_signals() -> None:
    Host("local").exec("true")
    thread = loop_mod._thread
    assert thread is not None and thread.native_id is not None
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    blocked = int(next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16)
    for sig in (signal.SIGINT, signal.SIGTERM):
        assert blocked & (1 << (sig - 1)), f"{sig.name} not blocked in the loop thread"


def test_ctrl_c_interrupts_a_running_exec_at_once() -> None:
    host = Host("local")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        host.exec("sleep 20")
    assert time.monotonic() - started < 10  # not after the command's 20 s
    timer.cancel()


def test_timeout_error_from_a_coroutine_is_raised_not_retried() -> None:
    """In 3.11 builtin TimeoutError is concurrent.futures.TimeoutError: the loop's wait slices
    must not mistake the coroutine's own TimeoutError for an elapsed slice (and spin)."""

    async def boom() -> None:
        raise TimeoutError("from the coroutine")

    result: list[BaseException] = []

    def call() -> None:
        try:
            loop_mod.run_sync(boom())
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "run_sync spun on the coroutine's TimeoutError"
    assert isinstance(result[0], TimeoutError) and "from the coroutine" in str(result[0])
