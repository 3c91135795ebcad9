"""The data the broker passes around: offers, instances, SSH endpoints.

Units are in the field names: ``vram_gb`` is memory *per GPU*, ``ram_gb`` is system RAM (never
VRAM), ``price_per_hour`` is the price of the whole instance and ``price_per_gpu_hour`` of one GPU.
"""

from __future__ import annotations

import ipaddress
import shlex
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class Manufacturer(StrEnum):
    """GPU vendor, normalised once from whatever case a provider uses."""

    NVIDIA = "nvidia"
    AMD = "amd"
    INTEL = "intel"
    NONE = "none"  # a CPU-only offer
    UNKNOWN = "unknown"


class CloudType(StrEnum):
    """Where the machine lives, in the providers' own vocabulary."""

    SECURE = "secure"  # data-centre hosts (RunPod secure cloud, Lambda, Prime secure_cloud)
    COMMUNITY = "community"  # individual hosts (RunPod community, Vast, Prime community_cloud)
    LOCAL = "local"  # this machine or the user's own machines


class StockLevel(StrEnum):
    """How much of an offer is left, when the provider says."""

    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        """Orders levels so that ``stock>=medium`` means medium or high."""
        return STOCK_RANK[self]


#: The order of stock levels (the one table; the query evaluator compares these ranks). Keys are
#: StrEnum members, so the plain words ("low") look them up too.
STOCK_RANK: dict[str, int] = {
    StockLevel.NONE: 0,
    StockLevel.LOW: 1,
    StockLevel.MEDIUM: 2,
    StockLevel.HIGH: 3,
}


_COMPUTED = frozenset({"total_vram_gb", "price_per_gpu_hour"})


class GPUOffer(BaseModel):
    """One rentable configuration: a GPU model times a count, at a price, somewhere.

    Flat on purpose (like gpuhunt's offers): every field a query can filter on is a plain attribute.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: str
    offer_id: str = Field(description="The provider's id for this offer (what create needs).")
    gpu_type: str = Field(description="Canonical GPU name, or the provider's string if unknown.")
    gpu_provider_name: str = Field(description="The GPU name exactly as the provider wrote it.")
    manufacturer: Manufacturer
    gpu_known: bool = Field(description="False when the catalog did not recognise the GPU name.")
    gpu_count: int = Field(ge=0)
    vram_gb: float | None = Field(default=None, description="Memory of one GPU, in GB.")
    vcpus: float | None = None
    ram_gb: float | None = Field(default=None, description="System RAM in GB (not VRAM).")
    disk_gb: float | None = None
    price_per_hour: float = Field(ge=0, description="US$ per hour for the whole instance.")
    spot: bool = False
    cloud_type: CloudType | None = None
    region: str | None = None
    country: str | None = None
    datacenter: str | None = None
    cuda_version: str | None = None
    driver_version: str | None = None
    compute_capability: str | None = None
    form_factor: str | None = None
    stock: StockLevel | None = None
    observed_at: datetime = Field(default_factory=utcnow)
    source: str = Field(description="Which API call produced this offer.")
    provider_data: dict[str, Any] = Field(
        default_factory=dict,
        description="Wire values create() needs back (e.g. Prime's cloudId, socket, provider).",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_computed(cls, data: Any) -> Any:
        # A dumped offer carries its computed fields; reading it back must not trip extra=forbid.
        if isinstance(data, dict) and ("total_vram_gb" in data or "price_per_gpu_hour" in data):
            data = {k: v for k, v in data.items() if k not in _COMPUTED}
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_vram_gb(self) -> float | None:
        """GPU memory of the whole instance (per-GPU VRAM times the count)."""
        if self.vram_gb is None:
            return None
        return self.vram_gb * self.gpu_count

    @computed_field  # type: ignore[prop-decorator]
    @property
    def price_per_gpu_hour(self) -> float:
        """US$ per hour for one GPU of this instance."""
        if self.gpu_count == 0:
            return self.price_per_hour
        return self.price_per_hour / self.gpu_count

    @property
    def age_seconds(self) -> float:
        """How old the quote is."""
        return (utcnow() - self.observed_at).total_seconds()

    @property
    def key(self) -> str:
        """A stable identity for de-duplication and capacity cool-downs."""
        return f"{self.provider}:{self.offer_id}:{self.gpu_count}:{'spot' if self.spot else 'od'}"


class InstanceStatus(StrEnum):
    """One lifecycle vocabulary for every provider (adapters map their own states into it)."""

    PENDING = "pending"  # asked for, not yet acknowledged by the provider
    PROVISIONING = "provisioning"  # the provider is finding/allocating a machine
    STARTING = "starting"  # allocated, booting or pulling the image
    RUNNING = "running"  # the provider says it runs (SSH may still be coming up)
    STOPPING = "stopping"
    STOPPED = "stopped"  # paused; may still bill for storage
    TERMINATING = "terminating"
    TERMINATED = "terminated"
    ERROR = "error"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        """True once the instance can no longer bill or come back."""
        return self is InstanceStatus.TERMINATED

    @property
    def is_active(self) -> bool:
        """True while the instance may be billing compute."""
        return self in _ACTIVE


_ACTIVE = {
    InstanceStatus.PENDING,
    InstanceStatus.PROVISIONING,
    InstanceStatus.STARTING,
    InstanceStatus.RUNNING,
    InstanceStatus.STOPPING,
    InstanceStatus.UNKNOWN,
    InstanceStatus.ERROR,
}


class SSHEndpoint(BaseModel):
    """Where and how to SSH into an instance; renders to a bifrost target string."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str = "root"
    direct: bool = Field(
        default=True,
        description="False for provider proxies (e.g. RunPod's ssh.runpod.io): no SCP/SFTP there.",
    )

    @property
    def target(self) -> str:
        """``user@host:port`` with IPv6 hosts in brackets, as bifrost parses it."""
        host = self.host
        try:
            if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                host = f"[{host}]"
        except ValueError:
            pass
        return f"{self.user}@{host}:{self.port}"

    def ssh_command(self, key_path: str | None = None) -> str:
        """A plain OpenSSH command line a user can paste."""
        parts = ["ssh", "-p", str(self.port)]
        if key_path:
            parts += ["-i", key_path]
        parts.append(f"{self.user}@{self.host}")
        return shlex.join(parts)

    def __str__(self) -> str:
        return self.target


class Instance(BaseModel):
    """A machine we rented (or asked for), as the provider last described it."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    instance_id: str
    name: str | None = None
    status: InstanceStatus
    provider_status: str | None = Field(
        default=None, description="The provider's own status words, for debugging."
    )
    gpu_type: str | None = None
    gpu_count: int | None = None
    price_per_hour: float | None = None
    spot: bool = False
    ssh: SSHEndpoint | None = None
    created_at: datetime | None = None
    observed_at: datetime = Field(default_factory=utcnow)
    offer: GPUOffer | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class CreateRequest(BaseModel):
    """Everything a provider adapter needs to create one instance from one offer."""

    model_config = ConfigDict(extra="forbid")

    offer: GPUOffer
    name: str = Field(description="Unique name (broker-<id>), sent as the instance name/label.")
    image: str = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
    disk_gb: int = Field(default=50, ge=1)
    volume_gb: int = Field(default=0, ge=0)
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[str] = Field(default_factory=lambda: ["22/tcp"])
    ssh_public_key: str | None = None
    ttl_seconds: int | None = Field(default=None, ge=60)
    bid_per_gpu: float | None = Field(
        default=None, description="Spot bid; defaults to the offer's price when the offer is spot."
    )

    def __repr__(self) -> str:
        # env values may be secrets (tokens for the job): never show them.
        return (
            f"CreateRequest(offer={self.offer.key!r}, name={self.name!r}, image={self.image!r}, "
            f"env_keys={sorted(self.env)!r})"
        )

    __str__ = __repr__


class ProvisionAttempt(BaseModel):
    """One try of one offer during a create with failover."""

    provider: str
    offer_id: str
    gpu_type: str
    price_per_hour: float
    ok: bool
    error_type: str | None = None
    error: str | None = None
    instance_id: str | None = None
    started_at: datetime = Field(default_factory=utcnow)
    seconds: float = 0.0


__all__ = [
    "CloudType",
    "CreateRequest",
    "GPUOffer",
    "Instance",
    "InstanceStatus",
    "Manufacturer",
    "ProvisionAttempt",
    "SSHEndpoint",
    "StockLevel",
    "utcnow",
]
