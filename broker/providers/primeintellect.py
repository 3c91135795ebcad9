"""Prime Intellect adapter over the REST API (``https://api.primeintellect.ai/api/v1``).

Prime is itself an aggregator: every offer names the *underlying* cloud in ``provider`` (never the
GPU manufacturer) plus the ``cloudId``/``socket``/``dataCenter`` create needs back; those wire
values travel in :attr:`GPUOffer.provider_data`. Offers come from ``GET /availability/gpus``, read
page by page until exhausted. Price = ``prices.onDemand`` (the configuration's GPU price, or
``communityPrice`` when that is all there is) plus the default disk when disk is billed separately.
Offers whose stock is "Out of Stock" are skipped.
"""

from __future__ import annotations

import logging
import shlex
from datetime import datetime
from typing import Any, ClassVar

from pydantic import AliasChoices, Field

from broker import catalog
from broker.errors import (
    InvalidRequestError,
    NotFoundError,
    ProviderUnavailableError,
)
from broker.http import create_once, parse_as
from broker.providers.base import (
    Capabilities,
    HttpProvider,
    Wire,
    capacity_or_same,
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
    SSHEndpoint,
    StockLevel,
    utcnow,
)

log = logging.getLogger(__name__)

API_URL = "https://api.primeintellect.ai/api/v1"
SOURCE = "primeintellect GET /availability/gpus"
PAGE_SIZE = 100  # the API's maximum
MAX_PAGES = 100  # a runaway guard (10,000 offers), far above what Prime lists
DEFAULT_IMAGE = CreateRequest.model_fields["image"].default

_STOCK = {
    "available": StockLevel.HIGH,
    "high": StockLevel.HIGH,
    "medium": StockLevel.MEDIUM,
    "low": StockLevel.LOW,
    "out of stock": StockLevel.NONE,
    "unavailable": StockLevel.NONE,
}
_STATUS = {
    "pending": InstanceStatus.PENDING,
    "provisioning": InstanceStatus.PROVISIONING,
    "starting": InstanceStatus.STARTING,
    "active": InstanceStatus.RUNNING,
    "running": InstanceStatus.RUNNING,
    "stopping": InstanceStatus.STOPPING,
    "stopped": InstanceStatus.STOPPED,
    "error": InstanceStatus.ERROR,
    "failed": InstanceStatus.ERROR,
    "terminating": InstanceStatus.TERMINATING,
    "deleting": InstanceStatus.TERMINATING,
    "terminated": InstanceStatus.TERMINATED,
    "deleted": InstanceStatus.TERMINATED,
}

# -- wire format ------------------------------------------------------------------------------


class Resource(Wire):
    """``disk`` / ``vcpu`` / ``memory`` of an offer."""

    minCount: float | None = None
    defaultCount: float | None = None
    maxCount: float | None = None
    pricePerUnit: float | None = None
    step: float | None = None
    defaultIncludedInPrice: bool | None = None


class Prices(Wire):
    """``prices`` of an offer."""

    onDemand: float | None = None
    communityPrice: float | None = None
    isVariable: bool | None = None
    currency: str | None = None


class PrimeOffer(Wire):
    """One ``/availability/gpus`` item."""

    cloudId: str
    gpuType: str
    socket: str | None = None
    provider: str | None = None
    region: str | None = None
    dataCenter: str | None = None
    country: str | None = None
    gpuCount: int
    gpuMemory: float | None = None
    disk: Resource = Field(default_factory=Resource)
    vcpu: Resource = Field(default_factory=Resource)
    memory: Resource = Field(default_factory=Resource)
    stockStatus: str | None = None
    security: str | None = None
    prices: Prices = Field(default_factory=Prices)
    provisioningTime: float | None = None
    isSpot: bool | None = None
    images: list[str] = Field(default_factory=list)


class AvailabilityPage(Wire):
    """One page of ``/availability/gpus``."""

    items: list[PrimeOffer]
    totalCount: int | None = None


class Pod(Wire):
    """A pod as ``/pods`` and ``/pods/{id}`` describe it."""

    id: str
    name: str | None = None
    status: str | None = None
    # Prime's pods carry the GPU as ``gpuName`` (what its own CLI reads); older answers and the
    # create response used ``gpuType``: either is accepted.
    gpuType: str | None = Field(default=None, validation_alias=AliasChoices("gpuName", "gpuType"))
    gpuCount: int | None = None
    socket: str | None = None
    priceHr: float | None = None
    sshConnection: str | list[str] | None = None
    ip: str | list[str] | None = None
    installationStatus: str | None = None
    providerType: str | None = None
    createdAt: datetime | None = None
    isSpot: bool | None = None


# -- mapping ----------------------------------------------------------------------------------


def map_status(status: str | None) -> InstanceStatus:
    """Prime's pod status words into InstanceStatus."""
    return _STATUS.get((status or "").lower(), InstanceStatus.UNKNOWN)


def parse_ssh(conn: str | list[str] | None) -> SSHEndpoint | None:
    """``"ssh root@1.2.3.4 -p 22"`` (or a list of them, multi-node: the first) → SSHEndpoint."""
    if isinstance(conn, list):
        conn = next((c for c in conn if c), None)
    if not conn:
        return None
    try:
        words = shlex.split(conn)
    except ValueError:
        return None
    user, host, port = "root", None, 22
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-p" and i + 1 < len(words) and words[i + 1].isdigit():
            port = int(words[i + 1])
            i += 2
            continue
        if w != "ssh" and not w.startswith("-"):
            if "@" in w:
                user, host = w.rsplit("@", 1)
            elif host is None:
                host = w
        i += 1
    if not host:
        return None
    if ":" in host and host.count(":") == 1:  # "host:port" form
        host, _, p = host.partition(":")
        port = int(p) if p.isdigit() else port
    return SSHEndpoint(host=host, port=port, user=user or "root")


def offer_price(o: PrimeOffer) -> float | None:
    """$/h of the whole configuration (``gpuCount`` GPUs): the price of the offer's own cloud
    plus separately billed default disk/vCPU/RAM.

    A community-cloud offer is priced at ``communityPrice`` (what Prime's own CLI shows first), a
    secure-cloud one at ``onDemand``; each falls back to the other when it is the only price.
    """
    community = (o.security or "").lower().startswith("community")
    first, second = (
        (o.prices.communityPrice, o.prices.onDemand)
        if community
        else (o.prices.onDemand, o.prices.communityPrice)
    )
    base = first if first is not None else second
    if base is None:
        return None
    extra = 0.0
    for r in (o.disk, o.vcpu, o.memory):
        # Prime prices extra units on top of the GPU unless defaultIncludedInPrice says otherwise.
        if r.pricePerUnit and r.defaultCount and r.defaultIncludedInPrice is not True:
            extra += r.pricePerUnit * r.defaultCount
    return round(base + extra, 6)


def prime_gpu_type(canonical: str) -> str | None:
    """Prime's ``gpuType`` for a canonical GPU (from the catalog's ``X_NNGB`` aliases)."""
    m = catalog.find(canonical)
    if m is None:
        return None
    for alias in m.aliases:
        head = alias.split()[0]
        if "_" in head and head.upper().endswith("GB"):
            return head
    return None


def exact_prime_type(names: tuple[str, ...] | None) -> str | None:
    """The one Prime ``gpuType`` every GPU the names can denote has, else None.

    Only ``gpu=X`` / ``gpu in [...]`` names come here, never ``gpu~X`` (a substring: ``gpu~L4``
    also means L40 and L40S, ``gpu~A40`` the RTX A4000). A name is pushed only when each catalog
    model it matches maps to one and the same Prime type, and the name cannot also match an
    unknown GPU through Prime's own spelling: the server filter is then exactly the local one.
    """
    if not names:
        return None
    types: set[str | None] = set()
    for n in names:
        cands = catalog.candidates(n)
        if not cands:
            return None  # a name the catalog does not know: only the local filter can judge it
        types.update(prime_gpu_type(m.name) for m in cands)
    if len(types) != 1 or None in types:
        return None
    return types.pop()


@register
class PrimeIntellectProvider(HttpProvider):
    """Prime Intellect pods across its underlying clouds (create, get, list, delete; no stop)."""

    name: ClassVar[str] = "primeintellect"
    display_name: ClassVar[str] = "Prime Intellect"
    capabilities: ClassVar[Capabilities] = Capabilities(
        spot=True, pushdown=("gpu_count", "gpu_type", "cloud_type")
    )

    api_url: ClassVar[str] = API_URL
    key_variable: ClassVar[str] = "PRIME_API_KEY"

    # -- search -----------------------------------------------------------------------------

    def availability_params(self, query: Query) -> dict[str, Any]:
        """Server-side filters that every match satisfies (exact count, one GPU type, security)."""
        h = hints(query.where)
        params: dict[str, Any] = {}
        if h.gpu_count_min is not None and h.gpu_count_min == h.gpu_count_max:
            params["gpu_count"] = h.gpu_count_min  # gpu_count is exact on Prime's side
        gpu_type = exact_prime_type(h.gpu_names)
        if gpu_type is not None:
            params["gpu_type"] = gpu_type
        if h.cloud_types is not None and len(h.cloud_types) == 1:
            ct = h.cloud_types[0].lower()
            if ct in ("secure", "community"):
                params["security"] = f"{ct}_cloud"
        return params

    def search(self, query: Query) -> list[GPUOffer]:
        """Every offer page by page (``page``/``page_size``) until the list is exhausted."""
        params = self.availability_params(query)
        observed = utcnow()
        offers: list[GPUOffer] = []
        seen = 0
        for page in range(1, MAX_PAGES + 1):
            raw = self._http.get(
                "/availability/gpus", params={**params, "page": page, "page_size": PAGE_SIZE}
            )
            resp = parse_as(self.name, AvailabilityPage, raw, "availability")
            seen += len(resp.items)
            for o in resp.items:
                offer = self._offer(o, observed)
                if offer is not None:
                    offers.append(offer)
            if len(resp.items) < PAGE_SIZE or (
                resp.totalCount is not None and seen >= resp.totalCount
            ):
                return offers
        log.warning("primeintellect: stopped after %d pages of offers", MAX_PAGES)
        return offers

    def _offer(self, o: PrimeOffer, observed: datetime) -> GPUOffer | None:
        stock = _STOCK.get((o.stockStatus or "").lower())
        if stock is StockLevel.NONE:
            return None  # out of stock: creating it could only fail
        price = offer_price(o)
        if price is None:
            return None  # no price published: nothing honest to show
        res = catalog.resolve(o.gpuType, vram_gb=o.gpuMemory, form_factor=o.socket)
        place = o.dataCenter or o.region or o.country or "-"
        sec = (o.security or "").lower()
        return GPUOffer(
            provider=self.name,
            offer_id=f"{o.provider or '-'}/{o.cloudId}/{place}",
            gpu_type=res.name,
            gpu_provider_name=o.gpuType if not o.socket else f"{o.gpuType} {o.socket}",
            manufacturer=res.manufacturer,
            gpu_known=res.known,
            gpu_count=o.gpuCount,
            vram_gb=res.vram_gb if res.vram_gb is not None else o.gpuMemory,
            vcpus=o.vcpu.defaultCount,
            ram_gb=o.memory.defaultCount,
            disk_gb=o.disk.defaultCount,
            price_per_hour=price,
            spot=bool(o.isSpot),
            cloud_type=CloudType.COMMUNITY if sec.startswith("community") else CloudType.SECURE,
            region=o.region,
            country=o.country,
            datacenter=o.dataCenter,
            form_factor=res.form_factor or o.socket,
            compute_capability=res.compute_capability,
            stock=stock,
            observed_at=observed,
            source=SOURCE,
            provider_data={
                "cloud_id": o.cloudId,
                "gpu_type": o.gpuType,
                "socket": o.socket,
                "provider_type": o.provider,
                "data_center_id": o.dataCenter,
                "country": o.country,
                "security": o.security,
                "images": o.images,
                "disk": o.disk.model_dump(),
                "vcpus": o.vcpu.defaultCount,
                "memory_gb": o.memory.defaultCount,
            },
        )

    # -- create -----------------------------------------------------------------------------

    def pod_body(self, request: CreateRequest) -> dict[str, Any]:
        """The ``POST /pods`` body, built from the wire values the offer carried."""
        offer = request.offer
        pd = offer.provider_data
        missing = [k for k in ("cloud_id", "gpu_type", "provider_type") if not pd.get(k)]
        if missing:
            raise InvalidRequestError(
                f"offer {offer.key} lacks {', '.join(missing)}; search again", provider=self.name
            )
        images: list[str] = list(pd.get("images") or [])
        image = request.image
        if images and image not in images:
            if image != DEFAULT_IMAGE:
                raise InvalidRequestError(
                    f"image {image!r} is not offered here; choose one of {images}",
                    provider=self.name,
                )
            # The broker-wide default is a RunPod image; use this offer's closest equivalent.
            image = next((i for i in images if "pytorch" in i), images[0])
        disk = pd.get("disk") or {}
        size = float(request.disk_gb)
        if disk.get("minCount"):
            size = max(size, float(disk["minCount"]))
        if disk.get("maxCount"):
            size = min(size, float(disk["maxCount"]))
        pod: dict[str, Any] = {
            "name": request.name,
            "cloudId": pd["cloud_id"],
            "gpuType": pd["gpu_type"],
            "socket": pd.get("socket"),
            "gpuCount": offer.gpu_count,
            "diskSize": int(size),
            "vcpus": pd.get("vcpus"),
            "memory": pd.get("memory_gb"),
            "image": image,
            "dataCenterId": pd.get("data_center_id"),
            "country": pd.get("country"),
            "security": pd.get("security"),
        }
        env = dict(request.env)
        if env:
            pod["envVars"] = [{"key": k, "value": v} for k, v in env.items()]
        return {
            "pod": {k: v for k, v in pod.items() if v is not None},
            "provider": {"type": pd["provider_type"]},
        }

    def create(self, request: CreateRequest) -> Instance:
        """Create the pod the offer describes (same cloud, socket and underlying provider)."""
        offer = request.offer
        if offer.provider != self.name:
            raise InvalidRequestError(
                f"offer {offer.key} is not a Prime Intellect offer", provider=self.name
            )
        if request.bid_per_gpu is not None:
            raise InvalidRequestError("Prime Intellect takes no bids", provider=self.name)
        body = self.pod_body(request)

        def send() -> Instance:
            try:
                raw = self._http.post("/pods", body, idempotent=False)
            except InvalidRequestError as e:
                raise capacity_or_same(e) from None
            inst = self._instance(parse_as(self.name, Pod, raw, "pod"))
            return inst.model_copy(update={"offer": offer, "spot": offer.spot})

        return create_once(self.name, request.name, send, self.find_by_name, sleep=self._sleep)

    # -- read -------------------------------------------------------------------------------

    def _instance(self, p: Pod) -> Instance:
        gpu = catalog.resolve(p.gpuType, form_factor=p.socket).name if p.gpuType else None
        return Instance(
            provider=self.name,
            instance_id=p.id,
            name=p.name,
            status=map_status(p.status),
            provider_status=p.status,
            gpu_type=gpu,
            gpu_count=p.gpuCount,
            price_per_hour=p.priceHr,
            spot=bool(p.isSpot),
            ssh=parse_ssh(p.sshConnection),
            created_at=p.createdAt,
            extra={
                "installation_status": p.installationStatus,
                "provider_type": p.providerType,
                "ip": p.ip,
                "ssh_connections": p.sshConnection if isinstance(p.sshConnection, list) else None,
            },
        )

    def get(self, instance_id: str) -> Instance:
        """``GET /pods/{id}``."""
        raw = self._http.get(f"/pods/{instance_id}")
        if not raw:
            raise NotFoundError(f"pod {instance_id} not found", provider=self.name)
        return self._instance(parse_as(self.name, Pod, raw, "pod"))

    def list_instances(self) -> list[Instance]:
        """``GET /pods?offset&limit``, every page."""
        out: list[Instance] = []
        offset = 0
        for _ in range(MAX_PAGES):
            raw = self._http.get("/pods", params={"offset": offset, "limit": PAGE_SIZE})
            if not isinstance(raw, dict):
                raise ProviderUnavailableError("pods answer is not an object", provider=self.name)
            items = raw.get("data", raw.get("items"))
            pods = parse_listing(
                self.name,
                Pod,
                items,
                "pods",
                self._instance,
                status_of=lambda r: map_status(r.get("status")),
            )
            out.extend(pods)
            total = raw.get("totalCount", raw.get("total_count"))
            n = len(items) if isinstance(items, list) else 0  # parse_listing wants a list
            offset += n
            if n < PAGE_SIZE or (isinstance(total, int) and offset >= total):
                return out
        log.warning("primeintellect: stopped after %d pages of pods", MAX_PAGES)
        return out

    def terminate(self, instance_id: str) -> None:
        """``DELETE /pods/{id}`` (already gone is fine)."""
        try:
            self._http.delete(f"/pods/{instance_id}")
        except NotFoundError:
            log.info("primeintellect: pod %s already gone", instance_id)
