"""The instance handle scripts get from ``GPUClient.create``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import PrivateAttr

from broker.errors import BrokerError, ConfigError, ReadinessError
from broker.lifecycle.base import ProgressFn, Stage
from broker.lifecycle.readiness import wait_until_ready
from broker.lifecycle.reconcile import terminate
from broker.types import Instance, InstanceStatus

if TYPE_CHECKING:
    from bifrost import Host
    from broker.client import GPUClient

log = logging.getLogger(__name__)


class ManagedInstance(Instance):
    """An :class:`Instance` tied to the client that created it.

    As a context manager it terminates the instance when the block ends, normally or by an
    exception::

        with client.create("gpu=A100 & vram>=80", gpu_count=2, ttl="3h") as inst:
            inst.host().exec("nvidia-smi")
    """

    _client: GPUClient | None = PrivateAttr(default=None)
    # The connection readiness logged in with, handed to the first plain host() call.
    _ready_host: Host | None = PrivateAttr(default=None)

    def bind(self, client: GPUClient) -> ManagedInstance:
        """Attach the client used for refresh/terminate (returns self)."""
        self._client = client
        return self

    @property
    def client(self) -> GPUClient:
        """The client that manages this instance."""
        if self._client is None:
            raise ConfigError("this instance is not bound to a GPUClient")
        return self._client

    @property
    def target(self) -> str:
        """The bifrost target: ``local`` for this machine, else ``user@host:port``."""
        if self.extra.get("target") == "local":
            return "local"
        if self.ssh is None:
            raise ReadinessError(
                "no SSH endpoint published yet",
                stage=Stage.ENDPOINT,
                provider=self.provider,
                instance_id=self.instance_id,
                name=self.name,
            )
        return self.ssh.target

    def host(self, **options: Any) -> Host:
        """A :class:`bifrost.Host` for this instance, logging in with the configured key.

        The first call without options gets the connection the readiness check logged in
        with (no second SSH handshake); later calls, and calls with options, open their own.
        """
        from bifrost import Host

        if not options and self._ready_host is not None:
            ready, self._ready_host = self._ready_host, None
            return ready
        key = self.client.settings.ssh_key_path
        if self.target != "local" and key is not None:
            options.setdefault("identity_file", key)
        return Host(self.target, **options)

    def ssh_command(self) -> str:
        """A plain ``ssh`` command line for this instance."""
        if self.ssh is None:
            raise ReadinessError(
                "no SSH endpoint published yet",
                stage=Stage.ENDPOINT,
                provider=self.provider,
                instance_id=self.instance_id,
                name=self.name,
            )
        key = self.client.settings.ssh_key_path
        return self.ssh.ssh_command(str(key) if key else None)

    def refresh(self) -> ManagedInstance:
        """Re-read the state from the provider (in place; returns self)."""
        fresh = self.client.get_provider(self.provider).get(self.instance_id)
        for name in ("status", "provider_status", "ssh", "price_per_hour", "observed_at"):
            setattr(self, name, getattr(fresh, name))
        return self

    def wait_until_ready(
        self, timeout: float | None = None, *, on_progress: ProgressFn | None = None
    ) -> ManagedInstance:
        """Block until the box is usable (see :func:`wait_until_ready`); returns self."""
        ready = wait_until_ready(
            self.client, self, timeout=timeout, on_progress=on_progress, keep_host=self.keep_host
        )
        self.status, self.ssh = ready.status, ready.ssh
        return self

    def keep_host(self, host: Host) -> None:
        """Hold ``host`` (a logged-in connection to this box) for the next :meth:`host` call."""
        old, self._ready_host = self._ready_host, host
        if old is not None:
            old.close()

    def _drop_ready_host(self) -> None:
        if self._ready_host is not None:
            ready, self._ready_host = self._ready_host, None
            ready.close()

    def detach(self) -> ManagedInstance:
        """Let the instance outlive this process (it stays until terminated or its TTL)."""
        if self.name:
            self.client.journal.set_owner(self.name, None)
        return self

    def terminate(self, *, wait: bool = True, timeout: float = 300.0) -> None:
        """Destroy the instance and confirm it is gone."""
        self._drop_ready_host()
        terminate(self.client, self, wait=wait, timeout=timeout)
        self.status = InstanceStatus.TERMINATED

    def __enter__(self) -> ManagedInstance:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        entry = self.client.journal.get(self.name) if self.name else None
        if entry is not None and entry.owner is None:
            return  # detached inside the block: it outlives the block, as asked
        try:
            self.terminate()
        except BrokerError as e:
            if exc is None:
                raise
            # Do not hide the user's own exception; the entry stays open for reap/reconcile.
            log.error("could not terminate %s after an error in the block: %s", self.name, e)
