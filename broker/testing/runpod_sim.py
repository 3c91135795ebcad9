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
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from pydantic import SecretStr

from broker.testing.sim.catalogue import (
    CAPACITY_MESSAGE,
    DEFAULT_GPU_TYPES,
    POD_NOT_FOUND_MESSAGE,
    RESUME_CAPACITY_MESSAGE,
    SYSTEM_PATH,
    TERMINATE_NOT_FOUND_MESSAGE,
    LostMode,
    SimGpuType,
    SshMode,
    _load_gpu_types,
)
from broker.testing.sim.faults import FaultsMixin, _CountedFault, _PodFault
from broker.testing.sim.graphql import (
    MAX_LOGGED_REQUESTS,
    GraphQLMixin,
    RequestRecord,
    parse_operation,
)
from broker.testing.sim.pods import PodInfo, PodsMixin, _Pod
from broker.testing.sim.server import _make_handler, _QuietServer

__all__ = [
    "CAPACITY_MESSAGE",
    "DEFAULT_GPU_TYPES",
    "MAX_LOGGED_REQUESTS",
    "POD_NOT_FOUND_MESSAGE",
    "RESUME_CAPACITY_MESSAGE",
    "TERMINATE_NOT_FOUND_MESSAGE",
    "LostMode",
    "PodInfo",
    "RequestRecord",
    "RunPodSimulator",
    "SimGpuType",
    "SshMode",
    "main",
    "parse_operation",
]

log = logging.getLogger(__name__)

# -- the simulator ------------------------------------------------------------------------------

#: Started and not yet stopped (strong references: a forgotten simulator must still be stopped).
_LIVE: set[RunPodSimulator] = set()


@atexit.register
def _stop_all() -> None:
    # Backstop for a test run that forgot stop(): never leave sshd processes behind.
    for sim in list(_LIVE):
        sim.stop()


class RunPodSimulator(FaultsMixin, PodsMixin, GraphQLMixin):
    """A RunPod-speaking GraphQL server on 127.0.0.1 whose pods are real sshd processes.

    The facade over the parts in :mod:`broker.testing.sim` (catalogue, fault registry, pods,
    GraphQL handling, server); this class adds the lifecycle, the clock and the catalogue API.

    >>> with RunPodSimulator(api_key="test") as sim:                       # doctest: +SKIP
    ...     rp = RunPodProvider(SecretStr("test"), base_url=sim.url, ssh_public_key=pub)
    ...     inst = rp.create(CreateRequest(offer=offer, name="broker-0001"))

    Timing: a deployed pod is ``CREATED`` for ``provision_delay`` seconds, then ``RUNNING`` with
    ``runtime: null`` for ``startup_delay`` seconds plus the time its sshd takes to start, then has
    a runtime whose ``ports`` stay empty for ``port_delay`` seconds, and then publishes
    ``127.0.0.1:<sshd port>`` for private port 22. These three are plain attributes and may be
    changed between calls; the fault methods override them per pod.

    Pods log in as this machine's user, so by default their bash sessions read that user's
    ``~/.bashrc`` like any SSH session here. ``shell_rc=False`` skips it (bash treats the session
    as a nested shell), as on a stock image whose ``.bashrc`` returns at once for non-interactive
    shells: benchmarks use it so a developer's rc files (``pyenv init`` forks hundreds of
    processes) are not billed to every simulated session.

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
        shell_rc: bool = True,
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
        self.shell_rc = shell_rc
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
    p.add_argument(
        "--no-shell-rc", action="store_true", help="pods' SSH sessions skip the user's ~/.bashrc"
    )
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
        shell_rc=not args.no_shell_rc,
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
