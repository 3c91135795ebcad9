"""respx side effects that answer like the providers' servers, filters included.

The adapters' pushdown tests need a server that applies the filters it is sent the way the real
API documents them (Prime's exact ``gpu_type``/``gpu_count``/``security``, Vast's ``{field: {op:
value}}`` bundles filters, RunPod's per-count ``lowestPrice`` selections). Each helper takes
recorded-shape fixture data and returns a function ``request -> httpx.Response``.
"""

from __future__ import annotations

import copy
import json
import operator
from collections.abc import Callable
from typing import Any

import httpx

Handler = Callable[[httpx.Request], httpx.Response]


def runpod_gpu_types(fixture: dict[str, Any]) -> Handler:
    """``gpuTypes`` with any aliased ``lowestPrice`` selections (``secure_2``, ``community_8``).

    Each alias's variable says the cloud and the count; the answer is the fixture's price for that
    cloud, with no stock (``stockStatus`` null) above ``maxUnreservedGpuCount``, and vCPUs/RAM
    scaled by the count as RunPod reports them.
    """
    types = fixture["data"]["gpuTypes"]

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        variables: dict[str, Any] = body.get("variables") or {}
        out = []
        for gt in types:
            entry = {k: v for k, v in gt.items() if k not in ("secure", "community")}
            for alias, inp in variables.items():
                cloud = "secure" if inp.get("secureCloud") else "community"
                lp = copy.deepcopy(gt.get(cloud))
                if lp is not None:
                    n = int(inp["gpuCount"])
                    free = lp.get("maxUnreservedGpuCount")
                    if free is not None and n > free:
                        lp["stockStatus"] = None
                    for k in ("minVcpu", "minMemory"):
                        if lp.get(k) is not None:
                            lp[k] = lp[k] * n
                entry[alias] = lp
            out.append(entry)
        return httpx.Response(200, json={"data": {"gpuTypes": out}})

    return handle


def prime_availability(items: list[dict[str, Any]], page_size_cap: int = 100) -> Handler:
    """``GET /availability/gpus`` with Prime's exact filters and page/page_size paging."""

    def handle(request: httpx.Request) -> httpx.Response:
        p = request.url.params
        kept = list(items)
        if "gpu_type" in p:
            kept = [i for i in kept if i["gpuType"] == p["gpu_type"]]
        if "gpu_count" in p:
            kept = [i for i in kept if i["gpuCount"] == int(p["gpu_count"])]
        if "security" in p:
            kept = [i for i in kept if i.get("security") == p["security"]]
        page, size = int(p.get("page", 1)), min(int(p.get("page_size", 100)), page_size_cap)
        chunk = kept[(page - 1) * size : page * size]
        return httpx.Response(200, json={"items": chunk, "totalCount": len(kept)})

    return handle


_VAST_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}
#: Request keys that are options, not filters.
_VAST_OPTIONS = {"order", "type", "limit", "allocated_storage"}
#: Filters on machine state that every recorded offer satisfies.
_VAST_STATE = {"verified", "rentable", "rented"}


def vast_bundles(on_demand: list[dict[str, Any]], bid: list[dict[str, Any]]) -> Handler:
    """``POST /bundles/``: ``type`` picks the list; every ``{field: {op: value}}`` is applied."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        offers = bid if body.get("type") == "bid" else on_demand
        kept = []
        for o in offers:
            row = {**o, "gpu_total_ram": (o.get("gpu_ram") or 0) * o["num_gpus"]}
            ok = True
            for fld, cond in body.items():
                if fld in _VAST_OPTIONS or fld in _VAST_STATE:
                    continue
                for op, want in cond.items():
                    have = row.get(fld)
                    if have is None or not _VAST_OPS[op](have, want):
                        ok = False
            if ok:
                kept.append(o)
        return httpx.Response(200, json={"offers": kept})

    return handle
