"""Benchmark: the query language against gpuhunt's filter, side by side, on the same 100k offers.

Run by hand (gpuhunt is in the ``bench`` dependency group)::

    python3 -m uv run --group bench python bench/bench_query.py

Both sides get the same 100,000 offers (built once, untimed: adapters build them) and the same five
predicates, and both filter, sort (price ascending, then VRAM descending) and keep the first 50:

* broker: ``parse(QUERY)`` + :func:`broker.query.run_query` (compile, filter, sort, limit);
* gpuhunt: ``QueryFilter(...)`` + ``[i for i in items if matches(i, q)]`` + ``sorted(...)[:50]``.

Rounds alternate between the two, so load on the machine hits both alike; the ratio of the medians
is the figure (target ≤ 1.0, moonshot ≤ 0.5). Before timing, the script checks that both select
exactly the same offers. Results go to ``bench/results/query.json``.

Then what users type (``cli`` in the JSON): ``broker search QUERY --json`` as a new process per
call against the RunPod simulator (real HTTP on loopback; its catalogue), beside the same search
through the API in this warm process (``GPUClient().search``), the CLI's start-up alone
(``broker --help``) and the start-up a gpuhunt script pays before it does anything (a new
``python -c "import gpuhunt"``; gpuhunt's own providers call the real clouds, which this machine
cannot reach).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.query import parse, run_query
from broker.types import CloudType, GPUOffer, Manufacturer

try:
    from gpuhunt import AcceleratorVendor, CatalogItem, QueryFilter
    from gpuhunt._internal.constraints import matches as gpuhunt_matches
    from gpuhunt.version import __version__ as gpuhunt_version
except ImportError:  # pragma: no cover - a hint for running it by hand
    sys.exit("gpuhunt is missing: `python3 -m uv run --group bench python bench/bench_query.py`")

QUERY = "gpu~A100 gpus>=2 vram>=80GB manufacturer=nvidia price<=6/h sort=price,-vram limit=50"
LIMIT = 50
N = 100_000
ROUNDS = 15
#: (canonical name, gpuhunt's name, VRAM GB, vendor)
GPUS = [
    ("A100 SXM 80GB", "A100", 80.0, "nvidia"),
    ("A100 PCIe 80GB", "A100", 80.0, "nvidia"),
    ("A100 SXM 40GB", "A100", 40.0, "nvidia"),
    ("H100 SXM 80GB", "H100", 80.0, "nvidia"),
    ("RTX 4090 24GB", "RTX4090", 24.0, "nvidia"),
    ("RTX A6000 48GB", "A6000", 48.0, "nvidia"),
    ("L40S 48GB", "L40S", 48.0, "nvidia"),
    ("MI300X 192GB", "MI300X", 192.0, "amd"),
]
PROVIDERS = ["runpod", "vast", "lambdalabs", "primeintellect"]


def make_offers(n: int, seed: int = 0) -> tuple[list[GPUOffer], list[CatalogItem]]:
    """The same n offers as broker GPUOffers and as gpuhunt CatalogItems."""
    rng = random.Random(seed)
    ours: list[GPUOffer] = []
    theirs: list[CatalogItem] = []
    for i in range(n):
        name, short, vram, vendor = rng.choice(GPUS)
        accel = AcceleratorVendor.NVIDIA if vendor == "nvidia" else AcceleratorVendor.AMD
        count = rng.choice([1, 1, 2, 4, 8])
        known_vram = vram if rng.random() > 0.02 else None
        price = round(rng.uniform(0.2, 3.5) * count, 3)
        spot = rng.random() < 0.3
        provider = rng.choice(PROVIDERS)
        ours.append(
            GPUOffer.model_construct(
                provider=provider,
                offer_id=str(i),
                gpu_type=name,
                gpu_provider_name=name,
                manufacturer=Manufacturer(vendor),
                gpu_known=True,
                gpu_count=count,
                vram_gb=known_vram,
                price_per_hour=price,
                spot=spot,
                cloud_type=CloudType.COMMUNITY,
                stock=None,
                source="bench",
            )
        )
        theirs.append(
            CatalogItem(
                provider=provider,
                instance_name=str(i),
                location="somewhere",
                price=price,
                cpu=8 * count,
                memory=64.0 * count,
                gpu_count=count,
                gpu_name=short,
                gpu_memory=known_vram,
                spot=spot,
                disk_size=None,
                gpu_vendor=accel,
            )
        )
    return ours, theirs


def run_broker(offers: list[GPUOffer]) -> list[str]:
    q = parse(QUERY)
    return [o.offer_id for o in run_query(q, offers)]


def run_gpuhunt(items: list[CatalogItem]) -> list[str]:
    q = QueryFilter(
        gpu_name=["A100"],
        min_gpu_count=2,
        min_gpu_memory=80,
        gpu_vendor=AcceleratorVendor.NVIDIA,
        max_price=6.0,
    )
    kept = [i for i in items if gpuhunt_matches(i, q)]
    kept.sort(key=lambda i: (i.price, -(i.gpu_memory or 0)))
    return [i.instance_name for i in kept[:LIMIT]]


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


CLI_QUERY = "gpu~A100 vram>=80GB manufacturer=nvidia !spot sort=price limit=20"
CLI_ROUNDS = 7


def bench_cli() -> dict[str, Any]:
    """`broker search` as typed (a new process per call) beside the API, on the simulator."""
    import subprocess
    import tempfile
    from unittest import mock

    from broker import GPUClient
    from broker.testing import RunPodSimulator

    broker_bin = str(Path(sys.executable).parent / "broker")
    key = "bench-query-key-0123456789"
    with tempfile.TemporaryDirectory(prefix="broker-bench-query-") as tmp:
        env = {
            "BROKER_STATE_DIR": f"{tmp}/state",
            "BROKER_CONFIG": f"{tmp}/config.toml",
            "BROKER_ENV_FILE": f"{tmp}/no.env",
            "RUNPOD_API_KEY": key,
            "BROKER_PROVIDERS": "runpod",
        }
        # Restored afterwards (RUNPOD_API_URL too, which is set once the simulator is up).
        with mock.patch.dict(os.environ, env), RunPodSimulator(api_key=key) as sim:
            os.environ["RUNPOD_API_URL"] = sim.url

            def cli() -> None:
                r = subprocess.run([broker_bin, "search", CLI_QUERY, "--json"],
                                   capture_output=True, text=True, check=True)  # fmt: skip
                assert json.loads(r.stdout), r.stdout

            def api() -> None:
                with GPUClient() as c:
                    assert c.search(CLI_QUERY).offers

            def help_() -> None:
                subprocess.run([broker_bin, "--help"], capture_output=True, check=True)

            def gpuhunt_import() -> None:
                subprocess.run([sys.executable, "-c", "import gpuhunt"], check=True)

            runs: dict[str, list[float]] = {"cli": [], "api": [], "help": [], "gh": []}
            fns = {"cli": cli, "api": api, "help": help_, "gh": gpuhunt_import}
            for fn in fns.values():
                fn()  # warm-up: compiled-module caches, the simulator's first answer
            for _ in range(CLI_ROUNDS):
                for name, fn in fns.items():
                    runs[name].append(timed(fn))
            with GPUClient() as c:
                n_offers = len(c.search("gpus>=1").offers)

    def ms(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1000, 1)

    return {
        "query": CLI_QUERY,
        "provider": "runpod (the simulator, real HTTP on loopback)",
        "offers_at_the_provider": n_offers,
        "rounds": CLI_ROUNDS,
        "broker_search_cli_median_ms": ms(runs["cli"]),
        "gpuclient_search_api_median_ms": ms(runs["api"]),
        "broker_help_startup_median_ms": ms(runs["help"]),
        "python_import_gpuhunt_median_ms": ms(runs["gh"]),
        "samples_ms": {k: [round(x * 1000, 1) for x in v] for k, v in runs.items()},
    }


def main() -> None:
    ours, theirs = make_offers(N)
    # Equivalence first: the same offers, in the same order, from both.
    a, b = run_broker(ours), run_gpuhunt(theirs)
    if a != b:
        sys.exit(f"the two queries disagree: {a[:5]} vs {b[:5]}")
    broker_s: list[float] = []
    gpuhunt_s: list[float] = []
    for r in range(ROUNDS):
        # Alternate which goes first, so neither always runs on a warmer cache.
        pair = [("b", lambda: run_broker(ours)), ("g", lambda: run_gpuhunt(theirs))]
        for tag, fn in pair if r % 2 == 0 else reversed(pair):
            (broker_s if tag == "b" else gpuhunt_s).append(timed(fn))
    bm, gm = statistics.median(broker_s), statistics.median(gpuhunt_s)
    data = {
        "benchmark": "parse + filter + sort + limit, broker vs gpuhunt, same offers, one run",
        "query": QUERY,
        "gpuhunt_filter": "QueryFilter(gpu_name=['A100'], min_gpu_count=2, min_gpu_memory=80, "
        "gpu_vendor=nvidia, max_price=6) + matches() + sort(price, -gpu_memory)[:50]",
        "offers": N,
        "matched_after_limit": len(a),
        "same_result": a == b,
        "rounds": ROUNDS,
        "broker_median_ms": round(bm * 1000, 1),
        "broker_best_ms": round(min(broker_s) * 1000, 1),
        "gpuhunt_median_ms": round(gm * 1000, 1),
        "gpuhunt_best_ms": round(min(gpuhunt_s) * 1000, 1),
        "ratio_broker_to_gpuhunt": round(bm / gm, 3),
        "target_ratio": 1.0,
        "moonshot_ratio": 0.5,
        "meets_target": bm <= gm,
        "gpuhunt": gpuhunt_version,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cli": bench_cli(),
    }
    path = Path(__file__).parent / "results" / "query.json"
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
