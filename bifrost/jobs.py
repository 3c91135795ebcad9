"""Detached jobs with no daemon on the box: start, status, logs (resumable follow), wait, kill."""

from __future__ import annotations

import asyncio
import base64
import codecs
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets as _secrets
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bifrost._loop import run_sync
from bifrost.errors import (
    ConnectError,
    ConnectionLostError,
    JobError,
    JobNotFoundError,
    JobTimeout,
)
from bifrost.exec import capture, env_lines
from bifrost.paths import bifrost_home
from bifrost.transport.base import Transport

if TYPE_CHECKING:
    from bifrost.session import Session

__all__ = ["Job", "JobStatus", "LogDecoder", "check_job_id"]

log = logging.getLogger("bifrost.jobs")

_JOB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "lost", "died"})


def check_job_id(job_id: str) -> str:
    """Validate a job id (they are interpolated into remote paths)."""
    if not _JOB_ID.match(job_id):
        raise JobError(
            f"invalid job id {job_id!r}: ids look like 'train-20250101-120000-ab12' "
            "(letters, digits, '.', '_', '-')"
        )
    return job_id


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_")
    return slug[:40] or "job"


def new_job_id(name: str | None) -> str:
    """``<slug of name>-<utc timestamp>-<random>``: unique and safe in any shell context."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{_slug(name or 'job')}-{stamp}-{_secrets.token_hex(3)}"


def _script() -> str:
    return resources.files("bifrost.scripts").joinpath("jobs.sh").read_text()


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of a job's state.

    ``state`` is one of running, succeeded, failed, cancelled, lost (the box rebooted),
    died (the wrapper vanished without recording an exit code).
    """

    id: str
    state: str
    exit_code: int | None
    pid: int | None
    started_at: str | None
    ended_at: str | None
    name: str | None = None
    command: str | None = None
    target: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        """True once the job will not change state any more."""
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return {
            "id": self.id,
            "target": self.target,
            "name": self.name,
            "state": self.state,
            "exit_code": self.exit_code,
            "pid": self.pid,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "command": self.command,
        }


def _parse_status(line: str, target: str) -> JobStatus:
    parts = line.split("\t")
    job_id, state = parts[0], parts[1]
    if state == "missing":
        raise JobNotFoundError(f"no job {job_id!r} on {target} (see `bifrost jobs {target}`)")
    parts += [""] * (7 - len(parts))
    rc_text, pid_text, started, ended, meta_b64 = parts[2:7]
    rc = int(rc_text) if rc_text.strip().lstrip("-").isdigit() else None
    if state == "finished":
        state = "succeeded" if rc == 0 else "failed"
    try:
        meta = json.loads(base64.b64decode(meta_b64)) if meta_b64 else {}
    except ValueError:
        meta = {}
    return JobStatus(
        id=job_id,
        state=state,
        exit_code=rc,
        pid=int(pid_text) if pid_text.isdigit() else None,
        started_at=started or None,
        ended_at=ended or None,
        name=meta.get("name"),
        command=meta.get("command"),
        target=target,
        meta=meta,
    )


def _script_body(func: str, stdin_tail: str = "") -> bytes:
    return (_script() + f'\n{func} "$@"' + stdin_tail + "\n").encode()


async def _call(
    transport: Transport,
    func: str,
    args: Sequence[str] = (),
    stdin_tail: str = "",
    on_stdout: Callable[[bytes], None] | None = None,
) -> tuple[int, str, str]:
    """Run one function of the packaged jobs script (sent on stdin) with ``args``."""
    cmd = "bash --norc --noprofile -s -- " + " ".join(shlex.quote(a) for a in args)
    r = await capture(transport, cmd, stdin=_script_body(func, stdin_tail), on_stdout=on_stdout)
    return r.exit_code, r.stdout, r.stderr


def launch_payload(fields: Mapping[str, str]) -> str:
    """The heredoc payload of a launch: ``key base64`` lines, then ``sum SHA256 LENGTH`` of
    those lines, which the box checks before anything runs (a cut connection delivers a
    truncated heredoc, and bash would otherwise run whatever part of the command arrived)."""
    body = "".join(f"{k} {base64.b64encode(v.encode()).decode()}\n" for k, v in fields.items())
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{body}sum {digest} {len(body)}\n"


def launch_script(fields: Mapping[str, str]) -> bytes:
    """Everything ``run`` sends on stdin to ``bash -s``: the jobs script, the ``__bf_launch``
    call and its payload in a quoted heredoc (inert data to bash, whatever it contains)."""
    tail = f" <<'__BIFROST_PAYLOAD__'\n{launch_payload(fields)}__BIFROST_PAYLOAD__"
    return _script_body("__bf_launch", tail)


def _remember(job_id: str, target: str, identity: str | None = None) -> None:
    """Local index job id → target (and the key used) so `bifrost logs JOB` works without
    repeating the host or the key.

    Safe between processes (a sweep starts jobs from many at once): the read-modify-write holds
    an flock and the new file gets a private temp name before it atomically replaces the old.
    The job has already started when this runs, so a failure here only costs the index entry.
    """
    path = bifrost_home() / "jobs.json"
    entry: str | dict[str, str] = {"target": target, "identity": identity} if identity else target
    try:
        with open(str(path) + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data[job_id] = entry
            tmp = path.with_name(f"jobs.json.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)
    except OSError as exc:
        log.warning("job %s started, but recording it in %s failed: %s", job_id, path, exc)


def remembered_job(job_id: str) -> tuple[str | None, str | None]:
    """(target, identity file) a job id was started with from this machine, where known."""
    try:
        data = json.loads((bifrost_home() / "jobs.json").read_text())
    except (OSError, ValueError):
        return None, None
    value = data.get(job_id)
    if isinstance(value, str):  # written before keys were remembered
        return value, None
    if isinstance(value, dict) and isinstance(value.get("target"), str):
        key = value.get("identity")
        return value["target"], key if isinstance(key, str) else None
    return None, None


def remembered_target(job_id: str) -> str | None:
    """The target a job id was started on from this machine, if known."""
    return remembered_job(job_id)[0]


async def astart(
    host: Session,
    command: str,
    *,
    name: str | None = None,
    cwd: str | None = None,
    workspace: str | None = None,
    env: Mapping[str, str] | None = None,
    secrets: Mapping[str, str] | None = None,
    outputs: Sequence[str] = (),
) -> Job:
    """Start a detached job in one round trip; see :meth:`bifrost.Host.run`."""
    if not command.strip():
        raise ValueError("a job needs a command: got an empty one")
    job_id = new_job_id(name)
    venv = ""
    if workspace is not None:
        from bifrost.sync import check_workspace_name, venv_path, workspace_path

        check_workspace_name(workspace)
        cwd = cwd or workspace_path(workspace)
        venv = venv_path(workspace)
    meta = {
        "id": job_id,
        "name": name or job_id,
        "command": command,
        "cwd": cwd or "~",
        "workspace": workspace,
        "outputs": list(outputs),
        "env_keys": sorted([*(env or {}), *(secrets or {})]),
        "submitted_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    fields = {
        "id": job_id,
        "cmd": command,
        "meta": json.dumps(meta),
        "cwd": cwd or "~",
        "venv": venv,
        "env": env_lines({**(env or {}), **(secrets or {})}),
    }
    transport = await host.atransport()
    r = await capture(transport, "bash --norc --noprofile -s --", stdin=launch_script(fields))
    if r.exit_code != 0 or "BIFROST_STARTED" not in r.stdout:
        detail = r.stderr.strip() or r.stdout.strip() or f"exit {r.exit_code}"
        raise JobError(f"could not start job on {host.name}: {detail}")
    _remember(job_id, host.spec, host.identity_file)
    return Job(host, job_id)


async def astatuses(host: Session, job_ids: Sequence[str] | None) -> list[JobStatus]:
    """Status of the given jobs (all jobs when None), one round trip."""
    ids = [check_job_id(j) for j in job_ids or []]

    async def op(t: Transport) -> list[JobStatus]:
        rc, out, err = await _call(t, "__bf_status", ids)
        if rc != 0:
            raise JobError(f"could not read job status on {host.name}: {err.strip()}")
        return [_parse_status(ln, host.name) for ln in out.splitlines() if ln.strip()]

    return await host.aretrying(op)


class LogDecoder:
    """Bytes of a growing log → complete text lines, resumable at a byte offset.

    ``offset`` counts every byte fed; resuming a read there (keeping this decoder) never splits
    a line or a UTF-8 character and never repeats one. ``\\r``, ``\\n`` and ``\\r\\n`` all end a
    line, so progress bars come out as successive lines.
    """

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def feed(self, data: bytes) -> list[str]:
        """Consume a chunk; return the lines it completed."""
        self.offset += len(data)
        text = self._pending + self._decoder.decode(data)
        lines: list[str] = []
        start = 0
        i = 0
        n = len(text)
        while i < n:
            c = text[i]
            if c == "\n":
                lines.append(text[start:i])
                start = i + 1
            elif c == "\r":
                if i + 1 == n:
                    break  # might be the first half of \r\n: wait for the next chunk
                lines.append(text[start:i])
                start = i + 2 if text[i + 1] == "\n" else i + 1
                i = start
                continue
            i += 1
        self._pending = text[start:]
        return lines

    def flush(self) -> list[str]:
        """End of stream: return the unterminated last line, if any."""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        text = text.rstrip("\r")
        return [text] if text else []

    def reset(self) -> None:
        """Start over from byte 0 (the file was truncated or replaced)."""
        self.offset = 0
        self._decoder.reset()
        self._pending = ""


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else "no error message"


def _job_dir(job_id: str) -> str:
    return f'"$HOME/.bifrost/jobs/{job_id}"'


class Job:
    """A handle on a detached job on one host. Methods reconnect when the link drops."""

    def __init__(self, host: Session, job_id: str) -> None:
        self.host = host
        self.id = check_job_id(job_id)

    def __repr__(self) -> str:
        return f"Job({self.id!r} on {self.host.name})"

    # status -------------------------------------------------------------------------------
    async def astatus(self) -> JobStatus:
        """Coroutine twin of :meth:`status`."""
        return (await astatuses(self.host, [self.id]))[0]

    def status(self) -> JobStatus:
        """The job's current :class:`JobStatus`."""
        return run_sync(self.astatus())

    async def await_(self, timeout: float | None = None, poll: float = 0.2) -> JobStatus:
        """Coroutine twin of :meth:`wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = poll
        while True:
            st = await self.astatus()
            if st.done:
                return st
            if timeout is not None and deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(self.id, timeout)
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Block until the job ends; returns its final status (``exit_code`` for the code).

        Raises :class:`JobTimeout` (a ``TimeoutError``) after ``timeout`` seconds."""
        return run_sync(self.await_(timeout))

    async def akill(self, grace: float = 5.0) -> str:
        """Coroutine twin of :meth:`kill`."""
        t = await self.host.atransport()
        rc, out, err = await _call(t, "__bf_kill", [self.id, str(max(1, int(grace * 10)))])
        if rc == 3:
            raise JobNotFoundError(f"no job {self.id!r} on {self.host.name}")
        if rc != 0:
            raise JobError(f"could not kill {self.id}: {err.strip()}")
        return out.strip()

    def kill(self, grace: float = 5.0) -> str:
        """Cancel the job: ``cancelled`` marker, TERM to the whole process group, KILL after
        ``grace`` seconds. Returns 'cancelled' or 'finished' (it had already ended)."""
        return run_sync(self.akill(grace))

    # tmux -------------------------------------------------------------------------------
    async def aattach_info(self) -> tuple[JobStatus, str | None]:
        """Coroutine twin of :meth:`attach_info`."""

        async def op(t: Transport) -> tuple[JobStatus, str | None]:
            rc, out, err = await _call(t, "__bf_attach_prep", [self.id])
            if rc == 3:
                raise JobNotFoundError(f"no job {self.id!r} on {self.host.name}")
            if rc != 0:
                raise JobError(f"could not prepare attaching to {self.id}: {err.strip()}")
            words = out.split()
            return await self.astatus(), words[1] if words[:1] == ["tmux"] else None

        return await self.host.aretrying(op)

    def attach_info(self) -> tuple[JobStatus, str | None]:
        """The job's status and the name of its tmux session on the box (on the ``bifrost``
        server: ``tmux -L bifrost attach -t NAME``), or None when tmux is not usable there."""
        return run_sync(self.aattach_info())

    def tmux_command(self, session: str) -> str:
        """Remote shell command that attaches to the job's tmux session, re-creating it (from
        the view script in the job dir) if the tmux server went away since the launch."""
        return (
            f"exec tmux -L bifrost new-session -A -s {shlex.quote(session)} "
            f"-c {_job_dir(self.id)} 'bash --norc --noprofile ./view.sh'"
        )

    # logs ---------------------------------------------------------------------------------
    async def aread_log(self, offset: int = 0) -> bytes:
        """Bytes of the log from ``offset`` (0-based) to its current end."""

        async def op(t: Transport) -> bytes:
            out: list[bytes] = []
            r = await capture(
                t, f"tail -c +{int(offset) + 1} {_job_dir(self.id)}/log", on_stdout=out.append
            )
            if r.exit_code != 0:
                await self.astatus()  # raises JobNotFoundError when it does not exist
                raise JobError(f"cannot read the log of {self.id}: {_first_line(r.stderr)}")
            return b"".join(out)

        return await self.host.aretrying(op)

    async def atail(self, lines: int, *, partial: bool = True) -> tuple[list[str], int]:
        """The last ``lines`` lines and the byte offset where they end.

        With ``partial=False`` an unterminated last line is left out and the offset is that of
        the last complete line's end: a follow resuming there gets the whole line (and any
        UTF-8 character cut at the end) instead of a fragment."""
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
            raise ValueError(f"tail needs a number of lines >= 0, not {lines!r}")

        async def op(t: Transport) -> tuple[bytes, int]:
            out: list[bytes] = []
            d = _job_dir(self.id)
            # One more line than asked: tail counts an unterminated last line as one.
            cmd = (
                f'sz=$(stat -c %s {d}/log 2>/dev/null) || exit 3; echo "$sz" >&2; '
                f'head -c "$sz" {d}/log | tail -n {lines + 1}'
            )
            r = await capture(t, cmd, on_stdout=out.append)
            if r.exit_code == 3:
                await self.astatus()  # raises JobNotFoundError when it does not exist
                raise JobError(f"job {self.id} on {self.host.name} has no log file")
            words = r.stderr.split()
            if r.exit_code != 0 or not words or not words[0].isdigit():
                raise JobError(f"cannot read the log of {self.id}: {_first_line(r.stderr)}")
            return b"".join(out), int(words[0])

        data, size = await self.host.aretrying(op)
        cut = data.rfind(b"\n") + 1
        complete, rest = data[:cut], data[cut:]
        dec = LogDecoder()
        got = dec.feed(complete) + dec.flush()
        if partial and rest:
            tail_dec = LogDecoder()
            got += tail_dec.feed(rest) + tail_dec.flush()
            return got[-lines:] if lines else [], size
        return (got[-lines:] if lines else []), size - len(rest)

    async def afollow(
        self,
        on_line: Callable[[str], None],
        *,
        offset: int = 0,
        follow: bool = True,
        reconnect_deadline: float = 120.0,
    ) -> JobStatus:
        """Stream log lines from byte ``offset`` until the job ends (or once, without ``follow``).

        A dropped connection is re-established and reading resumes at the exact byte offset.
        """
        dec = LogDecoder(offset)
        lost_since: float | None = None
        while True:
            try:
                transport = await self.host.atransport()
                reset = await self._stream_once(transport, dec, on_line, follow)
                lost_since = None
                if reset:
                    continue
                st = await self.astatus()
                if not follow or st.done:
                    for line in dec.feed(await self.aread_log(dec.offset)):
                        on_line(line)
                    for line in dec.flush():
                        on_line(line)
                    return st
            except (ConnectionLostError, ConnectError):
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > reconnect_deadline:
                    raise
                await asyncio.sleep(0.2)
                try:
                    await self.host.areconnect()
                except ConnectError:
                    await asyncio.sleep(1.0)

    async def _stream_once(
        self, t: Transport, dec: LogDecoder, on_line: Callable[[str], None], follow: bool
    ) -> bool:
        def sink(chunk: bytes) -> None:
            for line in dec.feed(chunk):
                on_line(line)

        # The box decides when a follow ends, by the same test as `status` (boot id, pid start
        # time), so a lost or died job ends it instead of a reused pid keeping it open.
        args = [self.id, str(dec.offset), "1" if follow else "0"]
        rc, _, _ = await _call(t, "__bf_follow", args, on_stdout=sink)
        if rc == 3:
            raise JobNotFoundError(f"no job {self.id!r} on {self.host.name}")
        if rc == 4:
            dec.reset()
            return True
        return False

    def logs(self, *, tail: int | None = None) -> str:
        """The log so far (or its last ``tail`` lines) as text."""
        if tail is not None:
            lines, _ = run_sync(self.atail(tail))
            return "".join(line + "\n" for line in lines)
        return run_sync(self.aread_log(0)).decode("utf-8", errors="replace")

    def follow(
        self,
        on_line: Callable[[str], None] = print,
        *,
        tail: int | None = None,
    ) -> JobStatus:
        """Print (or hand to ``on_line``) each log line until the job ends; survives dropped
        connections without duplicated or missing lines. Returns the final status."""

        async def go() -> JobStatus:
            offset = 0
            if tail is not None:
                # Stop at the last complete line: the follow picks up the unfinished one whole.
                lines, offset = await self.atail(tail, partial=False)
                for line in lines:
                    on_line(line)
            return await self.afollow(on_line, offset=offset)

        return run_sync(go())

    def pull_results(self, dest: str | Path, *, progress: bool = False) -> Path:
        """Fetch the job directory (log, exit_code, meta) and its declared ``outputs`` into
        ``dest/<job id>/``; returns that folder."""
        from bifrost.transfer import apull_results

        return run_sync(apull_results(self, Path(dest), progress=progress))
