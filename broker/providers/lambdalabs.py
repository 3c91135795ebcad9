"""Lambda Cloud adapter over the REST API (``https://cloud.lambda.ai/api/v1``).

Offers: ``GET /instance-types`` lists each type with the regions that have capacity now; one offer
per (type, region with capacity). Prices are cents per hour for the whole instance. The API has no
server-side filters, so nothing is pushed down. Launching needs a *named* SSH key registered in the
account: the adapter uses the key whose public key matches the user's, registering it when absent.
"""

from __future__ import annotations

import hashlib
import logging
import re
from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from broker import catalog
from broker.errors import (
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    ProviderUnavailableError,
)
from broker.http import AmbiguousRequestError, create_once, parse_as
from broker.providers.base import (
    Capabilities,
    HttpProvider,
    Wire,
    capacity_or_same,
    created_instance,
    parse_listing,
    register,
)
from broker.query import Query
from broker.types import (
    CloudType,
    CreateRequest,
    GPUOffer,
    Instance,
    InstanceStatus,
    Manufacturer,
    SSHEndpoint,
    utcnow,
)

log = logging.getLogger(__name__)

API_URL = "https://cloud.lambda.ai/api/v1"
SOURCE = "lambda GET /instance-types"
SSH_USER = "ubuntu"
_VRAM = re.compile(r"(\d+(?:\.\d+)?)\s*GB", re.IGNORECASE)

_STATUS = {
    "booting": InstanceStatus.STARTING,
    "active": InstanceStatus.RUNNING,
    "unhealthy": InstanceStatus.ERROR,
    "terminating": InstanceStatus.TERMINATING,
    "terminated": InstanceStatus.TERMINATED,
    "preempted": InstanceStatus.TERMINATED,
}

# -- wire format ------------------------------------------------------------------------------


class Specs(Wire):
    """Hardware of an instance type."""

    vcpus: float | None = None
    memory_gib: float | None = None
    storage_gib: float | None = None
    gpus: int = 0


class InstanceType(Wire):
    """``instance_type`` object."""

    name: str
    description: str | None = None
    gpu_description: str | None = None
    price_cents_per_hour: float
    specs: Specs = Field(default_factory=Specs)


class Region(Wire):
    """A Lambda region."""

    name: str
    description: str | None = None


class TypeAvailability(Wire):
    """One value of ``GET /instance-types``'s ``data`` map."""

    instance_type: InstanceType
    regions_with_capacity_available: list[Region] = Field(default_factory=list)


class InstanceTypesResponse(Wire):
    """``GET /instance-types``."""

    data: dict[str, TypeAvailability]


class LambdaInstance(Wire):
    """One instance of ``GET /instances``."""

    id: str
    name: str | None = None
    ip: str | None = None
    status: str | None = None
    hostname: str | None = None
    region: Region | None = None
    instance_type: InstanceType | None = None
    ssh_key_names: list[str] = Field(default_factory=list)


class SSHKey(Wire):
    """A named key of the account."""

    id: str | None = None
    name: str
    public_key: str


# -- mapping ----------------------------------------------------------------------------------


def map_status(status: str | None) -> InstanceStatus:
    """Lambda's status words into InstanceStatus."""
    return _STATUS.get((status or "").lower(), InstanceStatus.UNKNOWN)


def key_fingerprint(public_key: str) -> str:
    """``type base64`` of an OpenSSH public key: the comment never decides a match."""
    parts = public_key.split()
    return " ".join(parts[:2]) if len(parts) >= 2 else public_key.strip()


def resolve_gpu(it: InstanceType) -> catalog.Resolved:
    """Identify the GPU from ``gpu_description`` ("H100 (80 GB SXM5)") or the description."""
    text = it.gpu_description or it.description or it.name
    m = _VRAM.search(text)
    vram = float(m.group(1)) if m else None
    return catalog.resolve(text, vram_gb=vram, manufacturer=Manufacturer.NVIDIA)


@register
class LambdaProvider(HttpProvider):
    """Lambda Cloud on-demand instances (no spot, no stop, named SSH keys)."""

    name: ClassVar[str] = "lambdalabs"
    display_name: ClassVar[str] = "Lambda"
    capabilities: ClassVar[Capabilities] = Capabilities(ssh_key_registry=True, pushdown=())

    api_url: ClassVar[str] = API_URL
    key_variable: ClassVar[str] = "LAMBDA_API_KEY"

    # -- search -----------------------------------------------------------------------------

    def search(self, query: Query) -> list[GPUOffer]:
        """One offer per (instance type, region with capacity now)."""
        raw = self._http.get("/instance-types")
        resp = parse_as(self.name, InstanceTypesResponse, raw, "instance-types")
        observed = utcnow()
        offers: list[GPUOffer] = []
        for avail in resp.data.values():
            it = avail.instance_type
            for region in avail.regions_with_capacity_available:
                offers.append(self._offer(it, region, observed))
        return offers

    def _offer(self, it: InstanceType, region: Region, observed: datetime) -> GPUOffer:
        res = resolve_gpu(it)
        count = it.specs.gpus
        return GPUOffer(
            provider=self.name,
            offer_id=f"{region.name}/{it.name}",
            gpu_type=res.name if count else "CPU",
            gpu_provider_name=it.gpu_description or it.description or it.name,
            manufacturer=res.manufacturer if count else Manufacturer.NONE,
            gpu_known=res.known,
            gpu_count=count,
            vram_gb=res.vram_gb,
            vcpus=it.specs.vcpus,
            ram_gb=it.specs.memory_gib,
            disk_gb=it.specs.storage_gib,
            price_per_hour=it.price_cents_per_hour / 100.0,  # cents for the whole instance
            cloud_type=CloudType.SECURE,
            region=region.name,
            datacenter=region.description,
            form_factor=res.form_factor,
            compute_capability=res.compute_capability,
            observed_at=observed,
            source=SOURCE,
            provider_data={"instance_type_name": it.name, "region_name": region.name},
        )

    # -- SSH keys ---------------------------------------------------------------------------

    def ssh_key_name(self, public_key: str) -> str:
        """The account's key name for ``public_key``; registered under a derived name if absent."""
        want = key_fingerprint(public_key)
        raw = self._http.get("/ssh-keys")
        data = raw.get("data") if isinstance(raw, dict) else None
        keys = parse_as(self.name, list[SSHKey], data, "ssh-keys")
        for k in keys:
            if key_fingerprint(k.public_key) == want:
                return k.name
        name = "broker-" + hashlib.sha256(want.encode()).hexdigest()[:12]
        log.info("lambdalabs: registering SSH key as %s", name)
        # Registering is not idempotent either (a duplicate name is refused), so no blind resend.
        created = self._http.post(
            "/ssh-keys", {"name": name, "public_key": public_key.strip()}, idempotent=False
        )
        body = created.get("data") if isinstance(created, dict) else None
        return parse_as(self.name, SSHKey, body, "ssh-keys create").name

    # -- create -----------------------------------------------------------------------------

    def launch_body(self, request: CreateRequest, key_name: str) -> dict[str, Any]:
        """The ``/instance-operations/launch`` body for ``request``."""
        offer = request.offer
        region = offer.provider_data.get("region_name") or offer.region
        type_name = offer.provider_data.get("instance_type_name") or offer.offer_id.split("/")[-1]
        return {
            "region_name": region,
            "instance_type_name": type_name,
            "ssh_key_names": [key_name],
            "name": request.name,
            "quantity": 1,
        }

    def create(self, request: CreateRequest) -> Instance:
        """Launch one instance with the user's own SSH key."""
        offer = request.offer
        if offer.provider != self.name:
            raise InvalidRequestError(
                f"offer {offer.key} is not a Lambda offer", provider=self.name
            )
        if offer.spot or request.bid_per_gpu is not None:
            raise InvalidRequestError("Lambda has no spot instances", provider=self.name)
        public_key = request.ssh_public_key or self._ssh_public_key
        if not public_key:
            raise ConfigError(
                "Lambda needs an SSH public key (set ssh_key_path; its .pub is registered)",
                provider=self.name,
            )
        if request.env:
            log.warning("lambdalabs: env vars cannot be passed at launch; set them over SSH")
        body = self.launch_body(request, self.ssh_key_name(public_key))

        def send() -> Instance:
            try:
                raw = self._http.post("/instance-operations/launch", body, idempotent=False)
            except InvalidRequestError as e:
                raise capacity_or_same(e) from None
            data = raw.get("data") if isinstance(raw, dict) else None
            ids = data.get("instance_ids") if isinstance(data, dict) else None
            if not isinstance(ids, list) or not ids:
                # A 2xx without an id is ambiguous: an instance may exist under our name.
                raise AmbiguousRequestError(
                    "launch answered without an instance id", provider=self.name
                )
            return created_instance(self.name, request, str(ids[0]), "launched")

        return create_once(self.name, request.name, send, self.find_by_name, sleep=self._sleep)

    # -- read -------------------------------------------------------------------------------

    def _instance(self, v: LambdaInstance) -> Instance:
        it = v.instance_type
        return Instance(
            provider=self.name,
            instance_id=v.id,
            name=v.name,
            status=map_status(v.status),
            provider_status=v.status,
            gpu_type=resolve_gpu(it).name if it and it.specs.gpus else None,
            gpu_count=it.specs.gpus if it else None,
            price_per_hour=it.price_cents_per_hour / 100.0 if it else None,
            ssh=SSHEndpoint(host=v.ip, port=22, user=SSH_USER) if v.ip else None,
            extra={
                "region": v.region.name if v.region else None,
                "hostname": v.hostname,
                "ssh_key_names": v.ssh_key_names,
            },
        )

    def get(self, instance_id: str) -> Instance:
        """``GET /instances/{id}``."""
        raw = self._http.get(f"/instances/{instance_id}")
        data = raw.get("data") if isinstance(raw, dict) else None
        if data is None:
            raise NotFoundError(f"instance {instance_id} not found", provider=self.name)
        return self._instance(parse_as(self.name, LambdaInstance, data, "instance"))

    def list_instances(self) -> list[Instance]:
        """``GET /instances``."""
        raw = self._http.get("/instances")
        data = raw.get("data") if isinstance(raw, dict) else None
        if data is None:
            raise ProviderUnavailableError("instances answer has no data", provider=self.name)
        return parse_listing(
            self.name,
            LambdaInstance,
            data,
            "instances",
            self._instance,
            status_of=lambda r: map_status(r.get("status")),
        )

    def terminate(self, instance_id: str) -> None:
        """``POST /instance-operations/terminate`` (terminating twice is harmless)."""
        try:
            self._http.post("/instance-operations/terminate", {"instance_ids": [instance_id]})
        except NotFoundError:
            log.info("lambdalabs: instance %s already gone", instance_id)
