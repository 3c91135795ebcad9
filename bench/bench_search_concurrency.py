"""Benchmark: concurrent vs sequential search across the four cloud adapters.

Run by hand: ``uv run python bench/bench_search_concurrency.py``. Writes
``bench/results/search_concurrency.json``.

Every provider API is served by respx from the test fixtures, and every HTTP response is delayed by
300 ms (a sleep in the respx side effect), so the numbers measure the fan-out, not the network.
The concurrent run has the shape GPUClient uses: a ThreadPoolExecutor with one task per provider,
each calling ``provider.search``. Target: concurrent <= 1.3x the slowest single provider.

Two queries: ``!spot`` (one HTTP call per provider) and an unconstrained ``gpus>=1`` (Vast then asks
for on-demand and bid offers separately: two calls, so it is the slowest provider at ~600 ms).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import respx
from pydantic import SecretStr

from broker.providers.base import Provider
from broker.providers.lambdalabs import LambdaProvider
from broker.providers.primeintellect import PrimeIntellectProvider
from broker.providers.runpod import RunPodProvider
from broker.providers.vast import VastProvider
from broker.query import parse

DELAY_S = 0.300
REPEATS = 7
ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = ROOT / "bench" / "results" / "search_concurrency.json"


def _load(provider: str, name: str) -> Any:
    return json.loads((FIX / provider / name).read_text())


def _delayed(payload: Callable[[httpx.Request], Any]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        time.sleep(DELAY_S)
        return httpx.Response(200, json=payload(request))

    return handler


def _mock(router: respx.MockRouter) -> None:
    runpod = _load("runpod", "gpu_types.json")
    lam = _load("lambdalabs", "instance_types.json")
    prime = _load("primeintellect", "availability_page2.json")  # one page (< page_size)
    od = _load("vast", "bundles_on_demand.json")
    bid = _load("vast", "bundles_bid.json")
    router.post("https://api.runpod.io/graphql").mock(side_effect=_delayed(lambda r: runpod))
    router.get("https://cloud.lambda.ai/api/v1/instance-types").mock(
        side_effect=_delayed(lambda r: lam)
    )
    router.get("https://api.primeintellect.ai/api/v1/availability/gpus").mock(
        side_effect=_delayed(lambda r: prime)
    )
    router.post("https://console.vast.ai/api/v0/bundles/").mock(
        side_effect=_delayed(lambda r: bid if json.loads(r.content)["type"] == "bid" else od)
    )


def _providers() -> list[Provider]:
    key = SecretStr("bench-key")
    return [
        RunPodProvider(key),
        LambdaProvider(key),
        PrimeIntellectProvider(key),
        VastProvider(key),
    ]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(query_text: str) -> dict[str, Any]:
    """Median timings of sequential and concurrent search for one query."""
    q = parse(query_text)
    providers = _providers()
    per_provider: dict[str, list[float]] = {p.name: [] for p in providers}
    sequential: list[float] = []
    concurrent: list[float] = []
    offers = 0
    with respx.mock(assert_all_called=False) as router:
        _mock(router)
        for p in providers:  # warm-up: imports, catalog caches, connection pools
            p.search(q)
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            for p in providers:
                dt, _res = _timed(lambda p=p: p.search(q))  # type: ignore[misc]
                per_provider[p.name].append(dt)
            sequential.append(time.perf_counter() - t0)

            def one(p: Provider) -> int:
                return len(p.search(q))

            with ThreadPoolExecutor(max_workers=len(providers)) as pool:
                dt, counts = _timed(lambda pool=pool: list(pool.map(one, providers)))  # type: ignore[misc]
            concurrent.append(dt)
            offers = sum(counts)
    for p in providers:
        p.close()
    med = {name: statistics.median(v) for name, v in per_provider.items()}
    slowest = max(med.values())
    conc = statistics.median(concurrent)
    return {
        "query": query_text,
        "per_provider_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "slowest_provider_ms": round(slowest * 1000, 1),
        "sequential_ms": round(statistics.median(sequential) * 1000, 1),
        "concurrent_ms": round(conc * 1000, 1),
        "concurrent_over_slowest": round(conc / slowest, 3),
        "target_ratio": 1.3,
        "meets_target": conc <= 1.3 * slowest,
        "offers": offers,
    }


def main() -> None:
    """Run both scenarios, print them, and write the JSON result."""
    results = [run("!spot"), run("gpus>=1")]
    doc = {
        "benchmark": "search_concurrency",
        "delay_per_response_ms": DELAY_S * 1000,
        "repeats": REPEATS,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "results": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    for r in results:
        print(
            f"{r['query']!r}: sequential {r['sequential_ms']} ms,"
            f" concurrent {r['concurrent_ms']} ms,"
            f" slowest provider {r['slowest_provider_ms']} ms"
            f" (ratio {r['concurrent_over_slowest']}, target <= 1.3: {r['meets_target']})"
        )
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
