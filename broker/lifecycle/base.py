"""Shared pieces of the lifecycle: the client protocol, TTLs, owners, deadlines and polling.

Nothing here imports :mod:`broker.client`: the lifecycle works on anything shaped like
:class:`LifecycleClient` (``GPUClient`` is one), which keeps the import graph one-way
(client → lifecycle).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.journal import Journal
    from broker.providers.base import Provider

ProgressFn = Callable[[str, str], None]
"""``on_progress(stage, detail)``: called whenever readiness moves on or has news."""


class LifecycleClient(Protocol):
    """What the lifecycle needs from a client (``GPUClient`` provides it)."""

    settings: Settings

    @property
    def journal(self) -> Journal: ...

    def get_provider(self, name: str) -> Provider: ...

    def provider_names(self) -> list[str]: ...


class Stage(StrEnum):
    """Readiness stages, in order."""

    PROVIDER = "provider"
    ENDPOINT = "endpoint"
    TCP = "tcp"
    LOGIN = "login"
    PROBE = "probe"
    READY = "ready"


# -- TTL ------------------------------------------------------------------------------------------

_TTL_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(ttl: str | float | None) -> int | None:
    """``"3h"``, ``"90m"``, ``"1h30m"``, ``"2d"`` or seconds as a number → whole seconds.

    A TTL below one minute or an unreadable one is refused with the accepted forms in the error.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool):
        raise ConfigError(f"ttl must be a duration like '3h', not {ttl!r}")
    if isinstance(ttl, int | float):
        seconds = float(ttl)
    else:
        text = ttl.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for m in _TTL_PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNIT[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ConfigError(
                    f"cannot read ttl {ttl!r}: use a duration like '45m', '3h', '1h30m' or '2d'"
                )
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ConfigError(f"ttl {ttl!r} is not a duration; use e.g. '3h'")
    if seconds < 60:
        raise ConfigError(f"ttl {ttl!r} is shorter than one minute; use at least '1m'")
    if seconds > 365 * 86400:
        raise ConfigError(f"ttl {ttl!r} is longer than a year; use at most '365d'")
    return int(seconds)


def format_duration(seconds: float) -> str:
    """``3725`` → ``1h02m``; negative durations get a leading minus."""
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m"
    if s < 86400:
        return f"{sign}{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{sign}{s // 86400}d{(s % 86400) // 3600:02d}h"


# -- owners ---------------------------------------------------------------------------------------


def _proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) follows the command name, which may itself contain spaces or ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _host_id() -> str:
    # Containers sharing a hostname (host networking) have their own pid tables: the pid
    # namespace tells them apart, so one never judges another's pids.
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}/{ns}"


def current_owner() -> str:
    """This process as an owner string: ``host/pidns:pid:starttime``."""
    pid = os.getpid()
    return f"{_host_id()}:{pid}:{_proc_start(pid) or '?'}"


#: Owner of an entry its process gave up on (a cleanup that failed, an unanswered create):
#: nobody holds it, so ``reconcile`` terminates the instance as soon as it sees it.
ABANDONED = "abandoned"


def owner_alive(owner: str | None) -> bool | None:
    """Whether the owning process still runs: True/False on this host, None when unknown."""
    if not owner:
        return None
    if owner == ABANDONED:
        return False
    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return None
    if host != _host_id():
        return None
    now_start = _proc_start(pid)
    if now_start is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return start == "?"
    return start in ("?", now_start)


# -- deadlines and polling ------------------------------------------------------------------------


class Deadline:
    """One deadline shared by several steps (monotonic clock)."""

    def __init__(self, timeout: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + timeout

    @property
    def left(self) -> float:
        """Seconds left (negative once past)."""
        return self.end - time.monotonic()

    @property
    def elapsed(self) -> float:
        """Seconds since the deadline was set."""
        return time.monotonic() - self.start


T = TypeVar("T")


class Retry:
    """Returned by a :func:`poll` step to say "not yet", with what to report meanwhile."""

    def __init__(self, detail: str) -> None:
        self.detail = detail


def poll(
    step: Callable[[], T | Retry],
    deadline: Deadline,
    *,
    on_wait: Callable[[str], None] | None = None,
    on_timeout: Callable[[str], BaseException],
    first_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """Call ``step`` until it returns a value (not :class:`Retry`) or the deadline passes.

    The one retry loop of the lifecycle: readiness stages and terminate confirmation all use
    it. Delays grow by half each time up to ``max_delay`` and never sleep past the deadline.
    ``on_timeout(last detail)`` builds the exception raised at the deadline.
    """
    delay = first_delay
    last = ""
    while True:
        got = step()
        if not isinstance(got, Retry):
            return got
        last = got.detail
        if on_wait is not None:
            on_wait(last)
        if deadline.left <= 0:
            raise on_timeout(last)
        time.sleep(max(0.0, min(delay, deadline.left)))
        delay = min(delay * 1.5, max_delay)
