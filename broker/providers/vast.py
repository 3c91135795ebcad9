"""Vast.ai adapter over the REST API (``https://console.vast.ai/api/v0``).

Offers come from ``POST /bundles/`` — once with ``type: "on-demand"`` (price = ``dph_total``) and
once with ``type: "bid"`` (spot, price = ``min_bid``) unless the query fixes ``spot``. Wire units
differ from ours and are converted here only: ``gpu_ram`` is MiB, ``cpu_ram`` MB (÷ 1000 for GB),
``compute_cap`` is the compute capability × 100, ``dph_total`` is $/h for the whole machine
including ``allocated_storage`` GB of disk.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, ClassVar

from broker import catalog
from broker.errors import (
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    ProviderUnavailableError,
)
from broker.http import create_once, parse_as
from broker.providers.base import (
    Capabilities,
    HttpProvider,
    Wire,
    capacity_or_same,
    created_instance,
    is_capacity_message,
    parse_listing,
    register,
)
from broker.query import Query, hints
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

API_URL = "https://console.vast.ai/api/v0"
SOURCE = "vast POST /bundles/"
#: Disk priced into ``dph_total`` when the query says nothing (matches CreateRequest.disk_gb).
DEFAULT_STORAGE_GB = 50
#: How many offers to ask for per type; generous because the client sorts and limits locally.
SEARCH_LIMIT = 1000
#: ``gpu_ram``/``gpu_total_ram`` are MiB as nvidia-smi reports them (24564 for a 24 GB card).
MIB_PER_GB = 1024
#: ``cpu_ram`` is MB with 1000 per GB, as Vast's own CLI converts it.
MB_PER_GB = 1000
#: Pushed-down minimums are loosened by the catalog's VRAM tolerance so snapping can't lose a match.
_SLACK = 1 - catalog.VRAM_TOLERANCE

# -- wire format ------------------------------------------------------------------------------


class VastOffer(Wire):
    """One ``/bundles/`` entry (only the fields we map)."""

    id: int
    gpu_name: str
    num_gpus: int
    gpu_ram: float | None = None  # MiB per GPU
    gpu_arch: str | None = None
    cpu_cores_effective: float | None = None
    cpu_ram: float | None = None  # MB (1000 per GB)
    disk_space: float | None = None  # GB
    dph_total: float
    min_bid: float | None = None
    reliability2: float | None = None
    geolocation: str | None = None
    cuda_max_good: float | None = None
    driver_version: str | None = None
    compute_cap: int | None = None  # CC x 100
    inet_down: float | None = None
    inet_up: float | None = None
    direct_port_count: int | None = None
    verified: bool | None = None
    machine_id: int | None = None


class BundlesResponse(Wire):
    """``POST /bundles/`` answer."""

    offers: list[VastOffer]


class PortMap(Wire):
    """One Docker port binding."""

    HostIp: str | None = None
    HostPort: str | int | None = None


class VastInstance(Wire):
    """One ``/instances/`` entry."""

    id: int
    label: str | None = None
    actual_status: str | None = None
    intended_status: str | None = None
    cur_state: str | None = None
    status_msg: str | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    public_ipaddr: str | None = None
    ports: dict[str, list[PortMap] | None] | None = None
    dph_total: float | None = None
    gpu_name: str | None = None
    num_gpus: int | None = None
    gpu_ram: float | None = None
    is_bid: bool | None = None
    start_date: float | None = None
    image_uuid: str | None = None


class CreateResponse(Wire):
    """``PUT /asks/{id}/`` answer."""

    success: bool = False
    new_contract: int | None = None
    error: str | None = None
    msg: str | None = None


# -- mapping ----------------------------------------------------------------------------------


def bundles_query(query: Query, offer_type: str) -> dict[str, Any]:
    """The ``/bundles/`` body for ``query``: only filters every match must satisfy."""
    h = hints(query.where)
    body: dict[str, Any] = {
        "verified": {"eq": True},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "order": [["dph_total", "asc"]],
        "type": offer_type,
        "limit": SEARCH_LIMIT,
        "allocated_storage": max(DEFAULT_STORAGE_GB, int(h.disk_gb_min or 0)),
    }
    num: dict[str, int] = {}
    if h.gpu_count_min is not None:
        num["gte"] = h.gpu_count_min
    if h.gpu_count_max is not None:
        num["lte"] = h.gpu_count_max
    if num:
        body["num_gpus"] = num
    if h.vram_gb_min is not None:
        body["gpu_ram"] = {"gte": int(h.vram_gb_min * MIB_PER_GB * _SLACK)}
    if h.total_vram_gb_min is not None:
        body["gpu_total_ram"] = {"gte": int(h.total_vram_gb_min * MIB_PER_GB * _SLACK)}
    if h.ram_gb_min is not None:
        body["cpu_ram"] = {"gte": int(h.ram_gb_min * MB_PER_GB * _SLACK)}
    if h.vcpus_min is not None:
        body["cpu_cores_effective"] = {"gte": h.vcpus_min}
    if h.disk_gb_min is not None:
        body["disk_space"] = {"gte": h.disk_gb_min}
    if h.price_per_hour_max is not None and offer_type == "on-demand":
        # Bids are shown at min_bid, which dph_total does not bound: only on-demand can use this.
        body["dph_total"] = {"lte": h.price_per_hour_max}
    # cuda_max_good is deliberately never sent: without compute_cap Vast drops GPUs server-side.
    return body


def map_status(actual: str | None, intended: str | None) -> InstanceStatus:
    """One status from Vast's actual_status (null while the host is still being scheduled)."""
    a = (actual or "").lower()
    i = (intended or "").lower()
    if not a:
        return InstanceStatus.STOPPING if i == "stopped" else InstanceStatus.PROVISIONING
    if a in ("created", "scheduling"):
        return InstanceStatus.PROVISIONING
    if a == "loading":
        return InstanceStatus.STARTING
    if a == "running":
        return InstanceStatus.STOPPING if i == "stopped" else InstanceStatus.RUNNING
    if a in ("exited", "stopped"):
        return InstanceStatus.STARTING if i == "running" else InstanceStatus.STOPPED
    if a in ("offline", "error"):
        return InstanceStatus.ERROR
    if a in ("destroying", "deleting"):
        return InstanceStatus.TERMINATING
    if a in ("destroyed", "deleted"):
        return InstanceStatus.TERMINATED
    return InstanceStatus.UNKNOWN


def ssh_endpoint(inst: VastInstance) -> SSHEndpoint | None:
    """Direct SSH (public IP + host port of 22/tcp) when published, else Vast's SSH proxy."""
    binding = (inst.ports or {}).get("22/tcp") or []
    if inst.public_ipaddr and binding and binding[0].HostPort:
        return SSHEndpoint(
            host=inst.public_ipaddr.strip(), port=int(binding[0].HostPort), user="root"
        )
    if inst.ssh_host and inst.ssh_port:
        return SSHEndpoint(host=inst.ssh_host, port=inst.ssh_port, user="root", direct=False)
    return None


def _country(geo: str | None) -> str | None:
    if not geo:
        return None
    tail = geo.rsplit(",", 1)[-1].strip()
    return tail if len(tail) == 2 and tail.isalpha() else None


@register
class VastProvider(HttpProvider):
    """Vast.ai marketplace: on-demand and interruptible (bid) instances on community hosts."""

    name: ClassVar[str] = "vast"
    display_name: ClassVar[str] = "Vast.ai"
    capabilities: ClassVar[Capabilities] = Capabilities(
        stop_resume=True,
        spot=True,
        pushdown=(
            "gpu_count",
            "vram_gb",
            "total_vram_gb",
            "ram_gb",
            "vcpus",
            "disk_gb",
            "price_per_hour",
            "spot",
        ),
    )

    api_url: ClassVar[str] = API_URL
    key_variable: ClassVar[str] = "VAST_API_KEY"

    # -- search -----------------------------------------------------------------------------

    def search(self, query: Query) -> list[GPUOffer]:
        """On-demand and bid offers (one ``/bundles/`` call each, or one when spot is fixed)."""
        spot = hints(query.where).spot
        types = [("on-demand", False), ("bid", True)]
        offers: list[GPUOffer] = []
        observed = utcnow()
        for wire_type, is_spot in types:
            if spot is not None and spot != is_spot:
                continue
            request = bundles_query(query, wire_type)
            body = self._http.post("/bundles/", request)
            resp = parse_as(self.name, BundlesResponse, body, "bundles")
            for o in resp.offers:
                price = o.min_bid if is_spot else o.dph_total
                if price is None or price < 0:
                    continue  # a bid offer without a floor price cannot be priced honestly
                offers.append(
                    self._offer(o, is_spot, price, observed, request["allocated_storage"])
                )
        return offers

    def _offer(
        self, o: VastOffer, spot: bool, price: float, observed: datetime, storage_gb: int
    ) -> GPUOffer:
        vram = o.gpu_ram / MIB_PER_GB if o.gpu_ram else None
        res = catalog.resolve(o.gpu_name, vram_gb=vram, manufacturer=o.gpu_arch)
        manufacturer = res.manufacturer
        if manufacturer is Manufacturer.UNKNOWN and o.gpu_arch:
            manufacturer = catalog.normalize_manufacturer(o.gpu_arch)
        cc = f"{o.compute_cap // 100}.{o.compute_cap % 100 // 10}" if o.compute_cap else None
        return GPUOffer(
            provider=self.name,
            offer_id=str(o.id),
            gpu_type=res.name,
            gpu_provider_name=o.gpu_name,
            manufacturer=manufacturer,
            gpu_known=res.known,
            gpu_count=o.num_gpus,
            vram_gb=res.vram_gb if res.vram_gb is not None else vram,
            vcpus=o.cpu_cores_effective,
            ram_gb=o.cpu_ram / MB_PER_GB if o.cpu_ram else None,
            disk_gb=o.disk_space,
            price_per_hour=price,
            spot=spot,
            cloud_type=CloudType.COMMUNITY,
            region=o.geolocation,
            country=_country(o.geolocation),
            cuda_version=f"{o.cuda_max_good:g}" if o.cuda_max_good is not None else None,
            driver_version=o.driver_version,
            compute_capability=cc or res.compute_capability,
            form_factor=res.form_factor,
            observed_at=observed,
            source=SOURCE,
            provider_data={
                "machine_id": o.machine_id,
                "reliability": o.reliability2,
                "inet_down_mbps": o.inet_down,
                "inet_up_mbps": o.inet_up,
                "direct_port_count": o.direct_port_count,
                "dph_total": o.dph_total,
                # dph_total was quoted for this much disk (the query's disk>=, at least 50 GB).
                "allocated_storage_gb": storage_gb,
            },
        )

    # -- create -----------------------------------------------------------------------------

    def create_body(self, request: CreateRequest) -> dict[str, Any]:
        """The ``PUT /asks/{id}/`` body; a ``price`` is sent only for spot offers (a bid)."""
        offer = request.offer
        env = dict(request.env)
        key = request.ssh_public_key or self._ssh_public_key
        if key:
            env["PUBLIC_KEY"] = key
        body: dict[str, Any] = {
            "client_id": "me",
            "image": request.image,
            "disk": request.disk_gb,
            "label": request.name,
            "runtype": "ssh",
            "env": env,
        }
        if offer.spot:
            bid = (
                request.bid_per_gpu * offer.gpu_count
                if request.bid_per_gpu is not None
                else offer.price_per_hour
            )
            body["price"] = round(bid, 6)
        return body

    def create(self, request: CreateRequest) -> Instance:
        """Accept the ask exactly as offered: on-demand without a price, spot as a bid."""
        offer = request.offer
        if offer.provider != self.name:
            raise InvalidRequestError(f"offer {offer.key} is not a Vast offer", provider=self.name)
        if request.bid_per_gpu is not None and not offer.spot:
            raise InvalidRequestError(
                "a bid was given for an on-demand offer; pick the spot offer instead",
                provider=self.name,
            )
        body = self.create_body(request)

        def send() -> Instance:
            try:
                raw = self._http.put(f"/asks/{offer.offer_id}/", body, idempotent=False)
            except InvalidRequestError as e:
                raise capacity_or_same(e) from None
            resp = parse_as(self.name, CreateResponse, raw, "asks")
            if not resp.success or resp.new_contract is None:
                text = resp.msg or resp.error or "create refused"
                if is_capacity_message(text):
                    raise NoCapacityError(text, provider=self.name)
                raise InvalidRequestError(text, provider=self.name)
            return created_instance(self.name, request, str(resp.new_contract), "created")

        return create_once(self.name, request.name, send, self.find_by_name, sleep=self._sleep)

    # -- read -------------------------------------------------------------------------------

    def _instance(self, v: VastInstance) -> Instance:
        return Instance(
            provider=self.name,
            instance_id=str(v.id),
            name=v.label,
            status=map_status(v.actual_status, v.intended_status),
            provider_status=v.actual_status or "null",
            gpu_type=catalog.resolve(v.gpu_name).name if v.gpu_name else None,
            gpu_count=v.num_gpus,
            price_per_hour=v.dph_total,
            spot=bool(v.is_bid),
            ssh=ssh_endpoint(v),
            created_at=datetime.fromtimestamp(v.start_date, UTC) if v.start_date else None,
            extra={
                "intended_status": v.intended_status,
                "status_msg": v.status_msg,
                "image": v.image_uuid,
            },
        )

    def get(self, instance_id: str) -> Instance:
        """``GET /instances/{id}/`` (Vast answers one object, or null when unknown)."""
        raw = self._http.get(f"/instances/{instance_id}/", params={"owner": "me"})
        inner = raw.get("instances") if isinstance(raw, dict) else None
        if isinstance(inner, list):
            inner = next((i for i in inner if str(i.get("id")) == instance_id), None)
        if not inner:
            raise NotFoundError(f"instance {instance_id} not found", provider=self.name)
        return self._instance(parse_as(self.name, VastInstance, inner, "instance"))

    def list_instances(self) -> list[Instance]:
        """``GET /instances/?owner=me``."""
        raw = self._http.get("/instances/", params={"owner": "me"})
        if not isinstance(raw, dict):
            raise ProviderUnavailableError(
                "unexpected instances response shape: not an object", provider=self.name
            )
        return parse_listing(
            self.name,
            VastInstance,
            raw.get("instances", []),
            "instances",
            self._instance,
            status_of=lambda r: map_status(r.get("actual_status"), r.get("intended_status")),
            status_key="actual_status",
            name_key="label",
        )

    # -- lifecycle --------------------------------------------------------------------------

    def terminate(self, instance_id: str) -> None:
        """``DELETE /instances/{id}/`` (destroy; an already-gone instance is fine)."""
        try:
            self._http.delete(f"/instances/{instance_id}/")
        except NotFoundError:
            log.info("vast: instance %s already gone", instance_id)

    def stop(self, instance_id: str) -> None:
        """Stop (storage keeps billing)."""
        self._http.put(f"/instances/{instance_id}/", {"state": "stopped"})

    def resume(self, instance_id: str) -> None:
        """Start a stopped instance again (may wait for the GPU to free up)."""
        self._http.put(f"/instances/{instance_id}/", {"state": "running"})


__all__ = ["VastProvider", "bundles_query", "map_status", "ssh_endpoint"]
