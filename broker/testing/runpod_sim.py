"""A local RunPod cloud: the GraphQL subset broker's adapter speaks, with real sshd pods.

:class:`RunPodSimulator` is an HTTP server on 127.0.0.1 answering ``POST /graphql`` the way
``api.runpod.io`` does for the operations :mod:`broker.providers.runpod` sends (``gpuTypes``,
``pod``, ``myself.pods``, ``podFindAndDeployOnDemand``, ``podRentInterruptable``, ``podTerminate``,
``podStop``, ``podResume``). Every pod is a real OpenSSH ``sshd`` on loopback
(:class:`bifrost.testing.SSHServer`) that accepts the deploy's ``PUBLIC_KEY`` and has a fake
``nvidia-smi`` first on PATH showing the pod's GPUs. Faults (capacity, 429, 5xx, lost responses,
slow or absent SSH, hidden GPUs) can be injected from Python while it runs; every request is logged
with secrets removed.

Run it by hand with ``python -m broker.testing.runpod_sim --port 8765 --api-key test``; see
``docs/simulator.md``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import SecretStr

from bifrost.testing import SSHServer, free_port

log = logging.getLogger(__name__)

#: RunPod's usual answer when the requested GPUs cannot be had (sent as a GraphQL error).
CAPACITY_MESSAGE = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
#: RunPod's answer when a stopped pod's host has no free GPUs left for a resume.
RESUME_CAPACITY_MESSAGE = "There are not enough free GPUs on the host machine to start this pod."
TERMINATE_NOT_FOUND_MESSAGE = "pod not found to terminate"
POD_NOT_FOUND_MESSAGE = "pod not found"
DRIVER_VERSION = "550.127.05"
CUDA_VERSION = "12.4"
#: What a pod's sessions see after its own bin dir (a root login's usual PATH).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SshMode = Literal["ok", "refuse", "hang", "noauth"]
LostMode = Literal["drop", "504"]

# -- catalogue --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimGpuType:
    """One GPU type of the simulated catalogue. Prices are per GPU per hour, as RunPod's are.

    A cloud whose on-demand price is None is not offered; a cloud whose stock is None has none in
    stock right now (``stockStatus: null``, deploys there fail with the capacity message).
    ``available`` is how many GPUs of this type can be rented at once (None: unlimited); deploys
    take from it and terminate/stop give back.
    """

    id: str
    display_name: str
    memory_gb: int
    secure_price: float | None
    community_price: float | None
    secure_spot_price: float | None = None
    community_spot_price: float | None = None
    secure_stock: str | None = "High"
    community_stock: str | None = "High"
    max_gpu_count: int = 8
    available: int | None = None
    manufacturer: str = "Nvidia"
    vcpus_per_gpu: int = 8
    ram_gb_per_gpu: int = 62
    memory_mib: int | None = None
    compute_cap: str = "8.0"
    smi_name: str | None = None

    def price(self, cloud: str, spot: bool) -> float | None:
        """Per-GPU price in ``cloud`` (SECURE/COMMUNITY), or None when not offered there."""
        secure = cloud == "SECURE"
        on_demand = self.secure_price if secure else self.community_price
        if on_demand is None:
            return None
        if not spot:
            return on_demand
        return self.secure_spot_price if secure else self.community_spot_price

    def stock(self, cloud: str) -> str | None:
        """RunPod's stockStatus word for ``cloud`` (None: nothing in stock)."""
        return self.secure_stock if cloud == "SECURE" else self.community_stock


DEFAULT_GPU_TYPES: tuple[SimGpuType, ...] = (
    SimGpuType(
        id="NVIDIA A100 80GB PCIe",
        display_name="A100 PCIe",
        memory_gb=80,
        secure_price=1.64,
        community_price=1.19,
        secure_spot_price=0.82,
        community_spot_price=0.60,
        vcpus_per_gpu=8,
        ram_gb_per_gpu=117,
        memory_mib=81920,
        compute_cap="8.0",
    ),
    SimGpuType(
        id="NVIDIA H100 80GB HBM3",
        display_name="H100 SXM",
        memory_gb=80,
        secure_price=2.99,
        community_price=2.69,
        secure_spot_price=1.75,
        community_spot_price=1.50,
        vcpus_per_gpu=16,
        ram_gb_per_gpu=125,
        memory_mib=81559,
        compute_cap="9.0",
    ),
    SimGpuType(
        id="NVIDIA GeForce RTX 4090",
        display_name="RTX 4090",
        memory_gb=24,
        secure_price=0.69,
        community_price=0.34,
        secure_spot_price=0.35,
        community_spot_price=0.20,
        secure_stock="Medium",
        vcpus_per_gpu=6,
        ram_gb_per_gpu=41,
        memory_mib=24564,
        compute_cap="8.9",
    ),
    SimGpuType(
        id="NVIDIA RTX A6000",
        display_name="RTX A6000",
        memory_gb=48,
        secure_price=0.49,
        community_price=0.33,
        secure_spot_price=0.25,
        community_spot_price=0.17,
        community_stock="Low",
        vcpus_per_gpu=8,
        ram_gb_per_gpu=50,
        memory_mib=49140,
        compute_cap="8.6",
    ),
)

# -- records exposed to tests -----------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One request the simulator received (secrets removed).

    ``operation`` is the root field (``podFindAndDeployOnDemand``, ``pod``, ``myself`` ...),
    ``name`` the operation name written in the query (``Deploy``), ``status`` the HTTP status
    answered (0 when the connection was dropped), ``error`` the GraphQL error message, if any.
    """

    operation: str
    name: str | None
    variables: dict[str, Any]
    status: int
    error: str | None
    at: datetime


@dataclass(frozen=True)
class PodInfo:
    """A snapshot of one simulated pod, terminated ones included (for assertions).

    ``ssh_port`` / ``ssh_pid`` are the last published SSH port and sshd process id; they are kept
    after stop/terminate so a test can check that nothing answers there any more. ``ssh_running``
    is whether something is listening for the pod now; ``runtime`` and ``ports_published`` say
    what the API currently reports.
    """

    id: str
    name: str
    gpu_type_id: str
    gpu_count: int
    visible_gpus: int
    cloud_type: str
    spot: bool
    bid_per_gpu: float | None
    cost_per_hr: float
    image: str
    env_keys: tuple[str, ...]
    public_keys: tuple[str, ...]
    desired_status: str
    created_at: datetime
    terminate_after: datetime | None
    terminated_at: datetime | None
    terminated_by: str | None
    ssh_mode: SshMode
    ssh_port: int | None
    ssh_pid: int | None
    ssh_running: bool
    runtime: bool
    ports_published: bool
    status_history: tuple[str, ...]


# -- listeners: what answers on a pod's published SSH port ------------------------------------


class _Listener:
    port: int
    pid: int | None = None

    def alive(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class _SshdListener(_Listener):
    """A real sshd (the normal case, and ``noauth`` where the user's key is not installed)."""

    def __init__(self, server: SSHServer) -> None:
        self.server = server
        self.port = server.port
        self.pid = server.proc.pid if server.proc is not None else None

    def alive(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def stop(self) -> None:
        self.server.stop()


class _ClosedPort(_Listener):
    """A published port nothing listens on: connections are refused."""

    def __init__(self, port: int) -> None:
        self.port = port

    def alive(self) -> bool:
        return False

    def stop(self) -> None:
        pass


class _HangingPort(_Listener):
    """Accepts TCP connections and never says a word (a wedged sshd or a black-holing NAT)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock = socket.create_server(("127.0.0.1", port))
        self._sock.settimeout(0.1)
        self._held: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"hang-{port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def alive(self) -> bool:
        return not self._stopped.is_set()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(2)
        self._sock.close()
        for c in self._held:
            c.close()


_PORT_LOCK = threading.Lock()
#: Ports any simulator in this process handed to a pod. Never reused: bifrost pins host keys per
#: host:port (trust on first use), and a new pod with a new key on an old port would look like a
#: man-in-the-middle.
_USED_PORTS: set[int] = set()


def _reserve_port() -> int:
    with _PORT_LOCK:
        while True:
            port = free_port()
            if port not in _USED_PORTS:
                _USED_PORTS.add(port)
                return port


# -- internal pod state -----------------------------------------------------------------------


@dataclass
class _PodFault:
    """Applies to the next ``remaining`` pods (None: every pod) of ``gpu_type_id`` (None: any)."""

    remaining: int | None
    gpu_type_id: str | None
    startup_delay: float | None = None
    port_delay: float | None = None
    ssh_mode: SshMode | None = None
    visible_gpus: int | None = None


@dataclass
class _CountedFault:
    """A request-level fault for the next ``remaining`` matching requests (None: until cleared)."""

    remaining: int | None
    operation: str | None = None
    gpu_type_id: str | None = None
    status: int = 503
    retry_after: float = 0.0
    message: str = CAPACITY_MESSAGE
    mode: LostMode = "drop"


@dataclass
class _Pod:
    id: str
    name: str
    gpu_type: SimGpuType
    gpu_count: int
    visible_gpus: int
    cloud: str
    spot: bool
    bid: float | None
    per_gpu: float
    image: str
    env: dict[str, str]
    public_keys: list[str]
    ports: list[str]
    host_id: str
    created_at: datetime
    terminate_after: datetime | None
    stop_after: datetime | None
    ssh_mode: SshMode
    startup_delay: float
    port_delay: float
    desired: str = "CREATED"
    last_change: str = ""
    running_at: float = 0.0  # simulator clock (monotonic + offset)
    ready_at: float | None = None  # when the listener came up; runtime exists from then
    listener: _Listener | None = None
    ssh_port: int | None = None  # the last published SSH port, kept after stop/terminate
    ssh_pid: int | None = None  # the last sshd's pid, kept so tests can check it is gone
    gen: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    holds_gpus: bool = False
    history: list[str] = field(default_factory=list)
    terminated_at: datetime | None = None
    terminated_by: str | None = None
    dir: Path = field(default_factory=Path)


def _pod_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(14))


def _status_word(verb: str, when: datetime) -> str:
    return f"{verb}: {when.strftime('%a %b %d %Y %H:%M:%S')} GMT+0000 (Coordinated Universal Time)"


def _parse_time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise _GraphQLError(f"invalid DateTime: {value!r}")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _GraphQLError(f"invalid DateTime: {value!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_VALUE = re.compile(r'^[^"\\\r\n]*$')


def _redact_variables(variables: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with every env value but PUBLIC_KEY replaced (tokens travel in env)."""
    out = copy.deepcopy(variables)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            env = node.get("env")
            if isinstance(env, list):
                for item in env:
                    if (
                        isinstance(item, dict)
                        and item.get("key") != "PUBLIC_KEY"
                        and "value" in item
                    ):
                        item["value"] = "***"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


# -- GraphQL text --------------------------------------------------------------------------------

_OPERATION = re.compile(
    r"^\s*(?:(query|mutation|subscription)\b\s*(\w+)?\s*(?:\([^)]*\))?\s*)?\{\s*(?:(\w+)\s*:\s*)?(\w+)",
    re.S,
)
_LOWEST_PRICE = re.compile(
    r"(?:(\w+)\s*:\s*)?lowestPrice\s*\(\s*input\s*:\s*(\$\w+|\{[^}]*\})\s*\)"
)
_GPU_TYPES_INPUT = re.compile(r"gpuTypes\s*\(\s*input\s*:\s*(\$\w+|\{[^}]*\})\s*\)")
_LITERAL_PAIR = re.compile(r"(\w+)\s*:\s*(\"[^\"]*\"|[\w.\-]+)")


def parse_operation(query: str) -> tuple[str, str | None, str, str]:
    """(operation type, operation name, response key, root field) of a GraphQL document.

    Only what dispatch needs: the first root selection, with its alias as the response key.
    """
    m = _OPERATION.match(query)
    if m is None:
        raise _GraphQLError("Syntax Error: cannot find an operation", status=400)
    kind, name, alias, root = m.groups()
    return kind or "query", name, alias or root, root


def _literal_or_variable(text: str, variables: dict[str, Any]) -> dict[str, Any]:
    """A tiny reader for ``$var`` or ``{key: value, ...}`` inputs (scalars only)."""
    if text.startswith("$"):
        value = variables.get(text[1:])
        return value if isinstance(value, dict) else {}
    out: dict[str, Any] = {}
    for key, raw in _LITERAL_PAIR.findall(text):
        if raw.startswith('"'):
            out[key] = raw[1:-1]
        elif raw in ("true", "false"):
            out[key] = raw == "true"
        elif raw == "null":
            out[key] = None
        else:
            try:
                out[key] = float(raw) if "." in raw else int(raw)
            except ValueError:
                out[key] = raw  # an enum value such as SECURE
    return out


class _GraphQLError(Exception):
    """An error answered in ``errors[]`` (HTTP 200 unless ``status`` says otherwise)."""

    def __init__(self, message: str, *, status: int = 200) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _DropConnection(Exception):
    """Close the socket without answering (the request's effect stays)."""


# -- the simulator ------------------------------------------------------------------------------

#: Started and not yet stopped (strong references: a forgotten simulator must still be stopped).
_LIVE: set[RunPodSimulator] = set()
#: Oldest requests are dropped past this many (a simulator left running for days stays small).
MAX_LOGGED_REQUESTS = 10_000


@atexit.register
def _stop_all() -> None:
    # Backstop for a test run that forgot stop(): never leave sshd processes behind.
    for sim in list(_LIVE):
        sim.stop()


class RunPodSimulator:
    """A RunPod-speaking GraphQL server on 127.0.0.1 whose pods are real sshd processes.

    >>> with RunPodSimulator(api_key="test") as sim:                       # doctest: +SKIP
    ...     rp = RunPodProvider(SecretStr("test"), base_url=sim.url, ssh_public_key=pub)
    ...     inst = rp.create(CreateRequest(offer=offer, name="broker-0001"))

    Timing: a deployed pod is ``CREATED`` for ``provision_delay`` seconds, then ``RUNNING`` with
    ``runtime: null`` for ``startup_delay`` seconds plus the time its sshd takes to start, then has
    a runtime whose ``ports`` stay empty for ``port_delay`` seconds, and then publishes
    ``127.0.0.1:<sshd port>`` for private port 22. These three are plain attributes and may be
    changed between calls; the fault methods override them per pod.

    Faults: in every fault method ``n`` is how many matching requests (or new pods) it affects,
    and ``n=None`` means every one until :meth:`clear_faults`. Pending faults of different kinds
    combine (a pod can both publish its ports late and never start sshd).

    Every public method is thread-safe. ``stop()`` (or leaving the ``with`` block) kills every
    pod's sshd; an ``atexit`` hook does the same for simulators never stopped (a process killed
    by SIGKILL leaves its sshd children behind: nothing can run then).
    """

    def __init__(
        self,
        *,
        api_key: str | SecretStr = "test",
        port: int = 0,
        gpu_types: Iterable[SimGpuType] = DEFAULT_GPU_TYPES,
        provision_delay: float = 0.0,
        startup_delay: float = 0.0,
        port_delay: float = 0.0,
        account_public_key: str | None = None,
        cpu_only: bool = False,
        client_balance: float = 100.0,
    ) -> None:
        self._api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self._port = port
        self._gpu_types: dict[str, SimGpuType] = {g.id: g for g in gpu_types}
        self.provision_delay = provision_delay
        self.startup_delay = startup_delay
        self.port_delay = port_delay
        self.account_public_key = account_public_key
        self.cpu_only = cpu_only
        self.client_balance = client_balance
        self._lock = threading.RLock()
        self._pods: dict[str, _Pod] = {}
        self._requests: list[RequestRecord] = []
        self._capacity: list[_CountedFault] = []
        self._rate_limits: list[_CountedFault] = []
        self._http_faults: list[_CountedFault] = []
        self._lost: list[_CountedFault] = []
        self._late: list[_CountedFault] = []
        self._slow: list[_CountedFault] = []
        self._held: dict[str, _Pod] = {}  # created by a late deploy, not yet visible
        self._pod_faults: list[_PodFault] = []
        self._offset = 0.0
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._closing = threading.Event()
        self._dir: Path | None = None
        self._real_nvidia_smi = shutil.which("nvidia-smi", path=SYSTEM_PATH) is not None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL to give the adapter (``base_url``) or ``RUNPOD_API_URL``."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def port(self) -> int:
        """The HTTP port (after start)."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        return int(self._server.server_address[1])

    def start(self) -> RunPodSimulator:
        """Bind the HTTP port and start serving in background threads."""
        if self._server is not None:
            return self
        self._closing.clear()
        server = _QuietServer(("127.0.0.1", self._port), _make_handler(self))
        server.daemon_threads = True
        self._dir = Path(tempfile.mkdtemp(prefix="runpod-sim-"))
        os.chmod(self._dir, 0o700)
        self._server = server
        _LIVE.add(self)
        http_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="runpod-sim-http"
        )
        reaper = threading.Thread(target=self._reap, name="runpod-sim-reaper", daemon=True)
        http_thread.daemon = True
        http_thread.start()
        reaper.start()
        self._threads += [http_thread, reaper]
        log.info("runpod simulator listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, kill every pod's sshd and remove the simulator's files. Idempotent."""
        self._closing.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            listeners = []
            for pod in self._pods.values():
                pod.gen += 1
                pod.cancel.set()
                if pod.listener is not None:
                    listeners.append(pod.listener)
                    pod.listener = None
                    pod.ready_at = None
            threads, self._threads = self._threads, []
        for listener in listeners:
            listener.stop()
        for t in threads:
            # Boot threads finish a starting sshd and then stop it themselves (see _boot).
            t.join(30)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _LIVE.discard(self)

    def __enter__(self) -> RunPodSimulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"RunPodSimulator({where}, pods={len(self._pods)})"

    # -- clock ------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The simulator's wall clock (real UTC time plus everything :meth:`advance` added)."""
        return datetime.now(UTC) + timedelta(seconds=self._offset)

    def _mono(self) -> float:
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the simulator's clock forward: TTLs (``terminateAfter``) and delays end sooner."""
        with self._lock:
            self._offset += seconds

    # -- catalogue --------------------------------------------------------------------------

    @property
    def gpu_types(self) -> list[SimGpuType]:
        """The current catalogue."""
        with self._lock:
            return list(self._gpu_types.values())

    def set_gpu_type(self, gpu_type: SimGpuType) -> None:
        """Add or replace one catalogue entry."""
        with self._lock:
            self._gpu_types[gpu_type.id] = gpu_type

    def update_gpu_type(self, gpu_type_id: str, **changes: Any) -> SimGpuType:
        """Change fields of one entry (e.g. ``secure_stock=None``, ``available=0``)."""
        with self._lock:
            new = replace(self._gpu_types[gpu_type_id], **changes)
            self._gpu_types[gpu_type_id] = new
            return new

    # -- faults -----------------------------------------------------------------------------

    def fail_capacity(
        self, n: int | None = 1, *, gpu_type_id: str | None = None, message: str = CAPACITY_MESSAGE
    ) -> None:
        """The next ``n`` deploys (of ``gpu_type_id`` only, if given) fail with ``message``.

        ``n=None``: every such deploy until :meth:`clear_faults`.
        """
        with self._lock:
            self._capacity.append(_CountedFault(n, gpu_type_id=gpu_type_id, message=message))

    def rate_limit(
        self, n: int | None = 1, *, retry_after: float = 0, operation: str | None = None
    ) -> None:
        """The next ``n`` requests (of root field ``operation`` only, if given) answer HTTP 429
        with ``Retry-After: retry_after``."""
        with self._lock:
            self._rate_limits.append(
                _CountedFault(n, operation=operation, status=429, retry_after=retry_after)
            )

    def fail_requests(
        self, n: int | None = 1, *, status: int = 503, operation: str | None = None
    ) -> None:
        """The next ``n`` requests (of root field ``operation`` only) answer HTTP ``status``
        without acting. ``n=None``: until :meth:`clear_faults`."""
        with self._lock:
            self._http_faults.append(_CountedFault(n, operation=operation, status=status))

    def fail_terminate(self, n: int | None = None, *, status: int = 503) -> None:
        """``podTerminate`` answers HTTP 503 (``n`` times, or until :meth:`clear_faults`);
        the pods stay alive and billing."""
        self.fail_requests(n, status=status, operation="podTerminate")

    def lose_deploy_response(self, n: int = 1, *, mode: LostMode = "drop") -> None:
        """The next ``n`` deploys create their pod, then the answer is lost: ``"drop"`` closes
        the connection without a response, ``"504"`` answers a gateway timeout."""
        with self._lock:
            self._lost.append(_CountedFault(n, mode=mode))

    def late_deploy(
        self, n: int = 1, *, mode: LostMode = "drop", delay: float | None = None
    ) -> None:
        """The provider acts late: the next ``n`` deploys lose their answer (``"drop"`` or
        ``"504"``) and their pod does not exist yet. It appears (listed, booting, billing from
        then on) after ``delay`` real seconds, or when :meth:`release_late` is called
        (``delay=None``): what a client sees when a create it gave up on succeeds later."""
        with self._lock:
            self._late.append(
                _CountedFault(n, mode=mode, retry_after=-1.0 if delay is None else delay)
            )

    def release_late(self) -> list[str]:
        """Make every pod held back by :meth:`late_deploy` appear now; returns their ids."""
        with self._lock:
            ids = list(self._held)
        for pod_id in ids:
            self._release(pod_id)
        return ids

    def _release(self, pod_id: str) -> None:
        with self._lock:
            pod = self._held.pop(pod_id, None)
            if pod is None or self._closing.is_set():
                return
            now = self.now()
            pod.created_at = now
            pod.running_at = self._mono() + max(0.0, self.provision_delay)
            pod.last_change = _status_word("Rented by User", now)
            self._pods[pod_id] = pod
            self._start_boot(pod)
        log.info("late pod %s appeared", pod_id)

    def slow_response(
        self, seconds: float, n: int | None = 1, *, operation: str | None = None
    ) -> None:
        """Answer after the client's timeout: the next ``n`` requests (of root field
        ``operation`` only, if given) are acted on at once, but their answer is sent only after
        ``seconds`` (a client with a shorter read timeout gives up: an ambiguous failure)."""
        with self._lock:
            self._slow.append(_CountedFault(n, operation=operation, retry_after=seconds))

    def slow_start(
        self, seconds: float, n: int | None = 1, *, gpu_type_id: str | None = None
    ) -> None:
        """The next ``n`` pods stay RUNNING with ``runtime: null`` for ``seconds`` before their
        sshd starts."""
        self._add_pod_fault(_PodFault(n, gpu_type_id, startup_delay=seconds))

    def slow_ports(
        self, seconds: float, n: int | None = 1, *, gpu_type_id: str | None = None
    ) -> None:
        """The next ``n`` pods get a runtime with no ports for ``seconds`` (the adapter sees the
        ssh.runpod.io proxy meanwhile)."""
        self._add_pod_fault(_PodFault(n, gpu_type_id, port_delay=seconds))

    def ssh_never_up(
        self, n: int | None = 1, *, mode: SshMode = "refuse", gpu_type_id: str | None = None
    ) -> None:
        """The next ``n`` pods publish an SSH port that never works: ``"refuse"`` (nothing listens),
        ``"hang"`` (accepts, never sends a banner) or ``"noauth"`` (sshd runs but the deploy's
        ``PUBLIC_KEY`` was not installed)."""
        self._add_pod_fault(_PodFault(n, gpu_type_id, ssh_mode=mode))

    def hide_gpus(
        self, n: int | None = 1, *, visible: int = 0, gpu_type_id: str | None = None
    ) -> None:
        """The next ``n`` pods show only ``visible`` GPUs in nvidia-smi (0: like a CPU-only box)."""
        self._add_pod_fault(_PodFault(n, gpu_type_id, visible_gpus=visible))

    def _add_pod_fault(self, fault: _PodFault) -> None:
        with self._lock:
            self._pod_faults.append(fault)

    def clear_faults(self) -> None:
        """Forget every pending fault (pods already affected stay as they are)."""
        with self._lock:
            self._capacity.clear()
            self._rate_limits.clear()
            self._http_faults.clear()
            self._lost.clear()
            self._late.clear()
            self._slow.clear()
            self._pod_faults.clear()

    @staticmethod
    def _take(
        faults: list[_CountedFault], operation: str | None, gpu_type_id: str | None = None
    ) -> _CountedFault | None:
        for f in faults:
            if f.operation is not None and f.operation != operation:
                continue
            if f.gpu_type_id is not None and f.gpu_type_id != gpu_type_id:
                continue
            if f.remaining is not None:
                f.remaining -= 1
                if f.remaining <= 0:
                    faults.remove(f)
            return f
        return None

    # -- provider-side events ---------------------------------------------------------------

    def preempt(self, pod_id: str) -> None:
        """Stop a pod as RunPod does when a spot bid is outbid (EXITED, sshd killed)."""
        self._stop_pod(pod_id, verb="Exited by RunPod")

    def terminate_pod(self, pod_id: str) -> None:
        """Terminate a pod from the provider's side (as a user in the web console would)."""
        self._terminate(pod_id, by="simulator")

    def crash_ssh(self, pod_id: str) -> None:
        """Kill a pod's sshd while RunPod keeps reporting it RUNNING with its ports."""
        with self._lock:
            listener = self._pods[pod_id].listener
        if listener is not None:
            listener.stop()

    # -- inspection -------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every request so far, oldest first (the key and env values never appear)."""
        with self._lock:
            return list(self._requests)

    def operations(self) -> list[str]:
        """Root fields of every request so far (``["gpuTypes", "podFindAndDeployOnDemand"]``)."""
        return [r.operation for r in self.requests]

    def clear_requests(self) -> None:
        """Empty the request log."""
        with self._lock:
            self._requests.clear()

    def pods(self, *, include_terminated: bool = True) -> list[PodInfo]:
        """Snapshots of every pod, oldest first."""
        with self._lock:
            return [
                self._info(p)
                for p in self._pods.values()
                if include_terminated or p.desired != "TERMINATED"
            ]

    def pod(self, pod_id: str) -> PodInfo:
        """Snapshot of one pod (KeyError when it never existed)."""
        with self._lock:
            return self._info(self._pods[pod_id])

    def pod_by_name(self, name: str) -> PodInfo | None:
        """The newest pod with this name, terminated or not."""
        with self._lock:
            for p in reversed(self._pods.values()):
                if p.name == name:
                    return self._info(p)
        return None

    def ssh_server(self, pod_id: str) -> SSHServer | None:
        """The pod's running sshd (its ``client_key`` also logs in; ``log`` has sshd's log)."""
        with self._lock:
            listener = self._pods[pod_id].listener
        return listener.server if isinstance(listener, _SshdListener) else None

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
    ) -> None:
        """Poll ``predicate`` until true; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)

    def wait_ready(self, pod_id: str, timeout: float = 15.0) -> PodInfo:
        """Wait until the pod publishes its SSH port; returns its snapshot."""
        self.wait_for(lambda: self.pod(pod_id).ports_published, timeout)
        return self.pod(pod_id)

    def _info(self, p: _Pod) -> PodInfo:
        now = self._mono()
        runtime = self._has_runtime(p, now)
        return PodInfo(
            id=p.id,
            name=p.name,
            gpu_type_id=p.gpu_type.id,
            gpu_count=p.gpu_count,
            visible_gpus=p.visible_gpus,
            cloud_type=p.cloud,
            spot=p.spot,
            bid_per_gpu=p.bid,
            cost_per_hr=self._cost(p),
            image=p.image,
            env_keys=tuple(p.env),
            public_keys=tuple(p.public_keys),
            desired_status=p.desired,
            created_at=p.created_at,
            terminate_after=p.terminate_after,
            terminated_at=p.terminated_at,
            terminated_by=p.terminated_by,
            ssh_mode=p.ssh_mode,
            ssh_port=p.ssh_port,
            ssh_pid=p.ssh_pid,
            ssh_running=p.listener is not None and p.listener.alive(),
            runtime=runtime,
            ports_published=runtime and self._has_ports(p, now),
            status_history=tuple(p.history),
        )

    # -- HTTP entry point (called from handler threads) ---------------------------------------

    def _handle(
        self, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes | None]:
        """(status, headers, body) for one POST; body None means drop the connection."""
        url = urlsplit(path)
        if url.path.rstrip("/") != "/graphql":
            return _json(404, {"error": "Not Found"})
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return _json(400, {"errors": [{"message": "POST body sent invalid JSON."}]})
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return _json(400, {"errors": [{"message": "Must provide query string."}]})
        variables = body.get("variables") or {}
        if not isinstance(variables, dict):
            return _json(400, {"errors": [{"message": "Variables must be an object."}]})
        try:
            kind, op_name, key, root = parse_operation(body["query"])
        except _GraphQLError as e:
            return self._record(
                "?", None, variables, e.status, e.message, {"errors": [{"message": e.message}]}
            )

        if not self._authorised(headers, url.query):
            return self._record(
                root,
                op_name,
                variables,
                401,
                "Unauthorized",
                {"error": "Unauthorized: invalid api key"},
            )
        with self._lock:
            limited = self._take(self._rate_limits, root)
            failing = None if limited else self._take(self._http_faults, root)
        if limited is not None:
            status, hdrs, out = _json(429, {"error": "Too many requests, slow down"})
            hdrs["Retry-After"] = f"{limited.retry_after:g}"
            self._log(root, op_name, variables, 429, None)
            return status, hdrs, out
        if failing is not None:
            return self._record(
                root, op_name, variables, failing.status, None, {"error": _reason(failing.status)}
            )

        with self._lock:
            slow = self._take(self._slow, root)
        try:
            data = self._dispatch(kind, root, body["query"], variables)
            if slow is not None:
                # Acted on already; the answer comes too late for a client with a short timeout.
                self._closing.wait(slow.retry_after)
        except _DropConnection:
            self._log(root, op_name, variables, 0, "response lost (connection dropped)")
            return 0, {}, None
        except _LostAs504:
            return self._record(root, op_name, variables, 504, None, {"error": "Gateway Timeout"})
        except _GraphQLError as e:
            return self._record(
                root,
                op_name,
                variables,
                e.status,
                e.message,
                {"errors": [{"message": e.message, "path": [key]}], "data": {key: None}},
            )
        return self._record(root, op_name, variables, 200, None, {"data": {key: data}})

    def _authorised(self, headers: dict[str, str], query: str) -> bool:
        expected = self._api_key.get_secret_value().encode()
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip().encode()
            return hmac.compare_digest(given, expected)
        # RunPod also takes ?api_key= in the URL (older clients send it that way).
        keys = parse_qs(query).get("api_key") or [""]
        return bool(keys[0]) and hmac.compare_digest(keys[0].encode(), expected)

    def _log(
        self, root: str, name: str | None, variables: dict[str, Any], status: int, error: str | None
    ) -> None:
        record = RequestRecord(root, name, _redact_variables(variables), status, error, self.now())
        with self._lock:
            self._requests.append(record)
            if len(self._requests) > MAX_LOGGED_REQUESTS:
                del self._requests[: len(self._requests) - MAX_LOGGED_REQUESTS]
        log.debug("%s %s -> %s%s", name or "-", root, status, f" ({error})" if error else "")

    def _record(
        self,
        root: str,
        name: str | None,
        variables: dict[str, Any],
        status: int,
        error: str | None,
        payload: Any,
    ) -> tuple[int, dict[str, str], bytes]:
        self._log(root, name, variables, status, error)
        return _json(status, payload)

    def _dispatch(self, kind: str, root: str, query: str, variables: dict[str, Any]) -> Any:
        handlers: dict[tuple[str, str], Callable[[], Any]] = {
            ("query", "gpuTypes"): lambda: self._gpu_types_answer(query, variables),
            ("query", "pod"): lambda: self._pod_answer(_input(variables, query)),
            ("query", "myself"): self._myself_answer,
            ("mutation", "podFindAndDeployOnDemand"): lambda: self._deploy(
                _input(variables, query), spot=False
            ),
            ("mutation", "podRentInterruptable"): lambda: self._deploy(
                _input(variables, query), spot=True
            ),
            ("mutation", "podTerminate"): lambda: self._terminate_answer(_input(variables, query)),
            ("mutation", "podStop"): lambda: self._stop_answer(_input(variables, query)),
            ("mutation", "podResume"): lambda: self._resume_answer(_input(variables, query)),
        }
        handler = handlers.get((kind, root))
        if handler is None:
            type_name = "Mutation" if kind == "mutation" else "Query"
            raise _GraphQLError(f'Cannot query field "{root}" on type "{type_name}".', status=400)
        return handler()

    # -- queries ----------------------------------------------------------------------------

    def _gpu_types_answer(self, query: str, variables: dict[str, Any]) -> list[dict[str, Any]]:
        selections = [
            (alias or "lowestPrice", _literal_or_variable(spec, variables))
            for alias, spec in _LOWEST_PRICE.findall(query)
        ]
        m = _GPU_TYPES_INPUT.search(query)
        wanted = _literal_or_variable(m.group(1), variables).get("id") if m else None
        out = []
        with self._lock:
            types = list(self._gpu_types.values())
            held = self._held_gpus()
        for gt in types:
            if wanted is not None and gt.id != wanted:
                continue
            entry: dict[str, Any] = {
                "id": gt.id,
                "displayName": gt.display_name,
                "manufacturer": gt.manufacturer,
                "memoryInGb": gt.memory_gb,
                "maxGpuCount": gt.max_gpu_count,
                "secureCloud": gt.secure_price is not None,
                "communityCloud": gt.community_price is not None,
                "securePrice": gt.secure_price,
                "communityPrice": gt.community_price,
                "secureSpotPrice": gt.secure_spot_price,
                "communitySpotPrice": gt.community_spot_price,
            }
            free = None if gt.available is None else max(0, gt.available - held.get(gt.id, 0))
            for alias, inp in selections:
                entry[alias] = self._lowest_price(gt, inp, free)
            out.append(entry)
        return out

    @staticmethod
    def _lowest_price(gt: SimGpuType, inp: dict[str, Any], free: int | None) -> dict[str, Any]:
        count = max(1, int(inp.get("gpuCount") or 1))
        secure = inp.get("secureCloud")
        if secure is None:
            clouds = ["SECURE", "COMMUNITY"]
        else:
            clouds = ["SECURE"] if secure else ["COMMUNITY"]
        offered = [c for c in clouds if gt.price(c, False) is not None]
        # Without a cloud in the input RunPod answers the cheaper one.
        offered.sort(key=lambda c: gt.price(c, False) or 0.0)
        cloud = offered[0] if offered else None
        limit = gt.max_gpu_count if free is None else min(gt.max_gpu_count, free)
        stock = gt.stock(cloud) if cloud is not None else None
        if count > limit:
            stock = None
        return {
            "minimumBidPrice": gt.price(cloud, True) if cloud else None,
            "uninterruptablePrice": gt.price(cloud, False) if cloud else None,
            "minVcpu": gt.vcpus_per_gpu * count,
            "minMemory": gt.ram_gb_per_gpu * count,
            "stockStatus": stock,
            "maxUnreservedGpuCount": limit if stock is not None else 0,
            "availableGpuCounts": [c for c in (1, 2, 4, 8) if c <= limit] if stock else [],
        }

    def _pod_answer(self, inp: dict[str, Any]) -> dict[str, Any] | None:
        pod_id = inp.get("podId")
        with self._lock:
            pod = self._pods.get(str(pod_id))
            # RunPod forgets terminated pods: null, not an error.
            if pod is None or pod.desired == "TERMINATED":
                return None
            return self._pod_json(pod)

    def _myself_answer(self) -> dict[str, Any]:
        with self._lock:
            live = [p for p in self._pods.values() if p.desired != "TERMINATED"]
            return {
                "id": "user_sim",
                "email": "sim@example.invalid",
                "pubKey": self.account_public_key or "",
                "clientBalance": self.client_balance,
                "currentSpendPerHr": round(
                    sum(self._cost(p) for p in live if p.desired == "RUNNING"), 6
                ),
                "spendLimit": 80,
                "pods": [self._pod_json(p) for p in live],
            }

    def _cost(self, pod: _Pod) -> float:
        return round(pod.per_gpu * pod.gpu_count, 6)

    def _has_runtime(self, pod: _Pod, now: float) -> bool:
        return pod.desired == "RUNNING" and pod.ready_at is not None and now >= pod.ready_at

    def _has_ports(self, pod: _Pod, now: float) -> bool:
        return pod.ready_at is not None and now >= pod.ready_at + pod.port_delay

    def _pod_json(self, pod: _Pod) -> dict[str, Any]:
        now = self._mono()
        runtime: dict[str, Any] | None = None
        if self._has_runtime(pod, now):
            assert pod.ready_at is not None
            assert pod.listener is not None
            ports: list[dict[str, Any]] = []
            if self._has_ports(pod, now):
                for spec in pod.ports:
                    private, _, proto = spec.partition("/")
                    if not private.isdigit():
                        continue
                    if private == "22" and proto == "tcp":
                        # The container's 22 appears behind a public IP and a mapped port.
                        ports.append(
                            {
                                "ip": "127.0.0.1",
                                "isIpPublic": True,
                                "privatePort": 22,
                                "publicPort": pod.listener.port,
                                "type": "tcp",
                            }
                        )
                    else:
                        ports.append(
                            {
                                "ip": "100.65.0.2",
                                "isIpPublic": False,
                                "privatePort": int(private),
                                "publicPort": int(private),
                                "type": proto or "http",
                            }
                        )
            runtime = {
                "uptimeInSeconds": int(now - pod.ready_at),
                "ports": ports,
                "gpus": [{"id": g["uuid"]} for g in _gpu_rows(pod)],
            }
        return {
            "id": pod.id,
            "name": pod.name,
            "desiredStatus": pod.desired,
            "costPerHr": self._cost(pod),
            "adjustedCostPerHr": self._cost(pod),
            "gpuCount": pod.gpu_count,
            "vcpuCount": pod.gpu_type.vcpus_per_gpu * max(1, pod.gpu_count),
            "memoryInGb": pod.gpu_type.ram_gb_per_gpu * max(1, pod.gpu_count),
            "imageName": pod.image,
            "lastStatusChange": pod.last_change,
            "machineId": pod.host_id.split("-")[-1],
            "machine": {"gpuDisplayName": pod.gpu_type.display_name, "podHostId": pod.host_id},
            "runtime": runtime,
        }

    def _held_gpus(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for p in self._pods.values():
            if p.holds_gpus:
                held[p.gpu_type.id] = held.get(p.gpu_type.id, 0) + p.gpu_count
        return held

    # -- mutations --------------------------------------------------------------------------

    def _deploy(self, inp: dict[str, Any], *, spot: bool) -> dict[str, Any]:
        gpu_type_id = inp.get("gpuTypeId")
        count = inp.get("gpuCount", 1)
        if not isinstance(count, int) or count < 0:
            raise _GraphQLError("gpuCount must be a non-negative integer")
        image = inp.get("imageName") or ""
        if not image and not inp.get("templateId"):
            raise _GraphQLError("imageName or templateId is required")
        if (inp.get("volumeInGb") or 0) > 0 and not inp.get("volumeMountPath"):
            raise _GraphQLError("volumeMountPath is required when volumeInGb is greater than 0")
        terminate_after = _parse_time(inp.get("terminateAfter"))
        stop_after = _parse_time(inp.get("stopAfter"))
        env: dict[str, str] = {}
        for item in inp.get("env") or []:
            if isinstance(item, dict) and isinstance(item.get("key"), str):
                env[item["key"]] = str(item.get("value", ""))
        ports = [p.strip() for p in str(inp.get("ports") or "").split(",") if p.strip()]
        if inp.get("startSsh") and "22/tcp" not in ports:
            ports.append("22/tcp")
        with self._lock:
            if self._closing.is_set():
                raise _GraphQLError("simulator shutting down", status=503)
            gt = self._gpu_types.get(str(gpu_type_id))
            if gt is None:
                raise _GraphQLError(f"Invalid gpuTypeId: {gpu_type_id}")
            fault = self._take(self._capacity, None, gt.id)
            if fault is not None:
                raise _GraphQLError(fault.message)
            cloud = self._pick_cloud(gt, str(inp.get("cloudType") or "ALL"), count, spot)
            per_gpu = gt.price(cloud, spot)
            assert per_gpu is not None  # _pick_cloud checked
            bid: float | None = None
            if spot:
                raw_bid = inp.get("bidPerGpu")
                if not isinstance(raw_bid, int | float):
                    raise _GraphQLError("bidPerGpu is required for interruptible pods")
                bid = float(raw_bid)
                if bid < per_gpu:
                    raise _GraphQLError(
                        f"Your bid of ${bid:.3f}/hr is below the minimum bid price of "
                        f"${per_gpu:.3f}/hr for this GPU"
                    )
                per_gpu = bid
            overrides = self._take_pod_faults(gt.id)
            pod_id = _pod_id()
            while pod_id in self._pods:
                pod_id = _pod_id()
            keys = [ln.strip() for ln in env.get("PUBLIC_KEY", "").splitlines() if ln.strip()]
            if self.account_public_key:
                keys.append(self.account_public_key.strip())
            visible = 0 if self.cpu_only else count
            if overrides.visible_gpus is not None:
                visible = min(count, overrides.visible_gpus)
            now = self.now()
            pod = _Pod(
                id=pod_id,
                name=str(inp.get("name") or ""),
                gpu_type=gt,
                gpu_count=count,
                visible_gpus=visible,
                cloud=cloud,
                spot=spot,
                bid=bid,
                per_gpu=per_gpu,
                image=image,
                env=env,
                public_keys=keys,
                ports=ports,
                host_id=f"{pod_id}-{secrets.token_hex(4)}",
                created_at=now,
                terminate_after=terminate_after,
                stop_after=stop_after,
                ssh_mode=overrides.ssh_mode or "ok",
                startup_delay=(
                    overrides.startup_delay
                    if overrides.startup_delay is not None
                    else self.startup_delay
                ),
                port_delay=(
                    overrides.port_delay if overrides.port_delay is not None else self.port_delay
                ),
                holds_gpus=True,
            )
            pod.running_at = self._mono() + max(0.0, self.provision_delay)
            pod.desired = "RUNNING" if self.provision_delay <= 0 else "CREATED"
            pod.last_change = _status_word("Rented by User", now)
            pod.history.append(pod.desired)
            self._write_pod_files(pod)
            late = self._take(self._late, None)
            if late is not None:
                # The provider acts late: the pod exists only from its release on.
                self._held[pod_id] = pod
                if late.retry_after >= 0:
                    timer = threading.Timer(late.retry_after, self._release, args=(pod_id,))
                    timer.daemon = True
                    timer.start()
                log.info("deploy of pod %s held back (late_deploy)", pod_id)
                if late.mode == "drop":
                    raise _DropConnection
                raise _LostAs504
            self._pods[pod_id] = pod
            answer = self._pod_json(pod)
            lost = self._take(self._lost, None)
            self._start_boot(pod)
        log.info("deployed pod %s (%s x%d, %s)", pod_id, gt.id, count, cloud)
        if lost is not None:
            if lost.mode == "drop":
                raise _DropConnection
            raise _LostAs504
        return answer

    def _pick_cloud(self, gt: SimGpuType, wanted: str, count: int, spot: bool) -> str:
        clouds = ["SECURE", "COMMUNITY"] if wanted.upper() == "ALL" else [wanted.upper()]
        held = self._held_gpus().get(gt.id, 0)
        free = None if gt.available is None else gt.available - held
        usable = [
            c
            for c in clouds
            if c in ("SECURE", "COMMUNITY")
            and gt.price(c, spot) is not None
            and gt.stock(c) is not None
            and count <= gt.max_gpu_count
            and (free is None or count <= free)
        ]
        if not usable:
            raise _GraphQLError(CAPACITY_MESSAGE)
        return min(usable, key=lambda c: gt.price(c, spot) or 0.0)

    def _take_pod_faults(self, gpu_type_id: str) -> _PodFault:
        merged = _PodFault(None, None)
        for f in list(self._pod_faults):
            if f.gpu_type_id is not None and f.gpu_type_id != gpu_type_id:
                continue
            for name in ("startup_delay", "port_delay", "ssh_mode", "visible_gpus"):
                if getattr(f, name) is not None:
                    setattr(merged, name, getattr(f, name))
            if f.remaining is not None:
                f.remaining -= 1
                if f.remaining <= 0:
                    self._pod_faults.remove(f)
        return merged

    def _pod_or_error(self, inp: dict[str, Any], message: str) -> _Pod:
        pod = self._pods.get(str(inp.get("podId")))
        if pod is None or pod.desired == "TERMINATED":
            raise _GraphQLError(message)
        return pod

    def _terminate_answer(self, inp: dict[str, Any]) -> None:
        with self._lock:
            pod = self._pod_or_error(inp, TERMINATE_NOT_FOUND_MESSAGE)
        self._terminate(pod.id, by="user")
        return None

    def _stop_answer(self, inp: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            pod = self._pod_or_error(inp, POD_NOT_FOUND_MESSAGE)
        self._stop_pod(pod.id, verb="Exited by User")
        return {"id": pod.id, "desiredStatus": "EXITED"}

    def _resume_answer(self, inp: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            pod = self._pod_or_error(inp, POD_NOT_FOUND_MESSAGE)
            if pod.desired != "EXITED":
                raise _GraphQLError(f"Pod {pod.id} is not stopped (status {pod.desired})")
            count = inp.get("gpuCount", pod.gpu_count)
            if isinstance(count, int) and count != pod.gpu_count:
                raise _GraphQLError(RESUME_CAPACITY_MESSAGE)
            gt = self._gpu_types.get(pod.gpu_type.id, pod.gpu_type)
            held = self._held_gpus().get(gt.id, 0)
            if gt.available is not None and held + pod.gpu_count > gt.available:
                raise _GraphQLError(RESUME_CAPACITY_MESSAGE)
            pod.holds_gpus = True
            pod.gen += 1
            pod.cancel = threading.Event()
            pod.ready_at = None
            pod.running_at = self._mono()
            self._set_status(pod, "RUNNING", "Resumed by User")
            self._start_boot(pod)
            return {"id": pod.id, "desiredStatus": "RUNNING"}

    # -- state changes ----------------------------------------------------------------------

    def _set_status(self, pod: _Pod, status: str, verb: str) -> None:
        pod.desired = status
        pod.last_change = _status_word(verb, self.now())
        pod.history.append(status)

    def _halt(self, pod: _Pod) -> _Listener | None:
        """Under the lock: cancel the pod's boot and detach its listener (stopped by the caller)."""
        pod.gen += 1
        pod.cancel.set()
        pod.ready_at = None
        pod.holds_gpus = False
        listener, pod.listener = pod.listener, None
        return listener

    def _stop_pod(self, pod_id: str, *, verb: str) -> None:
        with self._lock:
            pod = self._pods[pod_id]
            if pod.desired in ("EXITED", "TERMINATED"):
                return
            listener = self._halt(pod)
            self._set_status(pod, "EXITED", verb)
        if listener is not None:
            listener.stop()

    def _terminate(self, pod_id: str, *, by: str) -> None:
        with self._lock:
            pod = self._pods[pod_id]
            if pod.desired == "TERMINATED":
                return
            listener = self._halt(pod)
            self._set_status(pod, "TERMINATED", "Terminated")
            pod.terminated_at = self.now()
            pod.terminated_by = by
        # Synchronously, so that once podTerminate has answered the sshd is gone.
        if listener is not None:
            listener.stop()
        log.info("terminated pod %s (%s)", pod_id, by)

    def _reap(self) -> None:
        """Enforce terminateAfter / stopAfter on the simulator's clock."""
        while not self._closing.wait(0.05):
            now = self.now()
            with self._lock:
                expired = [
                    p.id
                    for p in self._pods.values()
                    if p.desired != "TERMINATED"
                    and p.terminate_after is not None
                    and now >= p.terminate_after
                ]
                to_stop = [
                    p.id
                    for p in self._pods.values()
                    if p.desired not in ("TERMINATED", "EXITED")
                    and p.stop_after is not None
                    and now >= p.stop_after
                ]
            for pod_id in expired:
                self._terminate(pod_id, by="terminateAfter")
            for pod_id in to_stop:
                self._stop_pod(pod_id, verb="Exited by stopAfter")

    # -- booting pods ----------------------------------------------------------------------

    def _start_boot(self, pod: _Pod) -> None:
        if self._closing.is_set():
            return  # stop() has collected the boot threads already: start no sshd it won't see
        t = threading.Thread(
            target=self._boot, args=(pod, pod.gen, pod.cancel), name=f"boot-{pod.id}", daemon=True
        )
        self._threads = [x for x in self._threads if x.is_alive()]
        self._threads.append(t)
        t.start()

    def _wait_until(self, when: float, cancel: threading.Event) -> bool:
        # Short slices so advance() and stop() take effect promptly.
        while True:
            left = when - self._mono()
            if left <= 0:
                return not cancel.is_set()
            if cancel.wait(min(left, 0.02)):
                return False

    def _boot(self, pod: _Pod, gen: int, cancel: threading.Event) -> None:
        if not self._wait_until(pod.running_at, cancel):
            return
        with self._lock:
            if pod.gen != gen:
                return
            if pod.desired == "CREATED":
                self._set_status(pod, "RUNNING", "Rented by User")
        if not self._wait_until(pod.running_at + pod.startup_delay, cancel):
            return
        try:
            listener = self._open_listener(pod)
        except Exception:
            # The pod stays STARTING forever, as a pod whose container never comes up does.
            log.exception("pod %s: could not start its sshd", pod.id)
            return
        with self._lock:
            stale = pod.gen != gen or self._closing.is_set()
            if not stale:
                pod.listener = listener
                pod.ssh_port = listener.port
                pod.ssh_pid = listener.pid
                pod.ready_at = self._mono()
        if stale:
            listener.stop()

    def _open_listener(self, pod: _Pod) -> _Listener:
        port = _reserve_port()
        if pod.ssh_mode == "refuse":
            return _ClosedPort(port)
        if pod.ssh_mode == "hang":
            return _HangingPort(port)
        env = {
            "PATH": f"{pod.dir / 'bin'}:{SYSTEM_PATH}",
            "RUNPOD_POD_ID": pod.id,
            "RUNPOD_POD_HOSTNAME": pod.host_id,
            "RUNPOD_GPU_COUNT": str(pod.gpu_count),
            "RUNPOD_PUBLIC_IP": "127.0.0.1",
        }
        for k, v in pod.env.items():
            if k not in env and _ENV_NAME.match(k) and _ENV_VALUE.match(v):
                env[k] = v
        setenv = " ".join(f'"{k}={v}"' for k, v in env.items())
        server = SSHServer(port=port, extra_config=f"SetEnv {setenv}\n")
        server.start()
        if server.port != port:
            with _PORT_LOCK:
                _USED_PORTS.add(server.port)
        if pod.ssh_mode == "ok" and pod.public_keys and server.dir is not None:
            # sshd reads authorized_keys at each login, so adding after start is enough; the port
            # is not published before this returns.
            with open(server.dir / "authorized_keys", "a") as fh:
                fh.write("".join(k + "\n" for k in pod.public_keys))
        return _SshdListener(server)

    def _write_pod_files(self, pod: _Pod) -> None:
        assert self._dir is not None
        pod.dir = self._dir / "pods" / pod.id
        bin_dir = pod.dir / "bin"
        bin_dir.mkdir(parents=True)
        gpus = _gpu_rows(pod)
        if not gpus and not self._real_nvidia_smi:
            return  # a CPU-only box: no nvidia-smi at all
        (bin_dir / "gpus.json").write_text(
            json.dumps(
                {
                    "driver_version": DRIVER_VERSION,
                    "cuda_version": CUDA_VERSION,
                    # Shadow the host's real nvidia-smi: a GPU-less pod must not see its GPUs.
                    "driver_error": not gpus,
                    "gpus": gpus,
                    "processes": [],
                }
            )
        )
        script = Path(__file__).with_name("fake_nvidia_smi.py").read_text()
        python = sys.executable or "/usr/bin/env python3"
        target = bin_dir / "nvidia-smi"
        target.write_text(f"#!{python} -IS\n{script}")
        target.chmod(0o755)


class _LostAs504(Exception):
    """Answer 504 after acting (a gateway gave up waiting for the backend)."""


def _gpu_rows(pod: _Pod) -> list[dict[str, Any]]:
    gt = pod.gpu_type
    return [
        {
            "index": i,
            "uuid": f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'runpod-sim/{pod.id}/{i}')}",
            "name": gt.smi_name or gt.id,
            "memory_total_mib": gt.memory_mib or gt.memory_gb * 1024,
            "memory_used_mib": 0,
            "utilization_pct": 0,
            "compute_cap": gt.compute_cap,
            "bus_id": f"00000000:{0x18 + 0x10 * i:02X}:00.0",
        }
        for i in range(pod.visible_gpus)
    ]


def _input(variables: dict[str, Any], query: str) -> dict[str, Any]:
    """The ``input`` argument: the ``$input`` variable, or an inline object literal."""
    value = variables.get("input")
    if isinstance(value, dict):
        return value
    m = re.search(r"\(\s*input\s*:\s*(\$\w+|\{[^}]*\})\s*\)", query)
    return _literal_or_variable(m.group(1), variables) if m else {}


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class _QuietServer(ThreadingHTTPServer):
    """No traceback on stderr when a client hangs up mid-answer (BrokenPipe, reset)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("client %s went away: %s", client_address, exc)
            return
        log.exception("simulator error while serving %s", client_address)


_API_KEY_IN_URL = re.compile(r"(?i)(api_key=)[^&\s\"]+")


def _json(status: int, payload: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _make_handler(sim: RunPodSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "runpod-sim/1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length > 0 else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                status, extra, body = sim._handle(self.path, headers, raw)
            except Exception:
                log.exception("simulator error")
                status, extra, body = _json(500, {"error": "Internal Server Error"})
            if body is None:
                # The pod exists, but the client never hears about it.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if urlsplit(self.path).path.rstrip("/") in ("", "/_sim/pods"):
                payload = {
                    "simulator": "runpod",
                    "graphql": f"{sim.url}/graphql",
                    "pods": [_info_json(p) for p in sim.pods()],
                }
                status, extra, body = _json(200, payload)
            else:
                status, extra, body = _json(404, {"error": "Not Found"})
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def handle(self) -> None:
            # A client that gives up (timeout, Ctrl-C) closes its end: not worth a traceback.
            with contextlib.suppress(ConnectionError):
                super().handle()

        def log_message(self, format: str, *args: Any) -> None:
            # The default writes every request line to stderr; the request line may carry
            # ?api_key=..., so that is redacted (headers never appear).
            log.debug("http: %s", _API_KEY_IN_URL.sub(r"\1***", format % args))

    return Handler


def _info_json(info: PodInfo) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in info.__dict__.items():
        out[k] = (
            v.isoformat() if isinstance(v, datetime) else list(v) if isinstance(v, tuple) else v
        )
    return out


# -- command line ---------------------------------------------------------------------------------


def _load_gpu_types(path: str) -> list[SimGpuType]:
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list):
        raise SystemExit(f"{path}: expected a JSON list of GPU types")
    return [SimGpuType(**item) for item in raw]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m broker.testing.runpod_sim``: serve in the foreground until Ctrl-C."""
    p = argparse.ArgumentParser(
        prog="python -m broker.testing.runpod_sim",
        description="A local RunPod GraphQL API whose pods are real sshd processes on 127.0.0.1.",
    )
    p.add_argument("--port", type=int, default=8765, help="HTTP port (0: any free one)")
    p.add_argument("--api-key", default="test", help="the key clients must send (default: test)")
    p.add_argument("--gpu-types", metavar="JSON", help="catalogue file: a list of SimGpuType dicts")
    p.add_argument("--provision-delay", type=float, default=0.0, help="seconds a pod is CREATED")
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds before sshd starts")
    p.add_argument("--port-delay", type=float, default=0.0, help="seconds before ports appear")
    p.add_argument("--cpu-only", action="store_true", help="pods show no GPUs")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s"
    )
    sim = RunPodSimulator(
        api_key=args.api_key,
        port=args.port,
        gpu_types=_load_gpu_types(args.gpu_types) if args.gpu_types else DEFAULT_GPU_TYPES,
        provision_delay=args.provision_delay,
        startup_delay=args.startup_delay,
        port_delay=args.port_delay,
        cpu_only=args.cpu_only,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    # Explicit handlers: a shell starting us in the background makes SIGINT ignored by default.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with sim:
        key = args.api_key if args.api_key == "test" else "<the --api-key value>"
        print(f"RunPod simulator on {sim.url} (GraphQL at /graphql, pod list at /_sim/pods)")
        print("Point broker at it:")
        print(f"  RUNPOD_API_URL={sim.url} RUNPOD_API_KEY={key} broker search --provider runpod")
        if os.geteuid() != 0:
            print(
                "Not root: pods' sshd run as you and only your user can log in "
                "(the endpoint RunPod reports says root)."
            )
        print("Ctrl-C stops it and kills every pod.", flush=True)
        while not done.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
