"""The ``ssh`` provider: your own machines, reached over SSH, offered at $0/h.

``settings.ssh_hosts`` lists the machines as ``user@host[:port]``. A search probes every host at
once over SSH (through bifrost, one round trip each): nvidia-smi for the GPUs, ``nproc``,
``/proc/meminfo`` and ``df`` of the home directory for the rest. Each reachable host becomes one
offer; a host that cannot be probed is left out, logged and recorded in
:attr:`SSHProvider.last_probe_errors`, and when *no* host answers the search raises.

"Creating" an instance leases a host. Leases are files under ``<state_dir>/ssh/``, created
atomically under an ``fcntl`` lock, so two broker processes never hold the same host. A leased
host still appears in searches, with ``stock=none`` and ``provider_data["leased_by"]``, so a
busy machine is visibly busy instead of looking unreachable. Terminating releases the lease and
first cancels the bifrost jobs started on that host while the lease was held.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import shlex
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bifrost import Host, Target, parse_target
from bifrost import errors as bf
from broker import catalog
from broker.errors import (
    AuthError,
    ConfigError,
    NoCapacityError,
    NotFoundError,
    ProviderError,
    ProviderUnavailableError,
    StaleOfferError,
)
from broker.providers.base import Capabilities, Provider, cpu_only_offer, register
from broker.search import run_concurrently
from broker.types import (
    CloudType,
    CreateRequest,
    GPUOffer,
    Instance,
    InstanceStatus,
    SSHEndpoint,
    StockLevel,
    utcnow,
)

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.query import Query

log = logging.getLogger(__name__)

#: How a host must be written in ``ssh_hosts`` (quoted in every configuration error).
EXPECTED_FORM = "user@host[:port] (IPv6 as user@[addr]:port), e.g. ubuntu@gpu-box.lan:22"

_INSTANCE_ID = re.compile(r"ssh-[0-9a-f]{12}")
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]+")


# -- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SSHHost:
    """One configured machine: the entry as the user wrote it and what bifrost makes of it."""

    entry: str
    target: Target

    @property
    def endpoint(self) -> SSHEndpoint:
        """Where the lifecycle and the user SSH to (the address actually dialled)."""
        return SSHEndpoint(host=self.target.host, port=self.target.port, user=self.target.user)

    @property
    def offer_id(self) -> str:
        """``user@host:port``: what identifies this host's offer (and what create looks up)."""
        return self.endpoint.target

    @property
    def key(self) -> str:
        """The lease identity: the machine's address and port, whatever user logs in."""
        return lease_key(self.target.host, self.target.port)


def lease_key(host: str, port: int) -> str:
    """``host:port`` as a safe, collision-free file stem (readable part plus a short hash)."""
    readable = _UNSAFE.sub("_", host).strip("_.")[:60] or "host"
    digest = hashlib.sha256(f"{host}:{port}".encode()).hexdigest()[:10]
    return f"{readable}-{port}-{digest}"


def parse_host(entry: str) -> SSHHost:
    """Parse one ``ssh_hosts`` entry; a ConfigError names the entry and the expected form.

    Only plain ``user@host[:port]`` is accepted: the user must be explicit (guessing the local
    login name is how a lease ends up on the wrong account), and ssh-command forms, ``local``
    and ProxyJump aliases are refused because an :class:`SSHEndpoint` cannot express them, so
    the lifecycle could not reach the box later. A host name that is an ``~/.ssh/config`` alias
    without ProxyJump is resolved by bifrost (HostName, Port, IdentityFile).
    """
    text = entry.strip()

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"invalid ssh_hosts entry {entry!r}: {why}; expected {EXPECTED_FORM}", provider="ssh"
        )

    if not text:
        raise bad("it is empty")
    if text == "local":
        raise bad("'local' is this machine: use the `local` provider for it")
    if any(c.isspace() for c in text):
        raise bad("it contains spaces (ssh command lines are not accepted here)")
    if "@" not in text:
        raise bad("the user is missing")
    try:
        target = parse_target(text)
    except bf.TargetError as exc:
        raise bad(str(exc)) from None
    if target.proxy_jump:
        raise bad("it goes through a ProxyJump, which the broker's SSH endpoints cannot express")
    return SSHHost(entry=text, target=target)


def parse_hosts(entries: Sequence[str]) -> list[SSHHost]:
    """Parse every entry; two entries for the same host and port are a configuration error."""
    hosts: list[SSHHost] = []
    seen: dict[str, str] = {}
    for entry in entries:
        h = parse_host(entry)
        if h.key in seen:
            raise ConfigError(
                f"invalid ssh_hosts entry {entry!r}: {h.target.host}:{h.target.port} is already "
                f"listed as {seen[h.key]!r} (one entry per machine); expected {EXPECTED_FORM}",
                provider="ssh",
            )
        seen[h.key] = entry
        hosts.append(h)
    return hosts


# -- probing ---------------------------------------------------------------------------------
# One round trip per host. Every value goes out on its own tagged line so that a box missing a
# tool (no nproc, no /proc on macOS) loses that field only. bifrost's exec already puts
# ~/.local/bin first on PATH (as its jobs see it); the extra directories are where drivers put
# nvidia-smi outside the default PATH (containers, CUDA installs, WSL).
_PROBE = r"""
export PATH="$PATH:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/lib/wsl/lib"
echo "BROKER_HOSTNAME $(hostname 2>/dev/null || uname -n 2>/dev/null)"
echo "BROKER_NPROC $(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null)"
echo "BROKER_MEMKB $(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null)"
echo "BROKER_DISKKB $(df -Pk "$HOME" 2>/dev/null | awk 'NR==2 {print $4}')"
smi=__SMI__
if command -v "$smi" >/dev/null 2>&1; then
  out=$("$smi" --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits 2>&1)
  echo "BROKER_GPU_RC $?"
  printf '%s\n' "$out" | sed 's/^/BROKER_GPU /'
  "$smi" 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/BROKER_CUDA \1/p' | head -n 1
else
  echo "BROKER_GPU_RC absent"
fi
true
"""


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as nvidia-smi lists it."""

    name: str
    memory_mib: float | None
    driver: str | None


@dataclass(frozen=True)
class HostFacts:
    """What the probe learned about one host (``gpu_error`` when nvidia-smi is there but fails)."""

    hostname: str | None = None
    vcpus: float | None = None
    ram_gb: float | None = None
    disk_gb: float | None = None
    gpus: list[GPUInfo] = field(default_factory=list)
    cuda_version: str | None = None
    gpu_error: str | None = None


def _num(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_probe(text: str) -> HostFacts:
    """Parse the probe's tagged output (exposed so recorded nvidia-smi output can be tested)."""
    values: dict[str, str] = {}
    gpu_lines: list[str] = []
    for raw in text.splitlines():
        tag, _, rest = raw.partition(" ")
        if tag == "BROKER_GPU":
            gpu_lines.append(rest)
        elif tag.startswith("BROKER_"):
            values.setdefault(tag, rest.strip())
    nproc = _num(values.get("BROKER_NPROC", ""))
    mem_kb = _num(values.get("BROKER_MEMKB", ""))
    disk_kb = _num(values.get("BROKER_DISKKB", ""))
    gpus: list[GPUInfo] = []
    gpu_error: str | None = None
    rc = values.get("BROKER_GPU_RC", "absent")
    if rc == "0":
        for line in gpu_lines:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 2 or not parts[0]:
                continue
            # "[N/A]" memory (some MIG and vGPU setups) keeps the GPU, without a size.
            gpus.append(GPUInfo(parts[0], _num(parts[1]), parts[2] if len(parts) > 2 else None))
    elif rc != "absent":
        detail = " | ".join(ln.strip() for ln in gpu_lines if ln.strip())
        # A driver without devices is a CPU box; anything else (a driver/library mismatch, a
        # hung GPU) means GPUs that are there but unusable, which must not pass for CPU-only.
        if "no devices were found" not in detail.lower():
            gpu_error = f"nvidia-smi failed (exit {rc}): {detail or 'no output'}"
    return HostFacts(
        hostname=values.get("BROKER_HOSTNAME") or None,
        vcpus=nproc if nproc and nproc > 0 else None,
        ram_gb=round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        disk_gb=round(disk_kb * 1024 / 1e9, 1) if disk_kb is not None else None,
        gpus=gpus,
        cuda_version=values.get("BROKER_CUDA") or None,
        gpu_error=gpu_error,
    )


def build_offer(host: SSHHost, facts: HostFacts, *, leased_by: Instance | None = None) -> GPUOffer:
    """One host's facts as a $0/h offer (``stock=none`` while leased)."""
    provider_data: dict[str, Any] = {
        "entry": host.entry,
        "gpus": [{"name": g.name, "memory_mib": g.memory_mib} for g in facts.gpus],
    }
    if leased_by is not None:
        since = leased_by.created_at.isoformat() if leased_by.created_at else None
        provider_data["leased_by"] = {
            "instance_id": leased_by.instance_id,
            "name": leased_by.name,
            "since": since,
        }
        # Why this offer has stock=none, in words: a busy box is leased, not "out of stock".
        provider_data["unavailable"] = (
            f"leased by {leased_by.instance_id} ({leased_by.name or 'no name'})"
            + (f" since {since}" if since else "")
            + f"; `broker instances terminate {leased_by.name or leased_by.instance_id}` frees it"
        )
    common: dict[str, Any] = {
        "provider": SSHProvider.name,
        "offer_id": host.offer_id,
        "vcpus": facts.vcpus,
        "ram_gb": facts.ram_gb,
        "disk_gb": facts.disk_gb,
        "price_per_hour": 0.0,
        "cloud_type": CloudType.LOCAL,
        "region": "ssh",
        "datacenter": facts.hostname or host.target.host,
        "stock": StockLevel.NONE if leased_by is not None else StockLevel.HIGH,
        "provider_data": provider_data,
    }
    if not facts.gpus:
        return cpu_only_offer(**common, source="ssh:cpu")
    resolved = [
        catalog.resolve(
            g.name,
            vram_gb=g.memory_mib / 1024 if g.memory_mib is not None else None,
            manufacturer="nvidia",
        )
        for g in facts.gpus
    ]
    vrams = [
        r.vram_gb
        if r.vram_gb is not None
        else (round(g.memory_mib / 1024, 1) if g.memory_mib is not None else None)
        for r, g in zip(resolved, facts.gpus, strict=True)
    ]
    names = [g.name for g in facts.gpus]
    drivers = {g.driver for g in facts.gpus if g.driver}
    if len(set(names)) == 1:
        first = resolved[0]
        gpu_type, provider_name = first.name, names[0]
        cc, form_factor = first.compute_capability, first.form_factor
    else:
        # A mixed box (say a 4090 next to a 3090) is never passed off as N of its first GPU:
        # the name lists every kind, and vram_gb is the smallest, so "vram>=" stays truthful.
        counts: dict[str, int] = {}
        for r in resolved:
            counts[r.name] = counts.get(r.name, 0) + 1
        gpu_type = " + ".join(f"{n}x {name}" for name, n in counts.items())
        provider_name = ", ".join(names)
        cc = form_factor = None
    known_vrams = [v for v in vrams if v is not None]
    return GPUOffer(
        **common,
        gpu_type=gpu_type,
        gpu_provider_name=provider_name,
        manufacturer=resolved[0].manufacturer,
        gpu_known=all(r.known for r in resolved),
        gpu_count=len(facts.gpus),
        vram_gb=min(known_vrams) if len(known_vrams) == len(vrams) else None,
        cuda_version=facts.cuda_version,
        driver_version=drivers.pop() if len(drivers) == 1 else None,
        compute_capability=cc,
        form_factor=form_factor,
        source="ssh:nvidia-smi",
    )


class SSHProbeError(ProviderUnavailableError):
    """No configured host could be probed; ``host_errors`` holds each host's own error."""

    def __init__(self, message: str, host_errors: dict[str, ProviderError]) -> None:
        self.host_errors = dict(host_errors)
        super().__init__(message, provider="ssh")


def _bifrost_error(host: SSHHost, exc: BaseException, doing: str) -> ProviderError:
    """A bifrost (or other) failure as the broker's typed error, naming the host."""
    what = f"{host.entry}: {doing} failed: {exc}"
    if isinstance(exc, bf.AuthError):
        return AuthError(what, provider="ssh")
    return ProviderUnavailableError(what, provider="ssh")


# -- the lease store -------------------------------------------------------------------------
class _LeaseStore:
    """Lease files: ``leases/<host key>.json`` exists exactly while that host is leased and holds
    the Instance; ``released/<instance id>.json`` is the final record after terminate.

    A lease file is created with ``link()`` from a fully written temp file, which is atomic and
    fails if the name exists, so a reader never sees half a lease and two creators never both
    win. Check-then-act sequences (create, release) also hold an ``fcntl`` lock per host so a
    late terminate can never remove a newer lease.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.leases = root / "leases"
        self.released = root / "released"

    def lease_path(self, key: str) -> Path:
        return self.leases / f"{key}.json"

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        self.leases.mkdir(parents=True, exist_ok=True)
        with open(self.leases / f"{key}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _load(path: Path) -> Instance | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            return Instance.model_validate_json(text)
        except ValueError as exc:
            raise ProviderUnavailableError(
                f"unreadable lease file {path} ({exc.__class__.__name__}); "
                "fix or remove it by hand",
                provider="ssh",
            ) from None

    def holder(self, key: str) -> Instance | None:
        """The instance leasing this host, if any."""
        return self._load(self.lease_path(key))

    def acquire(self, key: str, inst: Instance) -> Instance | None:
        """Write the lease; returns the current holder instead when the host is taken."""
        with self.locked(key):
            path = self.lease_path(key)
            current = self._load(path)
            if current is not None:
                return current
            tmp = self.leases / f".{key}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "x") as f:
                    f.write(inst.model_dump_json())
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    # Only reachable when someone bypasses the lock (another tool, NFS).
                    return self._load(path) or inst
            finally:
                tmp.unlink(missing_ok=True)
        return None

    def active(self) -> list[Instance]:
        """Every current lease."""
        if not self.leases.exists():
            return []
        out = []
        for p in sorted(self.leases.glob("*.json")):
            inst = self._load(p)  # None: released between glob and read
            if inst is not None:
                out.append(inst)
        return out

    def final(self, instance_id: str) -> Instance | None:
        """The released record of an instance, if it was terminated."""
        return self._load(self.released / f"{instance_id}.json")

    def all_final(self) -> list[Instance]:
        """Every released record."""
        if not self.released.exists():
            return []
        return [i for p in sorted(self.released.glob("ssh-*.json")) if (i := self._load(p))]

    def finish(self, key: str, inst: Instance) -> None:
        """Write the final record, then drop the lease if it is still this instance's.

        In that order: a crash in between leaves both files, get() already reports the
        instance terminated, and the next terminate removes the leftover lease.
        """
        with self.locked(key):
            self.released.mkdir(parents=True, exist_ok=True)
            path = self.released / f"{inst.instance_id}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(inst.model_dump_json())
            tmp.replace(path)
            current = self._load(self.lease_path(key))
            if current is not None and current.instance_id == inst.instance_id:
                self.lease_path(key).unlink(missing_ok=True)


def _job_epoch(stamp: str | None) -> int | None:
    """bifrost's ``started_at`` (``%Y-%m-%dT%H:%M:%SZ``, the remote clock) as epoch seconds."""
    if not stamp:
        return None
    try:
        return int(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
    except ValueError:
        return None


# -- the provider ----------------------------------------------------------------------------
@register
class SSHProvider(Provider):
    """Your own machines over SSH: free, leased one broker at a time."""

    name: ClassVar[str] = "ssh"
    display_name: ClassVar[str] = "Your SSH hosts"
    # No API key: like `local`, it joins the default provider set only when no cloud is
    # configured (see GPUClient.provider_names), so $0/h boxes never silently top a cloud
    # search; name it (`providers=["ssh", ...]`) to search it alongside clouds.
    capabilities: ClassVar[Capabilities] = Capabilities(
        requires_api_key=False, persistent_hosts=True
    )

    def __init__(
        self,
        hosts: Sequence[SSHHost | str],
        state_dir: Path,
        *,
        identity_file: Path | None = None,
        connect_timeout: float = 5.0,
        connect_retries: int = 2,
        probe_timeout: float = 10.0,
        probe_deadline: float = 15.0,
        kill_grace: float = 5.0,
        nvidia_smi: str = "nvidia-smi",
    ) -> None:
        self.hosts = [h if isinstance(h, SSHHost) else parse_host(h) for h in hosts]
        self.store = _LeaseStore(Path(state_dir) / "ssh")
        self.identity_file = identity_file
        self.connect_timeout = connect_timeout
        self.connect_retries = connect_retries
        self.probe_timeout = probe_timeout
        # Below GPUClient's default 20 s search timeout, so an unreachable host is reported as
        # such instead of the whole provider timing out.
        self.probe_deadline = probe_deadline
        self.kill_grace = kill_grace
        self.nvidia_smi = nvidia_smi
        #: Hosts the last search could not probe (entry → typed error); empty when all answered.
        self.last_probe_errors: dict[str, ProviderError] = {}

    @classmethod
    def is_configured(cls, settings: Settings) -> bool:
        """Configured as soon as ``ssh_hosts`` lists a machine."""
        return bool(settings.ssh_hosts)

    @classmethod
    def from_settings(cls, settings: Settings) -> SSHProvider:
        """Parse ``ssh_hosts`` (a bad entry is a ConfigError naming it) and use the SSH key."""
        if not settings.ssh_hosts:
            raise ConfigError(
                f"no ssh_hosts configured: set BROKER_SSH_HOSTS or ssh_hosts to {EXPECTED_FORM}",
                provider=cls.name,
            )
        # Answer inside the client's search timeout, so a dead host shows up as that host's
        # error while the live ones still make it into the result.
        deadline = min(15.0, 0.75 * settings.search_timeout_s)
        return cls(
            parse_hosts(settings.ssh_hosts),
            settings.state_dir,
            identity_file=settings.ssh_key_path,
            connect_timeout=min(5.0, deadline / 3),
            probe_timeout=min(10.0, deadline * 2 / 3),
            probe_deadline=deadline,
        )

    def _host(self, host: SSHHost) -> Host:
        return Host(
            host.target,
            identity_file=self.identity_file,
            connect_timeout=self.connect_timeout,
            retries=self.connect_retries,
        )

    # -- offers --------------------------------------------------------------------------------
    def probe_host(self, host: SSHHost) -> GPUOffer:
        """Probe one host and describe it as an offer; raises a ProviderError naming it."""
        script = _PROBE.replace("__SMI__", shlex.quote(self.nvidia_smi))
        try:
            with self._host(host) as h:
                result = h.exec(script, timeout=self.probe_timeout)
        except Exception as exc:  # every failure is this host's error, never the whole search's
            raise _bifrost_error(host, exc, "probe") from None
        facts = parse_probe(result.stdout)
        if facts.gpu_error:
            # GPUs that exist but do not work: not a CPU-only box, and not silently dropped.
            raise ProviderUnavailableError(f"{host.entry}: {facts.gpu_error}", provider=self.name)
        return build_offer(host, facts, leased_by=self.store.holder(host.key))

    def probe(self) -> tuple[list[GPUOffer], dict[str, ProviderError]]:
        """Probe every host concurrently: (offers of hosts that answered, errors by entry)."""
        offers: dict[str, GPUOffer] = {}
        errors: dict[str, ProviderError] = {}
        # Daemon threads (not a pool): a mute host must not keep the process alive past the
        # search, and interpreter exit joins a ThreadPoolExecutor's workers.
        jobs = {h.entry: (lambda h=h: self.probe_host(h)) for h in self.hosts}
        finished = run_concurrently(jobs, self.probe_deadline, label="ssh-probe")
        for h in self.hosts:
            if h.entry not in finished:
                errors[h.entry] = ProviderUnavailableError(
                    f"{h.entry}: no answer within {self.probe_deadline:g}s", provider=self.name
                )
                continue
            result, exc, _ = finished[h.entry]
            if exc is None and result is not None:
                offers[h.entry] = result
            elif isinstance(exc, ProviderError):
                errors[h.entry] = exc
            elif exc is not None:
                errors[h.entry] = _bifrost_error(h, exc, "probe")
        ordered = [offers[h.entry] for h in self.hosts if h.entry in offers]
        return ordered, {h.entry: errors[h.entry] for h in self.hosts if h.entry in errors}

    def search(self, query: Query) -> list[GPUOffer]:
        """One offer per reachable host (the client filters them like any other offers).

        Unreachable hosts are logged and kept in :attr:`last_probe_errors`; if no host answers,
        the error says why for each (an AuthError when every host refused the key).
        """
        offers, errors = self.probe()
        self.last_probe_errors = errors
        for entry, err in errors.items():
            log.warning("ssh host %s left out of the search: %s", entry, err.message)
        if offers or not errors:
            return offers
        detail = "; ".join(e.message for e in errors.values())
        if all(isinstance(e, AuthError) for e in errors.values()):
            raise AuthError(f"every ssh host refused the key: {detail}", provider=self.name)
        raise SSHProbeError(f"no ssh host could be probed: {detail}", errors)

    # -- leases --------------------------------------------------------------------------------
    def _check_id(self, instance_id: str) -> None:
        if not _INSTANCE_ID.fullmatch(instance_id):
            raise NotFoundError(f"no ssh lease {instance_id!r}", provider=self.name)

    def create(self, request: CreateRequest) -> Instance:
        """Lease the offer's host under ``request.name``; NoCapacityError when it is taken.

        Nothing is sent to the host: the machine is the user's, already set up, so the image,
        env and disk size of the request do not apply (readiness is the lifecycle's SSH probe).
        """
        offer = request.offer
        host = next((h for h in self.hosts if h.offer_id == offer.offer_id), None)
        if offer.provider != self.name or host is None:
            raise StaleOfferError(
                f"offer {offer.offer_id!r} is not one of the configured ssh_hosts "
                f"({', '.join(h.entry for h in self.hosts)})",
                provider=self.name,
            )
        now = utcnow()
        inst = Instance(
            provider=self.name,
            instance_id=f"ssh-{uuid.uuid4().hex[:12]}",
            name=request.name,
            status=InstanceStatus.RUNNING,
            provider_status="leased",
            gpu_type=offer.gpu_type,
            gpu_count=offer.gpu_count,
            price_per_hour=0.0,
            ssh=host.endpoint,
            created_at=now,
            observed_at=now,
            offer=offer,
            extra={
                "entry": host.entry,
                "target": host.offer_id,
                "host_key": host.key,
                "leased_from": {"hostname": socket.gethostname(), "pid": os.getpid()},
            },
        )
        holder = self.store.acquire(host.key, inst)
        if holder is not None:
            raise NoCapacityError(
                f"{host.entry} is already leased by {holder.instance_id} "
                f"(name {holder.name!r}, since {holder.created_at}); terminate that first",
                provider=self.name,
            )
        return inst

    def get(self, instance_id: str) -> Instance:
        """The lease (or its final record once released)."""
        self._check_id(instance_id)
        inst = self.store.final(instance_id)
        if inst is None:
            inst = next((i for i in self.store.active() if i.instance_id == instance_id), None)
        if inst is None:
            raise NotFoundError(f"no ssh lease {instance_id!r}", provider=self.name)
        inst.observed_at = utcnow()
        return inst

    def list_instances(self) -> list[Instance]:
        """Every lease this state dir knows: current ones first, then released ones."""
        final = self.store.all_final()
        done = {i.instance_id for i in final}
        active = [i for i in self.store.active() if i.instance_id not in done]
        now = utcnow()
        out = sorted(active, key=_created) + sorted(final, key=_created)
        for i in out:
            i.observed_at = now
        return out

    def terminate(self, instance_id: str) -> None:
        """Cancel our jobs on the host, then release the lease (idempotent).

        Jobs go first, while the lease is still held, so a job of the *next* lessee can never
        be mistaken for ours. If the host cannot be reached the lease is released anyway (the
        box is the user's; a dead one must not stay booked forever), the failure is logged and
        kept in the record's ``extra["jobs_stop_error"]``, and a later terminate retries it.
        """
        inst = self.get(instance_id)
        key = str(inst.extra.get("host_key") or "")
        if not key and inst.ssh is not None:  # a record written by hand or an older version
            key = lease_key(inst.ssh.host, inst.ssh.port)
        if inst.status is InstanceStatus.TERMINATED:
            if inst.extra.get("jobs_stop_error"):
                released = datetime.fromisoformat(str(inst.extra["released_at"]))
                stopped, error = self._stop_jobs(inst, until=released)
                inst.extra["jobs_stopped"] = [*inst.extra.get("jobs_stopped", []), *stopped]
                inst.extra["jobs_stop_error"] = error
                if error:
                    log.warning("ssh lease %s: jobs still not stopped: %s", instance_id, error)
            self.store.finish(key, inst)  # also clears a lease left by a crash mid-terminate
            return
        stopped, error = self._stop_jobs(inst, until=None)
        inst.status = InstanceStatus.TERMINATED
        inst.provider_status = "released"
        inst.extra["released_at"] = utcnow().isoformat()
        inst.extra["jobs_stopped"] = stopped
        inst.extra["jobs_stop_error"] = error
        self.store.finish(key, inst)
        if error:
            log.warning(
                "ssh lease %s on %s released, but its jobs could not be stopped: %s "
                "(terminate it again to retry)",
                instance_id,
                inst.extra.get("entry"),
                error,
            )

    def _stop_jobs(self, inst: Instance, *, until: datetime | None) -> tuple[list[str], str | None]:
        """Cancel running bifrost jobs started on the host while ``inst`` held it.

        bifrost cannot tag a job with a lease, so "ours" means: started (by the remote clock)
        at or after the lease's creation and, for a retry after release, not after the release.
        The remote clock's offset is measured here, so a skewed box is handled; the rule's
        one-second resolution may include a job started in the very second the lease was
        taken. Returns (ids cancelled, error text or None).
        """
        entry = str(inst.extra.get("entry") or (inst.ssh.target if inst.ssh else ""))
        stopped: list[str] = []
        errors: list[str] = []
        if inst.created_at is None:
            return stopped, "the lease has no creation time; jobs were not looked at"
        try:
            host = parse_host(entry)
        except ConfigError as exc:
            return stopped, exc.message
        try:
            with self._host(host) as h:
                h.connect()  # so that the clock read below is not inflated by the handshake
                t0 = time.time()
                out = h.exec("date -u +%s.%N", timeout=self.probe_timeout).stdout.strip()
                t1 = time.time()
                remote = _num(out) or _num(out.split(".")[0])
                if remote is None:
                    return stopped, f"cannot read the clock of {entry} (date printed {out!r})"
                skew, slack = remote - (t0 + t1) / 2, (t1 - t0) / 2
                start = math.floor(inst.created_at.timestamp() + skew - slack)
                end = until.timestamp() + skew + slack if until is not None else math.inf
                for st in h.jobs():
                    began = _job_epoch(st.started_at)
                    if st.done or began is None or not start <= began <= end:
                        continue
                    try:
                        h.job(st.id).kill(grace=self.kill_grace)
                        stopped.append(st.id)
                    except bf.JobNotFoundError:
                        continue  # removed meanwhile: nothing left to stop
                    except bf.BifrostError as exc:
                        errors.append(f"job {st.id}: {exc}")
        except Exception as exc:  # unreachable, auth, lost link: recorded, never swallowed
            errors.append(f"{entry}: {type(exc).__name__}: {exc}")
        return stopped, "; ".join(errors) or None


def _created(inst: Instance) -> datetime:
    return inst.created_at or datetime.min.replace(tzinfo=UTC)


__all__ = [
    "EXPECTED_FORM",
    "GPUInfo",
    "HostFacts",
    "SSHHost",
    "SSHProbeError",
    "SSHProvider",
    "build_offer",
    "lease_key",
    "parse_host",
    "parse_hosts",
    "parse_probe",
]
