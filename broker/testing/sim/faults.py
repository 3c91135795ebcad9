"""The fault registry: what goes wrong on which requests or pods, and how often."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from broker.testing.sim.catalogue import (
    CAPACITY_MESSAGE,
    LostMode,
    SshMode,
)
from broker.testing.sim.pods import _status_word
from broker.testing.sim.state import SimState

log = logging.getLogger("broker.testing.runpod_sim")


@dataclass
class _PodFault:
    """Applies to the next ``remaining`` pods (None: every pod) of ``gpu_type_id`` (None: any)."""

    remaining: int | None
    gpu_type_id: str | None
    startup_delay: float | None = None
    port_delay: float | None = None
    ssh_mode: SshMode | None = None
    visible_gpus: int | None = None
    gpus_hang: bool | None = None


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


class FaultsMixin(SimState):
    """Fault injection (public) and the lookups the request handlers use."""

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

    def wedge_gpus(self, n: int | None = 1, *, gpu_type_id: str | None = None) -> None:
        """The next ``n`` pods have a wedged driver: their nvidia-smi never answers (it hangs
        until killed, as the real one does on a GPU that fell off the bus)."""
        self._add_pod_fault(_PodFault(n, gpu_type_id, gpus_hang=True))

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
