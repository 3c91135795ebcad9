"""GraphQL handling: parsing a request, dispatching on its root field, answering it."""

from __future__ import annotations

import copy
import hmac
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from broker.testing.sim.catalogue import (
    CAPACITY_MESSAGE,
    POD_NOT_FOUND_MESSAGE,
    RESUME_CAPACITY_MESSAGE,
    TERMINATE_NOT_FOUND_MESSAGE,
    SimGpuType,
)
from broker.testing.sim.faults import _PodFault
from broker.testing.sim.pods import _gpu_rows, _Pod, _pod_id, _status_word
from broker.testing.sim.state import SimState

log = logging.getLogger("broker.testing.runpod_sim")


@dataclass(frozen=True)
class RequestRecord:
    """One request the simulator received (secrets removed).

    ``operation`` is the root field (``podFindAndDeployOnDemand``, ``pod``, ``myself`` ...),
    ``name`` the operation name written in the query (``Deploy``), ``status`` the HTTP status
    answered (0 when the connection was dropped), ``error`` the GraphQL error message, if any.
    """

    operation: str
    name: str | None
    variables: dict[str, Any]
    status: int
    error: str | None
    at: datetime


def _parse_time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise _GraphQLError(f"invalid DateTime: {value!r}")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _GraphQLError(f"invalid DateTime: {value!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _redact_variables(variables: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with every env value but PUBLIC_KEY replaced (tokens travel in env)."""
    out = copy.deepcopy(variables)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            env = node.get("env")
            if isinstance(env, list):
                for item in env:
                    if (
                        isinstance(item, dict)
                        and item.get("key") != "PUBLIC_KEY"
                        and "value" in item
                    ):
                        item["value"] = "***"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


# -- GraphQL text --------------------------------------------------------------------------------

_OPERATION = re.compile(
    r"^\s*(?:(query|mutation|subscription)\b\s*(\w+)?\s*(?:\([^)]*\))?\s*)?\{\s*(?:(\w+)\s*:\s*)?(\w+)",
    re.S,
)
_LOWEST_PRICE = re.compile(
    r"(?:(\w+)\s*:\s*)?lowestPrice\s*\(\s*input\s*:\s*(\$\w+|\{[^}]*\})\s*\)"
)
_GPU_TYPES_INPUT = re.compile(r"gpuTypes\s*\(\s*input\s*:\s*(\$\w+|\{[^}]*\})\s*\)")
_LITERAL_PAIR = re.compile(r"(\w+)\s*:\s*(\"[^\"]*\"|[\w.\-]+)")


def parse_operation(query: str) -> tuple[str, str | None, str, str]:
    """(operation type, operation name, response key, root field) of a GraphQL document.

    Only what dispatch needs: the first root selection, with its alias as the response key.
    """
    m = _OPERATION.match(query)
    if m is None:
        raise _GraphQLError("Syntax Error: cannot find an operation", status=400)
    kind, name, alias, root = m.groups()
    return kind or "query", name, alias or root, root


def _literal_or_variable(text: str, variables: dict[str, Any]) -> dict[str, Any]:
    """A tiny reader for ``$var`` or ``{key: value, ...}`` inputs (scalars only)."""
    if text.startswith("$"):
        value = variables.get(text[1:])
        return value if isinstance(value, dict) else {}
    out: dict[str, Any] = {}
    for key, raw in _LITERAL_PAIR.findall(text):
        if raw.startswith('"'):
            out[key] = raw[1:-1]
        elif raw in ("true", "false"):
            out[key] = raw == "true"
        elif raw == "null":
            out[key] = None
        else:
            try:
                out[key] = float(raw) if "." in raw else int(raw)
            except ValueError:
                out[key] = raw  # an enum value such as SECURE
    return out


class _GraphQLError(Exception):
    """An error answered in ``errors[]`` (HTTP 200 unless ``status`` says otherwise)."""

    def __init__(self, message: str, *, status: int = 200) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _DropConnection(Exception):
    """Close the socket without answering (the request's effect stays)."""


class _LostAs504(Exception):
    """Answer 504 after acting (a gateway gave up waiting for the backend)."""


def _input(variables: dict[str, Any], query: str) -> dict[str, Any]:
    """The ``input`` argument: the ``$input`` variable, or an inline object literal."""
    value = variables.get("input")
    if isinstance(value, dict):
        return value
    m = re.search(r"\(\s*input\s*:\s*(\$\w+|\{[^}]*\})\s*\)", query)
    return _literal_or_variable(m.group(1), variables) if m else {}


#: Oldest requests are dropped past this many (a simulator left running for days stays small).
MAX_LOGGED_REQUESTS = 10_000


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _json(status: int, payload: Any) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


class GraphQLMixin(SimState):
    """Requests in, answers out (called from the HTTP handler threads)."""

    # -- HTTP entry point (called from handler threads) ---------------------------------------

    def _handle(
        self, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes | None]:
        """(status, headers, body) for one POST; body None means drop the connection."""
        url = urlsplit(path)
        if url.path.rstrip("/") != "/graphql":
            return _json(404, {"error": "Not Found"})
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return _json(400, {"errors": [{"message": "POST body sent invalid JSON."}]})
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return _json(400, {"errors": [{"message": "Must provide query string."}]})
        variables = body.get("variables") or {}
        if not isinstance(variables, dict):
            return _json(400, {"errors": [{"message": "Variables must be an object."}]})
        try:
            kind, op_name, key, root = parse_operation(body["query"])
        except _GraphQLError as e:
            return self._record(
                "?", None, variables, e.status, e.message, {"errors": [{"message": e.message}]}
            )

        if not self._authorised(headers, url.query):
            return self._record(
                root,
                op_name,
                variables,
                401,
                "Unauthorized",
                {"error": "Unauthorized: invalid api key"},
            )
        with self._lock:
            limited = self._take(self._rate_limits, root)
            failing = None if limited else self._take(self._http_faults, root)
        if limited is not None:
            status, hdrs, out = _json(429, {"error": "Too many requests, slow down"})
            hdrs["Retry-After"] = f"{limited.retry_after:g}"
            self._log(root, op_name, variables, 429, None)
            return status, hdrs, out
        if failing is not None:
            return self._record(
                root, op_name, variables, failing.status, None, {"error": _reason(failing.status)}
            )

        with self._lock:
            slow = self._take(self._slow, root)
        try:
            data = self._dispatch(kind, root, body["query"], variables)
            if slow is not None:
                # Acted on already; the answer comes too late for a client with a short timeout.
                self._closing.wait(slow.retry_after)
        except _DropConnection:
            self._log(root, op_name, variables, 0, "response lost (connection dropped)")
            return 0, {}, None
        except _LostAs504:
            return self._record(root, op_name, variables, 504, None, {"error": "Gateway Timeout"})
        except _GraphQLError as e:
            return self._record(
                root,
                op_name,
                variables,
                e.status,
                e.message,
                {"errors": [{"message": e.message, "path": [key]}], "data": {key: None}},
            )
        return self._record(root, op_name, variables, 200, None, {"data": {key: data}})

    def _authorised(self, headers: dict[str, str], query: str) -> bool:
        expected = self._api_key.get_secret_value().encode()
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip().encode()
            return hmac.compare_digest(given, expected)
        # RunPod also takes ?api_key= in the URL (older clients send it that way).
        keys = parse_qs(query).get("api_key") or [""]
        return bool(keys[0]) and hmac.compare_digest(keys[0].encode(), expected)

    def _log(
        self, root: str, name: str | None, variables: dict[str, Any], status: int, error: str | None
    ) -> None:
        record = RequestRecord(root, name, _redact_variables(variables), status, error, self.now())
        with self._lock:
            self._requests.append(record)
            if len(self._requests) > MAX_LOGGED_REQUESTS:
                del self._requests[: len(self._requests) - MAX_LOGGED_REQUESTS]
        log.debug("%s %s -> %s%s", name or "-", root, status, f" ({error})" if error else "")

    def _record(
        self,
        root: str,
        name: str | None,
        variables: dict[str, Any],
        status: int,
        error: str | None,
        payload: Any,
    ) -> tuple[int, dict[str, str], bytes]:
        self._log(root, name, variables, status, error)
        return _json(status, payload)

    def _dispatch(self, kind: str, root: str, query: str, variables: dict[str, Any]) -> Any:
        handlers: dict[tuple[str, str], Callable[[], Any]] = {
            ("query", "gpuTypes"): lambda: self._gpu_types_answer(query, variables),
            ("query", "pod"): lambda: self._pod_answer(_input(variables, query)),
            ("query", "myself"): self._myself_answer,
            ("mutation", "podFindAndDeployOnDemand"): lambda: self._deploy(
                _input(variables, query), spot=False
            ),
            ("mutation", "podRentInterruptable"): lambda: self._deploy(
                _input(variables, query), spot=True
            ),
            ("mutation", "podTerminate"): lambda: self._terminate_answer(_input(variables, query)),
            ("mutation", "podStop"): lambda: self._stop_answer(_input(variables, query)),
            ("mutation", "podResume"): lambda: self._resume_answer(_input(variables, query)),
        }
        handler = handlers.get((kind, root))
        if handler is None:
            type_name = "Mutation" if kind == "mutation" else "Query"
            raise _GraphQLError(f'Cannot query field "{root}" on type "{type_name}".', status=400)
        return handler()

    # -- queries ----------------------------------------------------------------------------

    def _gpu_types_answer(self, query: str, variables: dict[str, Any]) -> list[dict[str, Any]]:
        selections = [
            (alias or "lowestPrice", _literal_or_variable(spec, variables))
            for alias, spec in _LOWEST_PRICE.findall(query)
        ]
        m = _GPU_TYPES_INPUT.search(query)
        wanted = _literal_or_variable(m.group(1), variables).get("id") if m else None
        out = []
        with self._lock:
            types = list(self._gpu_types.values())
            held = self._held_gpus()
        for gt in types:
            if wanted is not None and gt.id != wanted:
                continue
            entry: dict[str, Any] = {
                "id": gt.id,
                "displayName": gt.display_name,
                "manufacturer": gt.manufacturer,
                "memoryInGb": gt.memory_gb,
                "maxGpuCount": gt.max_gpu_count,
                "secureCloud": gt.secure_price is not None,
                "communityCloud": gt.community_price is not None,
                "securePrice": gt.secure_price,
                "communityPrice": gt.community_price,
                "secureSpotPrice": gt.secure_spot_price,
                "communitySpotPrice": gt.community_spot_price,
            }
            free = None if gt.available is None else max(0, gt.available - held.get(gt.id, 0))
            for alias, inp in selections:
                entry[alias] = self._lowest_price(gt, inp, free)
            out.append(entry)
        return out

    @staticmethod
    def _lowest_price(gt: SimGpuType, inp: dict[str, Any], free: int | None) -> dict[str, Any]:
        count = max(1, int(inp.get("gpuCount") or 1))
        secure = inp.get("secureCloud")
        if secure is None:
            clouds = ["SECURE", "COMMUNITY"]
        else:
            clouds = ["SECURE"] if secure else ["COMMUNITY"]
        offered = [c for c in clouds if gt.price(c, False) is not None]
        # Without a cloud in the input RunPod answers the cheaper one.
        offered.sort(key=lambda c: gt.price(c, False) or 0.0)
        cloud = offered[0] if offered else None
        limit = gt.max_gpu_count if free is None else min(gt.max_gpu_count, free)
        stock = gt.stock(cloud) if cloud is not None else None
        if count > limit:
            stock = None
        return {
            "minimumBidPrice": gt.price(cloud, True) if cloud else None,
            "uninterruptablePrice": gt.price(cloud, False) if cloud else None,
            "minVcpu": gt.vcpus_per_gpu * count,
            "minMemory": gt.ram_gb_per_gpu * count,
            "stockStatus": stock,
            "maxUnreservedGpuCount": limit if stock is not None else 0,
            "availableGpuCounts": [c for c in (1, 2, 4, 8) if c <= limit] if stock else [],
        }

    def _pod_answer(self, inp: dict[str, Any]) -> dict[str, Any] | None:
        pod_id = inp.get("podId")
        with self._lock:
            pod = self._pods.get(str(pod_id))
            # RunPod forgets terminated pods: null, not an error.
            if pod is None or pod.desired == "TERMINATED":
                return None
            return self._pod_json(pod)

    def _myself_answer(self) -> dict[str, Any]:
        with self._lock:
            live = [p for p in self._pods.values() if p.desired != "TERMINATED"]
            return {
                "id": "user_sim",
                "email": "sim@example.invalid",
                "pubKey": self.account_public_key or "",
                "clientBalance": self.client_balance,
                "currentSpendPerHr": round(
                    sum(self._cost(p) for p in live if p.desired == "RUNNING"), 6
                ),
                "spendLimit": 80,
                "pods": [self._pod_json(p) for p in live],
            }

    def _cost(self, pod: _Pod) -> float:
        return round(pod.per_gpu * pod.gpu_count, 6)

    def _has_runtime(self, pod: _Pod, now: float) -> bool:
        return pod.desired == "RUNNING" and pod.ready_at is not None and now >= pod.ready_at

    def _has_ports(self, pod: _Pod, now: float) -> bool:
        return pod.ready_at is not None and now >= pod.ready_at + pod.port_delay

    def _pod_json(self, pod: _Pod) -> dict[str, Any]:
        now = self._mono()
        runtime: dict[str, Any] | None = None
        if self._has_runtime(pod, now):
            assert pod.ready_at is not None
            assert pod.listener is not None
            ports: list[dict[str, Any]] = []
            if self._has_ports(pod, now):
                for spec in pod.ports:
                    private, _, proto = spec.partition("/")
                    if not private.isdigit():
                        continue
                    if private == "22" and proto == "tcp":
                        # The container's 22 appears behind a public IP and a mapped port.
                        ports.append(
                            {
                                "ip": "127.0.0.1",
                                "isIpPublic": True,
                                "privatePort": 22,
                                "publicPort": pod.listener.port,
                                "type": "tcp",
                            }
                        )
                    else:
                        ports.append(
                            {
                                "ip": "100.65.0.2",
                                "isIpPublic": False,
                                "privatePort": int(private),
                                "publicPort": int(private),
                                "type": proto or "http",
                            }
                        )
            runtime = {
                "uptimeInSeconds": int(now - pod.ready_at),
                "ports": ports,
                "gpus": [{"id": g["uuid"]} for g in _gpu_rows(pod)],
            }
        return {
            "id": pod.id,
            "name": pod.name,
            "desiredStatus": pod.desired,
            "costPerHr": self._cost(pod),
            "adjustedCostPerHr": self._cost(pod),
            "gpuCount": pod.gpu_count,
            "vcpuCount": pod.gpu_type.vcpus_per_gpu * max(1, pod.gpu_count),
            "memoryInGb": pod.gpu_type.ram_gb_per_gpu * max(1, pod.gpu_count),
            "imageName": pod.image,
            "lastStatusChange": pod.last_change,
            "machineId": pod.host_id.split("-")[-1],
            "machine": {"gpuDisplayName": pod.gpu_type.display_name, "podHostId": pod.host_id},
            "runtime": runtime,
        }

    def _held_gpus(self) -> dict[str, int]:
        held: dict[str, int] = {}
        for p in self._pods.values():
            if p.holds_gpus:
                held[p.gpu_type.id] = held.get(p.gpu_type.id, 0) + p.gpu_count
        return held

    # -- mutations --------------------------------------------------------------------------

    def _deploy(self, inp: dict[str, Any], *, spot: bool) -> dict[str, Any]:
        gpu_type_id = inp.get("gpuTypeId")
        count = inp.get("gpuCount", 1)
        if not isinstance(count, int) or count < 0:
            raise _GraphQLError("gpuCount must be a non-negative integer")
        image = inp.get("imageName") or ""
        if not image and not inp.get("templateId"):
            raise _GraphQLError("imageName or templateId is required")
        if (inp.get("volumeInGb") or 0) > 0 and not inp.get("volumeMountPath"):
            raise _GraphQLError("volumeMountPath is required when volumeInGb is greater than 0")
        terminate_after = _parse_time(inp.get("terminateAfter"))
        stop_after = _parse_time(inp.get("stopAfter"))
        env: dict[str, str] = {}
        for item in inp.get("env") or []:
            if isinstance(item, dict) and isinstance(item.get("key"), str):
                env[item["key"]] = str(item.get("value", ""))
        ports = [p.strip() for p in str(inp.get("ports") or "").split(",") if p.strip()]
        if inp.get("startSsh") and "22/tcp" not in ports:
            ports.append("22/tcp")
        with self._lock:
            if self._closing.is_set():
                raise _GraphQLError("simulator shutting down", status=503)
            gt = self._gpu_types.get(str(gpu_type_id))
            if gt is None:
                raise _GraphQLError(f"Invalid gpuTypeId: {gpu_type_id}")
            fault = self._take(self._capacity, None, gt.id)
            if fault is not None:
                raise _GraphQLError(fault.message)
            cloud = self._pick_cloud(gt, str(inp.get("cloudType") or "ALL"), count, spot)
            per_gpu = gt.price(cloud, spot)
            assert per_gpu is not None  # _pick_cloud checked
            bid: float | None = None
            if spot:
                raw_bid = inp.get("bidPerGpu")
                if not isinstance(raw_bid, int | float):
                    raise _GraphQLError("bidPerGpu is required for interruptible pods")
                bid = float(raw_bid)
                if bid < per_gpu:
                    raise _GraphQLError(
                        f"Your bid of ${bid:.3f}/hr is below the minimum bid price of "
                        f"${per_gpu:.3f}/hr for this GPU"
                    )
                per_gpu = bid
            overrides = self._take_pod_faults(gt.id)
            pod_id = _pod_id()
            while pod_id in self._pods:
                pod_id = _pod_id()
            keys = [ln.strip() for ln in env.get("PUBLIC_KEY", "").splitlines() if ln.strip()]
            if self.account_public_key:
                keys.append(self.account_public_key.strip())
            visible = 0 if self.cpu_only else count
            if overrides.visible_gpus is not None:
                visible = min(count, overrides.visible_gpus)
            now = self.now()
            pod = _Pod(
                id=pod_id,
                name=str(inp.get("name") or ""),
                gpu_type=gt,
                gpu_count=count,
                visible_gpus=visible,
                cloud=cloud,
                spot=spot,
                bid=bid,
                per_gpu=per_gpu,
                image=image,
                env=env,
                public_keys=keys,
                ports=ports,
                host_id=f"{pod_id}-{secrets.token_hex(4)}",
                created_at=now,
                terminate_after=terminate_after,
                stop_after=stop_after,
                ssh_mode=overrides.ssh_mode or "ok",
                startup_delay=(
                    overrides.startup_delay
                    if overrides.startup_delay is not None
                    else self.startup_delay
                ),
                port_delay=(
                    overrides.port_delay if overrides.port_delay is not None else self.port_delay
                ),
                shell_rc=self.shell_rc,
                gpus_hang=bool(overrides.gpus_hang),
                holds_gpus=True,
            )
            pod.running_at = self._mono() + max(0.0, self.provision_delay)
            pod.desired = "RUNNING" if self.provision_delay <= 0 else "CREATED"
            pod.last_change = _status_word("Rented by User", now)
            pod.history.append(pod.desired)
            self._write_pod_files(pod)
            late = self._take(self._late, None)
            if late is not None:
                # The provider acts late: the pod exists only from its release on.
                self._held[pod_id] = pod
                if late.retry_after >= 0:
                    timer = threading.Timer(late.retry_after, self._release, args=(pod_id,))
                    timer.daemon = True
                    timer.start()
                log.info("deploy of pod %s held back (late_deploy)", pod_id)
                if late.mode == "drop":
                    raise _DropConnection
                raise _LostAs504
            self._pods[pod_id] = pod
            answer = self._pod_json(pod)
            lost = self._take(self._lost, None)
            self._start_boot(pod)
        log.info("deployed pod %s (%s x%d, %s)", pod_id, gt.id, count, cloud)
        if lost is not None:
            if lost.mode == "drop":
                raise _DropConnection
            raise _LostAs504
        return answer

    def _pick_cloud(self, gt: SimGpuType, wanted: str, count: int, spot: bool) -> str:
        clouds = ["SECURE", "COMMUNITY"] if wanted.upper() == "ALL" else [wanted.upper()]
        held = self._held_gpus().get(gt.id, 0)
        free = None if gt.available is None else gt.available - held
        usable = [
            c
            for c in clouds
            if c in ("SECURE", "COMMUNITY")
            and gt.price(c, spot) is not None
            and gt.stock(c) is not None
            and count <= gt.max_gpu_count
            and (free is None or count <= free)
        ]
        if not usable:
            raise _GraphQLError(CAPACITY_MESSAGE)
        return min(usable, key=lambda c: gt.price(c, spot) or 0.0)

    def _take_pod_faults(self, gpu_type_id: str) -> _PodFault:
        merged = _PodFault(None, None)
        for f in list(self._pod_faults):
            if f.gpu_type_id is not None and f.gpu_type_id != gpu_type_id:
                continue
            for name in ("startup_delay", "port_delay", "ssh_mode", "visible_gpus", "gpus_hang"):
                if getattr(f, name) is not None:
                    setattr(merged, name, getattr(f, name))
            if f.remaining is not None:
                f.remaining -= 1
                if f.remaining <= 0:
                    self._pod_faults.remove(f)
        return merged

    def _pod_or_error(self, inp: dict[str, Any], message: str) -> _Pod:
        pod = self._pods.get(str(inp.get("podId")))
        if pod is None or pod.desired == "TERMINATED":
            raise _GraphQLError(message)
        return pod

    def _terminate_answer(self, inp: dict[str, Any]) -> None:
        with self._lock:
            pod = self._pod_or_error(inp, TERMINATE_NOT_FOUND_MESSAGE)
        self._terminate(pod.id, by="user")
        return None

    def _stop_answer(self, inp: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            pod = self._pod_or_error(inp, POD_NOT_FOUND_MESSAGE)
        self._stop_pod(pod.id, verb="Exited by User")
        return {"id": pod.id, "desiredStatus": "EXITED"}

    def _resume_answer(self, inp: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            pod = self._pod_or_error(inp, POD_NOT_FOUND_MESSAGE)
            if pod.desired != "EXITED":
                raise _GraphQLError(f"Pod {pod.id} is not stopped (status {pod.desired})")
            count = inp.get("gpuCount", pod.gpu_count)
            if isinstance(count, int) and count != pod.gpu_count:
                raise _GraphQLError(RESUME_CAPACITY_MESSAGE)
            gt = self._gpu_types.get(pod.gpu_type.id, pod.gpu_type)
            held = self._held_gpus().get(gt.id, 0)
            if gt.available is not None and held + pod.gpu_count > gt.available:
                raise _GraphQLError(RESUME_CAPACITY_MESSAGE)
            pod.holds_gpus = True
            pod.gen += 1
            pod.cancel = threading.Event()
            pod.ready_at = None
            pod.running_at = self._mono()
            self._set_status(pod, "RUNNING", "Resumed by User")
            self._start_boot(pod)
            return {"id": pod.id, "desiredStatus": "RUNNING"}
