"""RunPod adapter over the GraphQL API (``POST https://api.runpod.io/graphql``).

Every operation sends a fixed query text with GraphQL *variables*; no value is ever formatted into
the query string. The wire format (queries, wire models, status words) lives in this module only.

Offers: one ``gpuTypes`` query with an aliased pair of ``lowestPrice`` selections (secure and
community cloud) for every GPU count the query can match (1..8 when it says nothing about the
count). Each (GPU type, cloud, count) yields an on-demand offer (``uninterruptablePrice``) and a
spot offer (``minimumBidPrice``), each priced per GPU × count. A ``stockStatus`` of null means
RunPod has none right now: such offers are *skipped* (creating them would only fail with a
capacity error).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, ClassVar

from broker import catalog
from broker.config import Settings
from broker.errors import (
    AuthError,
    InvalidRequestError,
    NoCapacityError,
    NotFoundError,
    ProviderError,
    RateLimitedError,
)
from broker.http import create_once, parse_as, truncate
from broker.providers.base import (
    Capabilities,
    HttpProvider,
    Wire,
    is_capacity_message,
    parse_listing,
    register,
)
from broker.query import Query, hints
from broker.query.pushdown import mentioned_values, possible_values
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

API_URL = "https://api.runpod.io"
GRAPHQL_PATH = "/graphql"
SOURCE = "runpod graphql gpuTypes.lowestPrice"

# -- wire format: queries ---------------------------------------------------------------------

_LOWEST_PRICE_FIELDS = (
    "minimumBidPrice uninterruptablePrice minVcpu minMemory stockStatus "
    "maxUnreservedGpuCount availableGpuCounts"
)

#: GPU counts a search considers: RunPod's pods hold 1–8 GPUs of the types it lists; a larger
#: count the query names explicitly (``gpus=10``) is asked for too.
MAX_GPU_COUNT = 8
_MAX_NAMED_COUNT = 64


def gpu_types_query(counts: list[int]) -> str:
    """One ``gpuTypes`` query with a secure and a community ``lowestPrice`` per GPU count.

    RunPod prices a type for one ``gpuCount`` per selection, so each count gets its own aliased
    pair (``secure_2``/``community_2``), all answered by one request. Values travel as variables.
    """
    params = ", ".join(
        f"$secure_{n}: GpuLowestPriceInput!, $community_{n}: GpuLowestPriceInput!" for n in counts
    )
    selections = "\n    ".join(
        f"secure_{n}: lowestPrice(input: $secure_{n}) {{ {_LOWEST_PRICE_FIELDS} }}\n"
        f"    community_{n}: lowestPrice(input: $community_{n}) {{ {_LOWEST_PRICE_FIELDS} }}"
        for n in counts
    )
    return (
        f"query GpuTypes({params}) {{\n  gpuTypes {{\n"
        "    id displayName manufacturer memoryInGb maxGpuCount secureCloud communityCloud\n"
        f"    {selections}\n  }}\n}}\n"
    )


def gpu_types_variables(counts: list[int]) -> dict[str, Any]:
    """The variables of :func:`gpu_types_query`."""
    out: dict[str, Any] = {}
    for n in counts:
        out[f"secure_{n}"] = {"gpuCount": n, "secureCloud": True}
        out[f"community_{n}"] = {"gpuCount": n, "secureCloud": False}
    return out


def search_counts(query: Query) -> list[int]:
    """The GPU counts whose offers can match ``query`` (every one of them, and only those)."""
    named = [
        v
        for v in mentioned_values(query, "gpu_count")
        if isinstance(v, int) and MAX_GPU_COUNT < v <= _MAX_NAMED_COUNT
    ]
    top = max([MAX_GPU_COUNT, *named])
    return possible_values(query, "gpu_count", range(1, top + 1))


_POD_FIELDS = """
id name desiredStatus costPerHr gpuCount vcpuCount memoryInGb imageName lastStatusChange
machine { gpuDisplayName podHostId }
runtime { uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } gpus { id } }
"""

POD_QUERY = f"query Pod($input: PodFilter!) {{ pod(input: $input) {{ {_POD_FIELDS} }} }}"
PODS_QUERY = f"query Pods {{ myself {{ pods {{ {_POD_FIELDS} }} }} }}"
DEPLOY_ON_DEMAND = (
    "mutation Deploy($input: PodFindAndDeployOnDemandInput!) "
    f"{{ podFindAndDeployOnDemand(input: $input) {{ {_POD_FIELDS} }} }}"
)
DEPLOY_SPOT = (
    "mutation DeploySpot($input: PodRentInterruptableInput!) "
    f"{{ podRentInterruptable(input: $input) {{ {_POD_FIELDS} }} }}"
)
TERMINATE = "mutation Terminate($input: PodTerminateInput!) { podTerminate(input: $input) }"
STOP = "mutation Stop($input: PodStopInput!) { podStop(input: $input) { id desiredStatus } }"
RESUME = (
    "mutation Resume($input: PodResumeInput!) { podResume(input: $input) { id desiredStatus } }"
)

_NOT_FOUND_PHRASES = ("not found", "does not exist", "could not find", "no pod")
_AUTH_PHRASES = ("unauthorized", "unauthenticated", "not authorized", "api key", "forbidden")

_STOCK = {"HIGH": StockLevel.HIGH, "MEDIUM": StockLevel.MEDIUM, "LOW": StockLevel.LOW}

# -- wire format: response models -------------------------------------------------------------


class LowestPrice(Wire):
    """``gpuTypes.lowestPrice``: prices are per GPU."""

    minimumBidPrice: float | None = None
    uninterruptablePrice: float | None = None
    minVcpu: float | None = None
    minMemory: float | None = None
    stockStatus: str | None = None
    maxUnreservedGpuCount: int | None = None
    availableGpuCounts: list[int] | None = None


class GpuType(Wire):
    """One ``gpuTypes`` entry; the aliased price selections are read from the raw entry."""

    id: str
    displayName: str | None = None
    manufacturer: str | None = None
    memoryInGb: float | None = None
    maxGpuCount: int | None = None
    secureCloud: bool | None = None
    communityCloud: bool | None = None


class Port(Wire):
    """One mapped port of a running pod."""

    ip: str | None = None
    isIpPublic: bool | None = None
    privatePort: int | None = None
    publicPort: int | None = None
    type: str | None = None


class Runtime(Wire):
    """Present only once the pod actually runs."""

    uptimeInSeconds: float | None = None
    ports: list[Port] | None = None


class Machine(Wire):
    """The host a pod landed on."""

    gpuDisplayName: str | None = None
    podHostId: str | None = None


class Pod(Wire):
    """``pod`` / ``myself.pods`` entry."""

    id: str
    name: str | None = None
    desiredStatus: str | None = None
    costPerHr: float | None = None
    gpuCount: int | None = None
    vcpuCount: float | None = None
    memoryInGb: float | None = None
    imageName: str | None = None
    lastStatusChange: str | None = None
    machine: Machine | None = None
    runtime: Runtime | None = None


# -- mapping helpers --------------------------------------------------------------------------


def map_status(desired: str | None, runtime: Runtime | None) -> InstanceStatus:
    """The actual state from RunPod's *intent* (desiredStatus) plus whether a runtime exists."""
    d = (desired or "").upper()
    if d == "RUNNING":
        # Intent to run is not running: until the runtime appears the container is still starting.
        return InstanceStatus.RUNNING if runtime is not None else InstanceStatus.STARTING
    return {
        "CREATED": InstanceStatus.PROVISIONING,
        "RESTARTING": InstanceStatus.STARTING,
        "EXITED": InstanceStatus.STOPPED,
        "PAUSED": InstanceStatus.STOPPED,
        "TERMINATED": InstanceStatus.TERMINATED,
        "DEAD": InstanceStatus.ERROR,
    }.get(d, InstanceStatus.UNKNOWN)


def ssh_endpoint(pod: Pod) -> SSHEndpoint | None:
    """Direct SSH (public IP, port mapped from 22/tcp) if any, else the ssh.runpod.io proxy."""
    if pod.runtime is None:
        return None
    for p in pod.runtime.ports or []:
        if (
            p.privatePort == 22
            and p.isIpPublic
            and (p.type or "").lower() == "tcp"
            and p.ip
            and p.publicPort
        ):
            return SSHEndpoint(host=p.ip, port=p.publicPort, user="root", direct=True)
    if pod.machine is not None and pod.machine.podHostId:
        # The proxy allows no SCP/SFTP: flagged so readiness checks don't count it as ready.
        return SSHEndpoint(host="ssh.runpod.io", port=22, user=pod.machine.podHostId, direct=False)
    return None


def classify_graphql_error(message: str) -> type[ProviderError]:
    """Which typed error a GraphQL ``errors[].message`` (sent with HTTP 200) stands for."""
    low = message.lower()
    if is_capacity_message(low):
        return NoCapacityError
    if any(p in low for p in _AUTH_PHRASES):
        return AuthError
    if "rate limit" in low or "too many requests" in low:
        return RateLimitedError
    if any(p in low for p in _NOT_FOUND_PHRASES):
        return NotFoundError
    return InvalidRequestError


@register
class RunPodProvider(HttpProvider):
    """RunPod pods: secure and community cloud, on-demand and spot, stop/resume, TTL."""

    name: ClassVar[str] = "runpod"
    display_name: ClassVar[str] = "RunPod"
    capabilities: ClassVar[Capabilities] = Capabilities(
        stop_resume=True,
        spot=True,
        provider_ttl=True,
        pushdown=("gpu_count", "spot"),
    )

    api_url: ClassVar[str] = API_URL
    key_variable: ClassVar[str] = "RUNPOD_API_KEY"

    @classmethod
    def base_url(cls, settings: Settings) -> str:
        """``RUNPOD_API_URL`` (the simulator, for offline tests) or the real API."""
        return settings.runpod_api_url

    # -- GraphQL transport ------------------------------------------------------------------

    def _gql(self, query: str, variables: dict[str, Any], *, idempotent: bool = True) -> Any:
        body = self._http.post(
            GRAPHQL_PATH, {"query": query, "variables": variables}, idempotent=idempotent
        )
        if not isinstance(body, dict):
            raise InvalidRequestError(
                "GraphQL answer is not an object", provider=self.name, status_code=200
            )
        errors = body.get("errors")
        if errors:
            # GraphQL reports failures with HTTP 200: map them like HTTP errors, never ignore.
            messages = [str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors]
            text = truncate(self._http.redact("; ".join(messages)))
            cls = classify_graphql_error(text)
            raise cls(text, provider=self.name, status_code=200)
        data = body.get("data")
        if not isinstance(data, dict):
            raise InvalidRequestError(
                "GraphQL answer has no data", provider=self.name, status_code=200
            )
        return data

    # -- search -----------------------------------------------------------------------------

    def search(self, query: Query) -> list[GPUOffer]:
        """On-demand and spot offers for every GPU count the query can match (one request).

        The counts come from :func:`search_counts`: ``gpus=1 or gpus=8`` asks for 1 and 8,
        ``gpus>=2 gpus!=2`` for 3..8, an unconstrained query for 1..8; a query no count can
        satisfy sends nothing.
        """
        h = hints(query.where)
        counts = search_counts(query)
        if not counts:
            return []
        data = self._gql(gpu_types_query(counts), gpu_types_variables(counts))
        raw_types = data.get("gpuTypes")
        types = parse_as(self.name, list[GpuType], raw_types, "gpuTypes")
        observed = utcnow()
        offers: list[GPUOffer] = []
        for count in counts:
            for gt, raw in zip(types, raw_types, strict=True):
                if gt.maxGpuCount is not None and count > gt.maxGpuCount:
                    continue
                for cloud, available, key in (
                    (CloudType.SECURE, gt.secureCloud, f"secure_{count}"),
                    (CloudType.COMMUNITY, gt.communityCloud, f"community_{count}"),
                ):
                    lp_raw = raw.get(key) if isinstance(raw, dict) else None
                    if not available or lp_raw is None:
                        continue
                    lp = parse_as(self.name, LowestPrice, lp_raw, f"gpuTypes.{key}")
                    if lp.stockStatus is None:
                        continue  # null stockStatus: none in stock now (skipped, see module doc)
                    for spot, per_gpu in (
                        (False, lp.uninterruptablePrice),
                        (True, lp.minimumBidPrice),
                    ):
                        if per_gpu is None or per_gpu <= 0:
                            continue
                        if h.spot is not None and spot != h.spot:
                            continue
                        offers.append(self._offer(gt, cloud, lp, count, spot, per_gpu, observed))
        return offers

    def _offer(
        self,
        gt: GpuType,
        cloud: CloudType,
        lp: LowestPrice,
        count: int,
        spot: bool,
        per_gpu: float,
        observed: datetime,
    ) -> GPUOffer:
        res = catalog.resolve(gt.id, vram_gb=gt.memoryInGb, manufacturer=gt.manufacturer)
        wire_cloud = "SECURE" if cloud is CloudType.SECURE else "COMMUNITY"
        return GPUOffer(
            provider=self.name,
            # The cloud is part of the id: the same GPU type is a different offer per cloud.
            offer_id=f"{wire_cloud.lower()}/{gt.id}",
            gpu_type=res.name,
            gpu_provider_name=gt.id,
            manufacturer=res.manufacturer,
            gpu_known=res.known,
            gpu_count=count,
            vram_gb=res.vram_gb,
            vcpus=lp.minVcpu,
            ram_gb=lp.minMemory,
            price_per_hour=round(per_gpu * count, 6),
            spot=spot,
            cloud_type=cloud,
            form_factor=res.form_factor,
            compute_capability=res.compute_capability,
            stock=_STOCK.get((lp.stockStatus or "").upper()),
            observed_at=observed,
            source=SOURCE,
            provider_data={
                "gpu_type_id": gt.id,
                "cloud_type": wire_cloud,
                "price_per_gpu": per_gpu,
                "display_name": gt.displayName,
            },
        )

    # -- create -----------------------------------------------------------------------------

    def create(self, request: CreateRequest) -> Instance:
        """Deploy a pod exactly as offered: on-demand offers on demand, spot offers as a bid."""
        offer = request.offer
        if offer.provider != self.name:
            raise InvalidRequestError(
                f"offer {offer.key} is not a RunPod offer", provider=self.name
            )
        if request.bid_per_gpu is not None and not offer.spot:
            raise InvalidRequestError(
                "a bid was given for an on-demand offer; pick the spot offer instead",
                provider=self.name,
            )
        input_ = self.deploy_input(request)
        mutation, field = (
            (DEPLOY_SPOT, "podRentInterruptable")
            if offer.spot
            else (DEPLOY_ON_DEMAND, "podFindAndDeployOnDemand")
        )

        def send() -> Instance:
            data = self._gql(mutation, {"input": input_}, idempotent=False)
            pod = parse_as(self.name, Pod, data.get(field), field)
            inst = self._instance(pod)
            return inst.model_copy(update={"offer": offer, "spot": offer.spot})

        return create_once(self.name, request.name, send, self.find_by_name, sleep=self._sleep)

    def deploy_input(self, request: CreateRequest) -> dict[str, Any]:
        """The mutation input for ``request`` (public so tests and --dry-run can show it)."""
        offer = request.offer
        gpu_type_id = str(offer.provider_data.get("gpu_type_id") or offer.gpu_provider_name)
        cloud = str(offer.provider_data.get("cloud_type") or "ALL")
        ports = list(dict.fromkeys(["22/tcp", *request.ports]))  # SSH must always be exposed
        env = dict(request.env)
        key = request.ssh_public_key or self._ssh_public_key
        if key:
            env["PUBLIC_KEY"] = key  # the image's start script installs it for root
        else:
            log.warning("runpod: no SSH public key configured; only the account key can log in")
        input_: dict[str, Any] = {
            "cloudType": cloud,
            "gpuCount": offer.gpu_count,
            "gpuTypeId": gpu_type_id,
            "name": request.name,
            "imageName": request.image,
            "containerDiskInGb": request.disk_gb,
            "volumeInGb": request.volume_gb,
            "ports": ",".join(ports),
            "env": [{"key": k, "value": v} for k, v in env.items()],
            "startSsh": True,
            "supportPublicIp": True,
        }
        if request.volume_gb > 0:
            input_["volumeMountPath"] = "/workspace"
        if offer.datacenter:
            input_["dataCenterId"] = offer.datacenter
        if request.ttl_seconds is not None:
            # RunPod terminates the pod itself at this time: a guard that survives our crash.
            when = utcnow() + timedelta(seconds=request.ttl_seconds)
            input_["terminateAfter"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        if offer.spot:
            bid = request.bid_per_gpu
            if bid is None:
                bid = float(offer.provider_data.get("price_per_gpu") or offer.price_per_gpu_hour)
            input_["bidPerGpu"] = bid
        return input_

    # -- read -------------------------------------------------------------------------------

    def _instance(self, pod: Pod) -> Instance:
        gpu_name = pod.machine.gpuDisplayName if pod.machine else None
        gpu_type = catalog.resolve(gpu_name).name if gpu_name else None
        return Instance(
            provider=self.name,
            instance_id=pod.id,
            name=pod.name,
            status=map_status(pod.desiredStatus, pod.runtime),
            provider_status=pod.desiredStatus,
            gpu_type=gpu_type,
            gpu_count=pod.gpuCount,
            price_per_hour=pod.costPerHr,
            ssh=ssh_endpoint(pod),
            extra={
                "image": pod.imageName,
                "runtime": pod.runtime is not None,
                "uptime_s": pod.runtime.uptimeInSeconds if pod.runtime else None,
                "pod_host_id": pod.machine.podHostId if pod.machine else None,
                "last_status_change": pod.lastStatusChange,
            },
        )

    def get(self, instance_id: str) -> Instance:
        """One pod; NotFoundError when RunPod answers null."""
        data = self._gql(POD_QUERY, {"input": {"podId": instance_id}})
        raw = data.get("pod")
        if raw is None:
            raise NotFoundError(f"pod {instance_id} not found", provider=self.name)
        return self._instance(parse_as(self.name, Pod, raw, "pod"))

    def list_instances(self) -> list[Instance]:
        """Every pod of the account (``myself.pods``)."""
        data = self._gql(PODS_QUERY, {})
        me = data.get("myself")
        if not isinstance(me, dict):
            raise InvalidRequestError(
                "GraphQL answer has no myself", provider=self.name, status_code=200
            )
        return parse_listing(
            self.name,
            Pod,
            me.get("pods") or [],
            "myself.pods",
            self._instance,
            status_of=lambda r: map_status(
                r.get("desiredStatus"), None if r.get("runtime") is None else Runtime()
            ),
            status_key="desiredStatus",
        )

    # -- lifecycle --------------------------------------------------------------------------

    def terminate(self, instance_id: str) -> None:
        """podTerminate; a pod RunPod no longer knows counts as terminated."""
        try:
            self._gql(TERMINATE, {"input": {"podId": instance_id}})
        except NotFoundError:
            log.info("runpod: pod %s already gone", instance_id)

    def stop(self, instance_id: str) -> None:
        """podStop: the pod keeps its volume (and bills for it)."""
        self._gql(STOP, {"input": {"podId": instance_id}})

    def resume(self, instance_id: str) -> None:
        """podResume with the pod's GPU count (on-demand pods; spot pods need a new bid)."""
        pod = self.get(instance_id)
        self._gql(RESUME, {"input": {"podId": instance_id, "gpuCount": pod.gpu_count or 1}})
