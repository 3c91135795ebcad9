"""Benchmark: parse + filter + sort 100,000 offers with a 5-predicate query (target < 200 ms).

Run by hand: ``uv run python bench/bench_query.py``. Writes ``bench/results/query.json``.
Offer construction is not timed (it happens once, in the adapters); parsing, compiling the filter,
filtering, sorting and limiting are. Runs on one thread (so on one core).
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from broker.query import parse, run_query
from broker.types import CloudType, GPUOffer, Manufacturer

QUERY = "gpu~A100 gpus>=2 vram>=80GB manufacturer=nvidia price<=6/h sort=price,-vram limit=50"
N = 100_000
GPUS = [
    ("A100 SXM 80GB", 80.0),
    ("A100 PCIe 80GB", 80.0),
    ("A100 SXM 40GB", 40.0),
    ("H100 SXM 80GB", 80.0),
    ("RTX 4090 24GB", 24.0),
    ("RTX A6000 48GB", 48.0),
    ("L40S 48GB", 48.0),
]


def make_offers(n: int, seed: int = 0) -> list[GPUOffer]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name, vram = rng.choice(GPUS)
        count = rng.choice([1, 1, 2, 4, 8])
        out.append(
            GPUOffer.model_construct(
                provider=rng.choice(["runpod", "vast", "lambdalabs", "primeintellect"]),
                offer_id=str(i),
                gpu_type=name,
                gpu_provider_name=name,
                manufacturer=Manufacturer.NVIDIA,
                gpu_known=True,
                gpu_count=count,
                vram_gb=vram if rng.random() > 0.02 else None,
                price_per_hour=round(rng.uniform(0.2, 3.5) * count, 3),
                spot=rng.random() < 0.3,
                cloud_type=CloudType.COMMUNITY,
                stock=None,
                source="bench",
            )
        )
    return out


def main() -> None:
    offers = make_offers(N)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        q = parse(QUERY)
        result = run_query(q, offers)
        times.append(time.perf_counter() - t0)
    best, median = min(times), statistics.median(times)
    data = {
        "benchmark": "parse + filter + sort + limit",
        "query": QUERY,
        "offers": N,
        "matched_after_limit": len(result),
        "runs": len(times),
        "best_ms": round(best * 1000, 1),
        "median_ms": round(median * 1000, 1),
        "target_ms": 200,
        "meets_target": median * 1000 < 200,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    path = Path(__file__).parent / "results" / "query.json"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
