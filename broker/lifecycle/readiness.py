"""Readiness: one function per stage, all under one deadline and one polling helper.

provider running → SSH endpoint published (a direct one: proxies allow no file transfer) → TCP
port open → SSH login with the configured key → probe (``nvidia-smi`` shows the GPU count and
model of the offer; CPU-only boxes must answer a shell command).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from broker import catalog
from broker.errors import NotFoundError, ProviderError, ReadinessError
from broker.lifecycle.base import Deadline, LifecycleClient, ProgressFn, Retry, Stage, poll
from broker.types import GPUOffer, Instance, InstanceStatus, SSHEndpoint

if TYPE_CHECKING:
    from bifrost import Host
    from broker.providers.base import Provider

T = TypeVar("T")


class _Run:
    """The state one readiness walk shares between its stages."""

    def __init__(
        self,
        client: LifecycleClient,
        inst: Instance,
        deadline: Deadline,
        on_progress: ProgressFn | None,
    ) -> None:
        self.client = client
        self.inst = inst
        self.deadline = deadline
        self.on_progress = on_progress
        self.provider: Provider = client.get_provider(inst.provider)
        self.stage = Stage.PROVIDER
        self.last = ""

    def progress(self, detail: str) -> None:
        if self.on_progress is not None and detail != self.last:
            self.on_progress(self.stage.value, detail)
        self.last = detail

    def fail(self, message: str) -> ReadinessError:
        return ReadinessError(
            message,
            stage=self.stage,
            provider=self.inst.provider,
            instance_id=self.inst.instance_id,
            name=self.inst.name,
            elapsed_s=self.deadline.elapsed,
        )

    def poll(self, step: Callable[[], T | Retry], timeout_message: str) -> T:
        return poll(
            step,
            self.deadline,
            on_wait=self.progress,
            on_timeout=lambda last: self.fail(
                f"{timeout_message}: {last}" if last else timeout_message
            ),
        )

    def record(self, cur: Instance) -> None:
        journal = self.client.journal
        name = self.inst.name
        if name and journal.get(name) is not None:
            journal.record_status(name, cur.status, ssh_target=cur.ssh.target if cur.ssh else None)


def _gpu_matches(offer: GPUOffer, smi_name: str, memory_mib: int | None) -> bool:
    if not offer.gpu_known:
        return offer.gpu_provider_name.lower() in smi_name.lower() or catalog.name_contains(
            smi_name, offer.gpu_type, offer.gpu_provider_name
        )
    res = catalog.resolve(
        smi_name,
        vram_gb=memory_mib / 1024 if memory_mib else None,
        manufacturer=offer.manufacturer,
    )
    return res.name == offer.gpu_type or catalog.name_matches(res.name, offer.gpu_type)


def _stage_provider(run: _Run, is_local: bool) -> Instance:
    """provider says running and (for SSH boxes) publishes a direct endpoint."""

    def step() -> Instance | Retry:
        try:
            cur = run.provider.get(run.inst.instance_id)
        except NotFoundError:
            raise run.fail("the provider no longer knows the instance") from None
        except ProviderError as e:  # a flaky API is not a dead instance: retry to the deadline
            return Retry(f"provider API error, retrying: {e}")
        run.record(cur)
        if cur.status in (InstanceStatus.TERMINATED, InstanceStatus.ERROR, InstanceStatus.STOPPED):
            raise run.fail(f"instance is {cur.status.value} ({cur.provider_status})")
        if cur.status is not InstanceStatus.RUNNING:
            return Retry(f"{cur.status.value} ({cur.provider_status})")
        if is_local:
            return cur
        run.stage = Stage.ENDPOINT
        if cur.ssh is not None and cur.ssh.direct:
            return cur
        return Retry(
            "waiting for a direct SSH port"
            + (f" (only the proxy {cur.ssh.target})" if cur.ssh is not None else "")
        )

    return run.poll(step, "not running with a direct SSH port at the deadline")


def _stage_tcp(run: _Run, ep: SSHEndpoint) -> None:
    run.stage = Stage.TCP
    run.progress(f"connecting to {ep.host}:{ep.port}")

    def step() -> bool | Retry:
        try:
            with socket.create_connection(
                (ep.host, ep.port), timeout=max(0.5, min(5.0, run.deadline.left))
            ):
                return True
        except OSError as e:
            return Retry(f"{ep.host}:{ep.port} not open yet ({e.strerror or e})")

    run.poll(step, f"port {ep.host}:{ep.port} never opened")


def _stage_login(run: _Run, ep: SSHEndpoint) -> Host:
    from bifrost import BifrostError, Host, HostKeyChangedError, forget_host

    # A new instance's key cannot be the one pinned for a previous box that had the same
    # address (providers reuse IP:port), so drop any old pin first.
    run.stage = Stage.LOGIN
    if not run.provider.capabilities.persistent_hosts:
        forget_host(ep.host, ep.port)
    run.progress(f"logging in as {ep.user}")
    key = run.client.settings.ssh_key_path

    def step() -> Host | Retry:
        host = Host(ep.target, identity_file=key)
        # Under the deadline, one try per poll; a host handed on afterwards gets Host's own
        # defaults back (see wait_until_ready).
        host.connect_timeout, host.retries = max(1.0, min(15.0, run.deadline.left)), 0
        try:
            # Logged in once the connection is up (the key accepted); the probe that follows
            # runs the first command, so none is spent on `true`.
            host.connect()
            return host
        except HostKeyChangedError as e:
            host.close()
            raise run.fail(str(e)) from None
        except BifrostError as e:
            host.close()
            # The image's start script installs our key a little after sshd starts, so an
            # auth failure is retried here (unlike in bifrost itself) until the deadline.
            return Retry(f"login failed, retrying: {e}")

    return run.poll(step, "could not log in")


def _stage_probe(run: _Run, host: Host, cur: Instance) -> None:
    from bifrost import BifrostError

    run.stage = Stage.PROBE
    run.progress("checking GPUs")
    try:
        offer = run.inst.offer or cur.offer
        want = offer.gpu_count if offer is not None else (run.inst.gpu_count or 0)
        if want > 0:
            report = host.gpus(processes=False, timeout=max(1.0, min(60.0, run.deadline.left)))
            if not report.available:
                raise run.fail(f"expected {want} GPU(s), found none: {report.message}")
            if len(report.gpus) != want:
                raise run.fail(f"expected {want} GPU(s), nvidia-smi lists {len(report.gpus)}")
            if offer is not None:
                bad = [
                    g.name
                    for g in report.gpus
                    if not _gpu_matches(offer, g.name, g.memory_total_mib)
                ]
                if bad:
                    raise run.fail(f"paid for {offer.gpu_type}, got {', '.join(sorted(set(bad)))}")
        else:
            res = host.exec("nproc", timeout=max(1.0, min(30.0, run.deadline.left)), warn=True)
            if res.exit_code != 0:
                raise run.fail(f"probe command failed: {res.stderr.strip()[:200]}")
    except BifrostError as e:
        raise run.fail(f"probe failed: {e}") from None


def wait_until_ready(
    client: LifecycleClient,
    inst: Instance,
    *,
    timeout: float | None = None,
    on_progress: ProgressFn | None = None,
    keep_host: Callable[[Host], None] | None = None,
) -> Instance:
    """Walk the readiness stages under one deadline; return the instance as last seen.

    ``keep_host`` receives the logged-in :class:`bifrost.Host` of a ready box (its connection
    still open, its own connect settings back) instead of it being closed, so the caller's
    next command needs no second SSH handshake; the caller then owns (and closes) it.

    Raises :class:`ReadinessError` naming the stage that did not finish.
    """
    from bifrost import Host

    deadline = Deadline(timeout if timeout is not None else client.settings.ready_timeout_s)
    run = _Run(client, inst, deadline, on_progress)
    is_local = inst.extra.get("target") == "local"
    cur = _stage_provider(run, is_local)
    if is_local:
        host = Host("local")
    else:
        assert cur.ssh is not None
        _stage_tcp(run, cur.ssh)
        host = _stage_login(run, cur.ssh)
    kept = False
    try:
        _stage_probe(run, host, cur)
        run.stage = Stage.READY
        run.progress("ready")
        if keep_host is not None:
            defaults = Host.__init__.__kwdefaults__ or {}
            host.connect_timeout = defaults.get("connect_timeout", host.connect_timeout)
            host.retries = defaults.get("retries", host.retries)
            keep_host(host)
            kept = True
    finally:
        if not kept:
            host.close()
    return cur
