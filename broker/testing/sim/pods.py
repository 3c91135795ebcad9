"""Pods: their state, the listeners on their SSH ports, booting, provider-side events."""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bifrost.testing import SSHServer, free_port
from broker.testing.sim.catalogue import (
    CUDA_VERSION,
    DRIVER_VERSION,
    SYSTEM_PATH,
    SimGpuType,
    SshMode,
)
from broker.testing.sim.state import SimState

if TYPE_CHECKING:
    from broker.testing.sim.graphql import RequestRecord

log = logging.getLogger("broker.testing.runpod_sim")


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
    shell_rc: bool = True  # the simulator's setting when the pod was deployed
    gpus_hang: bool = False  # nvidia-smi never answers (wedge_gpus)
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


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_VALUE = re.compile(r'^[^"\\\r\n]*$')


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


class PodsMixin(SimState):
    """Pod state changes, boot, provider-side events and inspection."""

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
        if not pod.shell_rc:
            # bash reads ~/.bashrc for an SSH command only as a top-level shell (SHLVL < 2).
            env["SHLVL"] = "1"
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
                    "hang": pod.gpus_hang,
                    "gpus": gpus,
                    "processes": [],
                }
            )
        )
        script = (Path(__file__).parent.parent / "fake_nvidia_smi.py").read_text()
        python = sys.executable or "/usr/bin/env python3"
        target = bin_dir / "nvidia-smi"
        target.write_text(f"#!{python} -IS\n{script}")
        target.chmod(0o755)
