"""The state the simulator's parts share (declared once, so each part type-checks alone)."""

from __future__ import annotations

import threading
from datetime import datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

if TYPE_CHECKING:
    from broker.testing.sim.catalogue import SimGpuType
    from broker.testing.sim.faults import _CountedFault, _PodFault
    from broker.testing.sim.graphql import RequestRecord
    from broker.testing.sim.pods import _Listener, _Pod


class SimState:
    """Attributes set by ``RunPodSimulator.__init__`` and the methods parts call on each other."""

    _api_key: SecretStr
    _port: int
    _gpu_types: dict[str, SimGpuType]
    provision_delay: float
    startup_delay: float
    port_delay: float
    account_public_key: str | None
    cpu_only: bool
    client_balance: float
    _lock: threading.RLock
    _pods: dict[str, _Pod]
    _requests: list[RequestRecord]
    _capacity: list[_CountedFault]
    _rate_limits: list[_CountedFault]
    _http_faults: list[_CountedFault]
    _lost: list[_CountedFault]
    _late: list[_CountedFault]
    _slow: list[_CountedFault]
    _held: dict[str, _Pod]
    _pod_faults: list[_PodFault]
    _offset: float
    _server: ThreadingHTTPServer | None
    _threads: list[threading.Thread]
    _closing: threading.Event
    _dir: Path | None
    _real_nvidia_smi: bool
    shell_rc: bool

    # -- implemented by the facade or another part ----------------------------------------------
    def now(self) -> datetime:
        """The simulator's wall clock."""
        raise NotImplementedError

    def _mono(self) -> float:
        raise NotImplementedError

    def _start_boot(self, pod: _Pod) -> None:
        raise NotImplementedError

    def _terminate(self, pod_id: str, *, by: str) -> None:
        raise NotImplementedError

    def _stop_pod(self, pod_id: str, *, verb: str) -> None:
        raise NotImplementedError

    def _set_status(self, pod: _Pod, status: str, verb: str) -> None:
        raise NotImplementedError

    def _halt(self, pod: _Pod) -> _Listener | None:
        raise NotImplementedError

    def _write_pod_files(self, pod: _Pod) -> None:
        raise NotImplementedError

    def _has_runtime(self, pod: _Pod, now: float) -> bool:
        raise NotImplementedError

    def _has_ports(self, pod: _Pod, now: float) -> bool:
        raise NotImplementedError

    def _cost(self, pod: _Pod) -> float:
        raise NotImplementedError

    def _release(self, pod_id: str) -> None:
        raise NotImplementedError

    def _take_pod_faults(self, gpu_type_id: str) -> _PodFault:
        raise NotImplementedError

    @staticmethod
    def _take(
        faults: list[_CountedFault], operation: str | None, gpu_type_id: str | None = None
    ) -> _CountedFault | None:
        raise NotImplementedError
