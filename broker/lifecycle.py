"""Instance lifecycle: create with failover, staged readiness, terminate, reap, reconcile.

The rules that keep every instance accounted for:

* The journal entry (with the unique ``broker-<id>`` name also sent to the provider) is written
  *before* the provider is called, so a create interrupted at any point can be found by name.
* An entry is either *held* by a live process (``owner``: host, pid and the pid's start time, so a
  reused pid is not mistaken for the holder) or *detached* (``owner`` empty: ``broker create``, a
  script that calls :meth:`ManagedInstance.detach`). ``reconcile`` treats instances whose holder
  died as orphans; detached ones live until terminated or their TTL passes.
* ``terminate`` polls the provider until the instance is really gone before closing the entry.

:class:`~broker.client.GPUClient` exposes all of this; this module holds the mechanics.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import PrivateAttr

from broker import catalog
from broker.errors import (
    AmbiguousCreateError,
    AuthError,
    BrokerError,
    BudgetExceededError,
    ConfigError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    PriceLimitError,
    ProviderError,
    ProvisionError,
    RateLimitedError,
    ReadinessError,
    StaleOfferError,
    TerminateError,
)
from broker.journal import NAME_PREFIX, Journal, JournalEntry, new_name
from broker.types import (
    CreateRequest,
    GPUOffer,
    Instance,
    InstanceStatus,
    ProvisionAttempt,
    SSHEndpoint,
    utcnow,
)

if TYPE_CHECKING:
    from bifrost import Host
    from broker.client import GPUClient
    from broker.providers.base import Provider

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, str], None]
"""``on_progress(stage, detail)``: called whenever readiness moves on or has news."""


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


# -- the instance handle --------------------------------------------------------------------------


class ManagedInstance(Instance):
    """An :class:`Instance` tied to the client that created it.

    As a context manager it terminates the instance when the block ends, normally or by an
    exception::

        with client.create("gpu=A100 & vram>=80", gpu_count=2, ttl="3h") as inst:
            inst.host().exec("nvidia-smi")
    """

    _client: GPUClient | None = PrivateAttr(default=None)

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
        """A :class:`bifrost.Host` for this instance, logging in with the configured key."""
        from bifrost import Host

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
        ready = wait_until_ready(self.client, self, timeout=timeout, on_progress=on_progress)
        self.status, self.ssh = ready.status, ready.ssh
        return self

    def detach(self) -> ManagedInstance:
        """Let the instance outlive this process (it stays until terminated or its TTL)."""
        if self.name:
            self.client.journal.set_owner(self.name, None)
        return self

    def terminate(self, *, wait: bool = True, timeout: float = 300.0) -> None:
        """Destroy the instance and confirm it is gone."""
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


# -- readiness ------------------------------------------------------------------------------------


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.start = time.monotonic()
        self.end = self.start + timeout

    @property
    def left(self) -> float:
        return self.end - time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _backoff(delay: float, deadline: _Deadline) -> float:
    """Sleep ``delay`` (never past the deadline); returns the next, longer delay."""
    time.sleep(max(0.0, min(delay, deadline.left)))
    return min(delay * 1.5, 5.0)


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


def wait_until_ready(
    client: GPUClient,
    inst: Instance,
    *,
    timeout: float | None = None,
    on_progress: ProgressFn | None = None,
) -> Instance:
    """Walk the readiness stages under one deadline; return the instance as last seen.

    provider running → SSH endpoint published (a direct one: proxies allow no file transfer) →
    TCP port open → SSH login with the configured key → probe (``nvidia-smi`` shows the GPU
    count and model of the offer; CPU-only boxes must answer a shell command). Raises
    :class:`ReadinessError` naming the stage that did not finish.
    """
    from bifrost import BifrostError, Host, HostKeyChangedError, forget_host

    deadline = _Deadline(timeout if timeout is not None else client.settings.ready_timeout_s)
    provider = client.get_provider(inst.provider)
    journal = client.journal
    name = inst.name
    stage = Stage.PROVIDER
    last = ""

    def progress(detail: str) -> None:
        nonlocal last
        if on_progress is not None and detail != last:
            on_progress(stage.value, detail)
        last = detail

    def fail(message: str) -> ReadinessError:
        return ReadinessError(
            message,
            stage=stage,
            provider=inst.provider,
            instance_id=inst.instance_id,
            name=name,
            elapsed_s=deadline.elapsed,
        )

    def record(cur: Instance) -> None:
        if name and journal.get(name) is not None:
            journal.record_status(name, cur.status, ssh_target=cur.ssh.target if cur.ssh else None)

    # 1. provider says running (and, for SSH boxes, publishes a direct endpoint)
    cur = inst
    delay = 0.2
    is_local = inst.extra.get("target") == "local"
    while True:
        try:
            cur = provider.get(inst.instance_id)
        except NotFoundError:
            raise fail("the provider no longer knows the instance") from None
        except ProviderError as e:  # a flaky API is not a dead instance: retry to the deadline
            progress(f"provider API error, retrying: {e}")
        else:
            record(cur)
            if cur.status in (
                InstanceStatus.TERMINATED,
                InstanceStatus.ERROR,
                InstanceStatus.STOPPED,
            ):
                raise fail(f"instance is {cur.status.value} ({cur.provider_status})")
            if cur.status is InstanceStatus.RUNNING:
                if is_local:
                    break
                if stage is Stage.PROVIDER:
                    stage = Stage.ENDPOINT
                if cur.ssh is not None and cur.ssh.direct:
                    break
                progress(
                    "waiting for a direct SSH port"
                    + (f" (only the proxy {cur.ssh.target})" if cur.ssh is not None else "")
                )
            else:
                progress(f"{cur.status.value} ({cur.provider_status})")
        if deadline.left <= 0:
            raise fail(f"still {cur.status.value} at the deadline")
        delay = _backoff(delay, deadline)

    key = client.settings.ssh_key_path
    if is_local:
        host = Host("local")
    else:
        assert cur.ssh is not None
        ep: SSHEndpoint = cur.ssh
        # 2. TCP
        stage = Stage.TCP
        progress(f"connecting to {ep.host}:{ep.port}")
        delay = 0.2
        while True:
            try:
                with socket.create_connection(
                    (ep.host, ep.port), timeout=max(0.5, min(5.0, deadline.left))
                ):
                    break
            except OSError as e:
                progress(f"{ep.host}:{ep.port} not open yet ({e.strerror or e})")
            if deadline.left <= 0:
                raise fail(f"port {ep.host}:{ep.port} never opened")
            delay = _backoff(delay, deadline)
        # 3. login. A new instance's key cannot be the one pinned for a previous box that had
        # the same address (providers reuse IP:port), so drop any old pin first.
        stage = Stage.LOGIN
        if not provider.capabilities.persistent_hosts:
            forget_host(ep.host, ep.port)
        progress(f"logging in as {ep.user}")
        delay = 0.2
        while True:
            host = Host(
                ep.target,
                identity_file=key,
                connect_timeout=max(1.0, min(15.0, deadline.left)),
                retries=0,
            )
            try:
                host.exec("true", timeout=max(1.0, min(30.0, deadline.left)))
                break
            except HostKeyChangedError as e:
                host.close()
                raise fail(str(e)) from None
            except BifrostError as e:
                host.close()
                # The image's start script installs our key a little after sshd starts, so an
                # auth failure is retried here (unlike in bifrost itself) until the deadline.
                progress(f"login failed, retrying: {e}")
            if deadline.left <= 0:
                raise fail(f"could not log in: {last}")
            delay = _backoff(delay, deadline)

    # 4. probe
    stage = Stage.PROBE
    progress("checking GPUs")
    try:
        offer = inst.offer or cur.offer
        want = offer.gpu_count if offer is not None else (inst.gpu_count or 0)
        if want > 0:
            report = host.gpus()
            if not report.available:
                raise fail(f"expected {want} GPU(s), found none: {report.message}")
            if len(report.gpus) != want:
                raise fail(f"expected {want} GPU(s), nvidia-smi lists {len(report.gpus)}")
            if offer is not None:
                bad = [
                    g.name
                    for g in report.gpus
                    if not _gpu_matches(offer, g.name, g.memory_total_mib)
                ]
                if bad:
                    raise fail(f"paid for {offer.gpu_type}, got {', '.join(sorted(set(bad)))}")
        else:
            res = host.exec("nproc", timeout=max(1.0, min(30.0, deadline.left)), warn=True)
            if res.exit_code != 0:
                raise fail(f"probe command failed: {res.stderr.strip()[:200]}")
    except BifrostError as e:
        raise fail(f"probe failed: {e}") from None
    finally:
        host.close()
    stage = Stage.READY
    progress("ready")
    return cur


# -- create ---------------------------------------------------------------------------------------

_SLUG = re.compile(r"[^a-z0-9-]+")


def instance_name(label: str | None = None) -> str:
    """A fresh unique name, ``broker-<10 hex>`` plus an optional readable label."""
    base = new_name()
    if not label:
        return base
    slug = _SLUG.sub("-", label.lower()).strip("-")[:24].strip("-")
    return f"{base}-{slug}" if slug else base


def _revalidate(provider: Provider, offer: GPUOffer, cap: float | None) -> GPUOffer:
    """The offer as the provider quotes it now; StaleOfferError if gone or dearer."""
    from broker.client import build_query

    q = build_query(gpu_count=offer.gpu_count, spot=offer.spot)
    for fresh in provider.search(q):
        if fresh.key != offer.key:
            continue
        if fresh.price_per_hour > offer.price_per_hour + 1e-9:
            raise StaleOfferError(
                f"price rose from ${offer.price_per_hour:.3f}/h to ${fresh.price_per_hour:.3f}/h",
                provider=provider.name,
            )
        if cap is not None and fresh.price_per_hour > cap:
            raise PriceLimitError(
                f"${fresh.price_per_hour:.3f}/h is above the cap ${cap:.3f}/h",
                provider=provider.name,
            )
        if fresh.stock is not None and fresh.stock.rank == 0:
            raise StaleOfferError("the offer is out of stock now", provider=provider.name)
        return fresh
    raise StaleOfferError(
        f"offer {offer.offer_id} ({offer.gpu_count}x {offer.gpu_type}) is no longer listed",
        provider=provider.name,
    )


@dataclass
class CreateOptions:
    """Everything :func:`create` needs besides the offers (GPUClient fills the defaults)."""

    image: str
    disk_gb: int = 50
    label: str | None = None
    n_offers: int = 3
    ttl_seconds: int | None = None
    max_price_per_hour: float | None = None
    budget: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    ports: list[str] = field(default_factory=list)
    keep_on_failure: bool = False
    wait: bool = True
    ready_timeout: float | None = None
    sweep: str | None = None
    tag: str | None = None
    detach: bool = False
    revalidate: bool = True
    on_progress: ProgressFn | None = None
    on_attempt: Callable[[ProvisionAttempt], None] | None = None


def _projected_cost(offer: GPUOffer, ttl_seconds: int | None) -> float:
    # Without a TTL we count one hour: the least a forgotten box will cost.
    hours = ttl_seconds / 3600 if ttl_seconds else 1.0
    return offer.price_per_hour * hours


def create(client: GPUClient, offers: Sequence[GPUOffer], opts: CreateOptions) -> ManagedInstance:
    """Try ranked ``offers`` (at most ``opts.n_offers``) until one is created and ready."""
    journal = client.journal
    cap = opts.max_price_per_hour
    attempts: list[ProvisionAttempt] = []

    def note(a: ProvisionAttempt) -> None:
        attempts.append(a)
        if opts.on_attempt is not None:
            opts.on_attempt(a)

    if not offers:
        raise ProvisionError("no offer matches the request")
    affordable = [o for o in offers if cap is None or o.price_per_hour <= cap]
    if not affordable:
        cheapest = min(offers, key=lambda o: o.price_per_hour)
        raise PriceLimitError(
            f"every matching offer costs more than the cap ${cap:.2f}/h "
            f"(cheapest: {cheapest.provider} {cheapest.gpu_count}x {cheapest.gpu_type} at "
            f"${cheapest.price_per_hour:.2f}/h); raise max_price_per_hour to allow it"
        )
    cooling = journal.cooling()
    ready_offers = [o for o in affordable if o.key not in cooling]
    if not ready_offers:
        soonest = min(cooling[o.key] for o in affordable)
        raise ProvisionError(
            f"every matching offer failed for capacity recently; retry after "
            f"{soonest:%H:%M:%S} UTC or lower capacity_cooldown_s"
        )
    if opts.budget is not None:
        spent = journal.committed_spend()
        first = ready_offers[0]
        need = _projected_cost(first, opts.ttl_seconds)
        if spent + need > opts.budget:
            raise BudgetExceededError(
                f"budget ${opts.budget:.2f} would be exceeded: ${spent:.2f} spent or committed "
                f"+ ${need:.2f} for {first.gpu_count}x {first.gpu_type} at "
                f"${first.price_per_hour:.2f}/h for "
                f"{format_duration(opts.ttl_seconds) if opts.ttl_seconds else '1h (no ttl)'}"
            )

    for offer in ready_offers[: max(1, opts.n_offers)]:
        t0 = time.monotonic()
        base = {
            "provider": offer.provider,
            "offer_id": offer.offer_id,
            "gpu_type": offer.gpu_type,
            "price_per_hour": offer.price_per_hour,
        }
        if opts.budget is not None:
            spent = journal.committed_spend()
            need = _projected_cost(offer, opts.ttl_seconds)
            if spent + need > opts.budget:
                note(
                    ProvisionAttempt(
                        **base,
                        ok=False,
                        error_type="BudgetExceededError",
                        error=f"${spent:.2f} spent + ${need:.2f} > budget ${opts.budget:.2f}",
                    )
                )
                continue
        try:
            inst = _create_one(client, offer, opts, cap)
        except ReadinessError as e:
            note(
                ProvisionAttempt(
                    **base,
                    ok=False,
                    error_type=type(e).__name__,
                    error=str(e),
                    instance_id=e.instance_id,
                    seconds=time.monotonic() - t0,
                )
            )
            if e.kept:
                raise
            continue
        except AmbiguousCreateError as e:
            note(
                ProvisionAttempt(
                    **base,
                    ok=False,
                    error_type=type(e).__name__,
                    error=e.message,
                    seconds=time.monotonic() - t0,
                )
            )
            # Another offer now could mean two boxes billing: stop here.
            raise ProvisionError("stopped after an unanswered create", attempts) from e
        except (ProviderError, BrokerError) as e:
            if isinstance(e, NoCapacityError):
                journal.add_cooldown(offer.key, client.settings.capacity_cooldown_s, str(e))
            note(
                ProvisionAttempt(
                    **base,
                    ok=False,
                    error_type=type(e).__name__,
                    error=e.message if isinstance(e, BrokerError) else str(e),
                    seconds=time.monotonic() - t0,
                )
            )
            continue
        note(
            ProvisionAttempt(
                **base, ok=True, instance_id=inst.instance_id, seconds=time.monotonic() - t0
            )
        )
        inst.extra.setdefault("attempts", [a.model_dump(mode="json") for a in attempts])
        return inst
    raise ProvisionError(f"all {len(attempts)} offer(s) tried failed", attempts)


def _create_one(
    client: GPUClient, offer: GPUOffer, opts: CreateOptions, cap: float | None
) -> ManagedInstance:
    provider = client.get_provider(offer.provider)
    journal = client.journal
    fresh = _revalidate(provider, offer, cap) if opts.revalidate else offer
    name = journal.record_intent(
        fresh,
        name=instance_name(opts.label),
        ttl_seconds=opts.ttl_seconds,
        sweep=opts.sweep,
        tag=opts.tag,
        owner=current_owner(),
        budget=opts.budget,
        projected_cost=_projected_cost(fresh, opts.ttl_seconds),
    )
    request = CreateRequest(
        offer=fresh,
        name=name,
        image=opts.image,
        disk_gb=opts.disk_gb,
        env=dict(opts.env),
        ports=list(opts.ports) or ["22/tcp"],
        ssh_public_key=client.settings.ssh_public_key(),
        ttl_seconds=opts.ttl_seconds,
    )
    created: Instance | None = None
    try:
        try:
            created = provider.create(request)
        except (
            NoCapacityError,
            InvalidRequestError,
            StaleOfferError,
            AuthError,
            RateLimitedError,
        ) as e:
            # A definite refusal: nothing was created.
            journal.record_failed(name, f"{type(e).__name__}: {e.message}")
            raise
        except Exception as e:
            # Ambiguous (an unanswered request, or an adapter bug after sending): the provider
            # may have created it. Look for it by name; if we cannot tell, reconcile will.
            created = _find_after_ambiguous(provider, name, journal, e)
        journal.record_created(name, created.instance_id, created.status)
        managed = ManagedInstance.model_validate(
            created.model_dump()
            # The offer names the GPU precisely; some APIs describe a pod's GPU more loosely
            # (RunPod's "A100 PCIe" has no memory size).
            | {"name": name, "offer": fresh, "gpu_type": fresh.gpu_type}
        ).bind(client)
        if opts.wait:
            try:
                ready = wait_until_ready(
                    client, managed, timeout=opts.ready_timeout, on_progress=opts.on_progress
                )
            except ReadinessError as e:
                if opts.keep_on_failure:
                    journal.set_owner(name, None)
                    e.kept = True
                    raise
                _cleanup(client, provider, name, managed.instance_id, f"not ready: {e}")
                raise
            managed.status, managed.ssh = ready.status, ready.ssh
        if opts.detach:
            journal.set_owner(name, None)
        return managed
    except BaseException as e:
        # Exceptions before the provider acted were recorded already; readiness failures were
        # cleaned up above. Anything else (Ctrl-C included) may leave a box behind.
        if isinstance(e, Exception) and (created is None or isinstance(e, ReadinessError)):
            raise
        # Ctrl-C (or any crash) after the provider may have acted: never leave a box behind.
        if not opts.keep_on_failure:
            iid = created.instance_id if created is not None else None
            _cleanup(client, provider, name, iid, f"interrupted: {type(e).__name__}")
        raise


def _find_after_ambiguous(
    provider: Provider, name: str, journal: Journal, error: BaseException
) -> Instance:
    try:
        found = _find_by_name_patiently(provider, name)
    except BrokerError as e2:
        found, error = None, AmbiguousCreateError(f"{error}; lookup failed: {e2}")
    if found is None:
        # Not listed (yet) is not proof it was never created: keep the entry open and let
        # reconcile terminate it if it turns up.
        journal.set_owner(name, ABANDONED)
        journal.record_event(name, "create_ambiguous", str(error)[:500])
        raise AmbiguousCreateError(
            f"the create of {name} got no clear answer ({error}); it may exist: "
            "`broker instances reconcile` terminates it if it turns up",
            provider=provider.name,
        ) from error
    journal.record_event(name, "create_recovered", f"found by name after: {error}")
    return found


def _find_by_name_patiently(
    provider: Provider, name: str, attempts: int = 3, delay: float = 1.0
) -> Instance | None:
    """``find_by_name``, asked a few times: providers list a new instance with some lag."""
    for i in range(attempts):
        found = provider.find_by_name(name)
        if found is not None or i == attempts - 1:
            return found
        time.sleep(delay)
    return None


def _cleanup(
    client: GPUClient, provider: Provider, name: str, instance_id: str | None, why: str
) -> bool:
    """Terminate during a failed or interrupted create; True when confirmed done.

    When it cannot confirm, the entry is marked abandoned so ``reconcile`` (and nothing held by
    a live process) finishes the job.
    """
    journal = client.journal
    try:
        if instance_id is None:
            found = _find_by_name_patiently(provider, name)
            if found is None:
                journal.set_owner(name, ABANDONED)
                journal.record_event(name, "cleanup", f"{why}; not listed at the provider (yet)")
                return False
            journal.record_created(name, found.instance_id, found.status)
            instance_id = found.instance_id
        journal.record_event(name, "cleanup", why)
        terminate(client, name, wait=True, timeout=120.0)
        return True
    except BaseException as e:
        log.warning("could not clean up %s (%s); run `broker instances reconcile`", name, e)
        try:
            journal.set_owner(name, ABANDONED)
        except Exception as e2:
            log.warning("could not mark %s abandoned: %s", name, e2)
        return False


# -- terminate ------------------------------------------------------------------------------------


def resolve_entry(journal: Journal, ref: str | Instance) -> JournalEntry:
    """A journal entry by name, provider id, or a unique prefix of either."""
    if isinstance(ref, Instance):
        entry = journal.get(ref.name) if ref.name else None
        entry = entry or journal.find(ref.provider, ref.instance_id)
        if entry is None:
            raise NotFoundError(
                f"{ref.provider} instance {ref.instance_id} is not in the journal",
                provider=ref.provider,
            )
        return entry
    ref = ref.strip()
    if len(ref) < 3:
        raise InvalidRequestError(
            f"instance reference {ref!r} is too short: give a name, a provider id or a prefix "
            "of at least 3 characters"
        )
    entry = journal.get(ref)
    if entry is not None:
        return entry
    hits = [
        e
        for e in journal.all_entries()
        if e.name.startswith(ref) or (e.instance_id is not None and e.instance_id.startswith(ref))
    ]
    exact = [e for e in hits if e.instance_id == ref]
    if len(exact) == 1:
        return exact[0]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise NotFoundError(
            f"no instance {ref!r} in the journal; `broker instances list --all` lists them"
        )
    names = ", ".join(e.name for e in hits[:5])
    raise InvalidRequestError(f"{ref!r} is ambiguous: it matches {names}")


def terminate(
    client: GPUClient, ref: str | Instance, *, wait: bool = True, timeout: float = 300.0
) -> JournalEntry:
    """Terminate and (with ``wait``) confirm the instance is gone; then close its entry.

    Raises :class:`TerminateError` when the provider still shows it at the deadline, and the
    provider's error when the API refuses; in both cases the entry stays open.
    """
    from bifrost import forget_host

    journal = client.journal
    entry = resolve_entry(journal, ref)
    if entry.instance_id is None:
        raise TerminateError(
            f"{entry.name} has no provider id yet (create still running or interrupted); "
            "`broker instances reconcile` finds it by name"
        )
    provider = client.get_provider(entry.provider)
    try:
        provider.terminate(entry.instance_id)
    except NotFoundError:
        pass
    except BrokerError as e:
        journal.record_event(entry.name, "terminate_failed", str(e))
        raise
    if entry.status != InstanceStatus.TERMINATED.value:
        journal.record_status(entry.name, InstanceStatus.TERMINATING)
    if wait:
        deadline = _Deadline(timeout)
        delay = 0.2
        while True:
            try:
                cur = provider.get(entry.instance_id)
            except NotFoundError:
                break
            except BrokerError as e:
                log.info("terminate %s: status check failed (%s); retrying", entry.name, e)
            else:
                if cur.status is InstanceStatus.TERMINATED:
                    break
            if deadline.left <= 0:
                raise TerminateError(
                    f"{entry.provider} still shows {entry.instance_id} after {timeout:.0f}s; "
                    "the journal keeps it open (retry `broker instances terminate`)",
                    provider=entry.provider,
                )
            delay = _backoff(delay, deadline)
    if not wait:
        # Not confirmed: the entry stays open (terminating) until a later check sees it gone.
        journal.record_event(entry.name, "terminate_requested", None)
        done = journal.get(entry.name)
        assert done is not None
        return done
    journal.record_terminated(entry.name, "confirmed gone")
    if entry.ssh_target and not provider.capabilities.persistent_hosts:
        _forget(forget_host, entry.ssh_target)
    done = journal.get(entry.name)
    assert done is not None
    return done


def _forget(forget_host: Callable[..., int], target: str) -> None:
    m = re.fullmatch(r"[^@]+@\[?([^\]]+)\]?:(\d+)", target)
    if m:
        try:
            forget_host(m.group(1), int(m.group(2)))
        except Exception as e:
            log.debug("could not forget host key of %s: %s", target, e)


# -- reap and reconcile ---------------------------------------------------------------------------


def expired_entries(journal: Journal, now: datetime | None = None) -> list[JournalEntry]:
    """Open entries whose TTL has passed."""
    now = now or utcnow()
    return [
        e
        for e in journal.open_entries()
        if e.expires_at is not None and e.expires_at <= now and e.instance_id is not None
    ]


@dataclass
class Finding:
    """One discrepancy between the journal and a provider."""

    kind: str  # "orphan" (billing, not ours any more) or "ghost" (journal only)
    provider: str
    name: str | None
    instance_id: str | None
    reason: str
    status: str | None = None
    price_per_hour: float | None = None
    instance: Instance | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "kind": self.kind,
            "provider": self.provider,
            "name": self.name,
            "instance_id": self.instance_id,
            "reason": self.reason,
            "status": self.status,
            "price_per_hour": self.price_per_hour,
        }


@dataclass
class ReconcileReport:
    """What ``reconcile`` found: orphans, ghosts, and providers it could not ask."""

    findings: list[Finding] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def orphans(self) -> list[Finding]:
        """Instances at a provider that nobody holds (they bill)."""
        return [f for f in self.findings if f.kind == "orphan"]

    @property
    def ghosts(self) -> list[Finding]:
        """Journal entries whose instance no longer exists."""
        return [f for f in self.findings if f.kind == "ghost"]


def orphan_reason(entry: JournalEntry | None, instance_id: str, now: datetime) -> str | None:
    """Why a live ``broker-...`` instance is held by nobody, or None when it is accounted for."""
    if entry is None:
        return "not in the journal"
    if not entry.is_open:
        return "journal says terminated, provider still has it"
    if entry.instance_id is not None and entry.instance_id != instance_id:
        return f"a second instance under the name of {entry.instance_id}"
    if entry.expires_at is not None and entry.expires_at <= now:
        return f"TTL expired {format_duration((now - entry.expires_at).total_seconds())} ago"
    if entry.owner == ABANDONED:
        return "abandoned by its creator (cleanup or create left unconfirmed)"
    if owner_alive(entry.owner) is False:
        return "the process that created it died"
    if entry.instance_id is None and entry.owner is None:
        return "create was interrupted before the provider answered"
    return None


def find_discrepancies(
    client: GPUClient, providers: Sequence[str] | None = None, *, intent_grace_s: float = 120.0
) -> ReconcileReport:
    """Compare the journal with what each provider lists; changes nothing."""
    journal = client.journal
    report = ReconcileReport()
    names = list(providers) if providers else client.provider_names()
    names = list(dict.fromkeys([*names, *(e.provider for e in journal.open_entries())]))
    for pname in names:
        listed_at = utcnow()
        try:
            listed = client.get_provider(pname).list_instances()
        except BrokerError as e:
            report.unreachable[pname] = str(e)
            continue
        # Read the journal only after the listing: an instance created meanwhile by another
        # process is then already in it, not mistaken for an orphan.
        entries = journal.all_entries()
        open_entries = [e for e in entries if e.is_open]
        by_name = {e.name: e for e in entries}
        now = utcnow()
        live: dict[str, Instance] = {}
        for inst in listed:
            if inst.status is InstanceStatus.TERMINATED:
                continue
            live[inst.instance_id] = inst
            if not (inst.name or "").startswith(NAME_PREFIX):
                continue  # not created by broker: never touch it
            reason = orphan_reason(by_name.get(inst.name or ""), inst.instance_id, now)
            if reason is not None:
                report.findings.append(
                    Finding(
                        "orphan",
                        pname,
                        inst.name,
                        inst.instance_id,
                        reason,
                        inst.status.value,
                        inst.price_per_hour,
                        inst,
                    )
                )
        for ent in open_entries:
            if ent.provider != pname or ent.updated_at >= listed_at:
                continue  # changed while we listed: the listing cannot speak for it
            if ent.instance_id is not None:
                if ent.instance_id not in live:
                    report.findings.append(
                        Finding(
                            "ghost",
                            pname,
                            ent.name,
                            ent.instance_id,
                            "gone at the provider",
                            ent.status,
                        )
                    )
                continue
            # An intent without an id: a create in progress, or one that died before the answer.
            named = [i for i in live.values() if i.name == ent.name]
            if named:
                continue  # handled as an orphan above (or still being created)
            age = (now - ent.created_at).total_seconds()
            alive = owner_alive(ent.owner)
            if alive is False or (alive is None and age > intent_grace_s):
                report.findings.append(
                    Finding(
                        "ghost",
                        pname,
                        ent.name,
                        None,
                        "create never reached the provider",
                        ent.status,
                    )
                )
    return report


def fix(client: GPUClient, finding: Finding, *, timeout: float = 300.0) -> str:
    """Resolve one finding: terminate an orphan, close a ghost. Returns what was done.

    Each finding is checked again first: between the report and the fix another process may
    have taken the instance, or a slow provider may have listed it after all.
    """
    journal = client.journal
    provider = client.get_provider(finding.provider)
    if finding.kind == "ghost":
        if finding.instance_id is not None:
            try:
                cur = provider.get(finding.instance_id)
            except NotFoundError:
                cur = None
            if cur is not None and cur.status is not InstanceStatus.TERMINATED:
                return "skipped: the provider shows it again"
            journal.record_terminated(finding.name or "", f"reconcile: {finding.reason}")
        else:
            entry = journal.get(finding.name or "")
            if entry is None or entry.instance_id is not None or not entry.is_open:
                return "skipped: the entry changed"
            journal.record_failed(finding.name or "", f"reconcile: {finding.reason}")
        return "closed in journal"
    assert finding.instance_id is not None
    name = finding.name or f"{NAME_PREFIX}{finding.provider}-{finding.instance_id}"
    entry = journal.get(name)
    if orphan_reason(entry, finding.instance_id, utcnow()) is None:
        return "skipped: now held by a live process"
    if entry is not None and entry.instance_id not in (None, finding.instance_id):
        # A duplicate under a known name: end exactly that instance, keep the entry's own.
        provider.terminate(finding.instance_id)
        journal.record_event(name, "duplicate_terminated", finding.instance_id)
        return "terminated"
    inst = finding.instance
    if entry is None or entry.instance_id is None or not entry.is_open:
        journal.record_adopted(
            name=name,
            provider=finding.provider,
            instance_id=finding.instance_id,
            status=inst.status if inst is not None else InstanceStatus.UNKNOWN,
            gpu_type=inst.gpu_type if inst is not None else None,
            gpu_count=inst.gpu_count if inst is not None else None,
            price_per_hour=inst.price_per_hour if inst is not None else None,
            created_at=inst.created_at if inst is not None else None,
            detail=f"reconcile: {finding.reason}",
        )
    terminate(client, name, wait=True, timeout=timeout)
    return "terminated"


__all__ = [
    "ABANDONED",
    "CreateOptions",
    "Finding",
    "ManagedInstance",
    "ProgressFn",
    "ReconcileReport",
    "Stage",
    "create",
    "current_owner",
    "expired_entries",
    "find_discrepancies",
    "fix",
    "format_duration",
    "instance_name",
    "orphan_reason",
    "owner_alive",
    "parse_ttl",
    "resolve_entry",
    "terminate",
    "wait_until_ready",
]
