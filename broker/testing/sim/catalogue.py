"""The simulator's catalogue: GPU types with prices and stock, and RunPod's message texts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("broker.testing.runpod_sim")

#: RunPod's usual answer when the requested GPUs cannot be had (sent as a GraphQL error).
CAPACITY_MESSAGE = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)
#: RunPod's answer when a stopped pod's host has no free GPUs left for a resume.
RESUME_CAPACITY_MESSAGE = "There are not enough free GPUs on the host machine to start this pod."
TERMINATE_NOT_FOUND_MESSAGE = "pod not found to terminate"
POD_NOT_FOUND_MESSAGE = "pod not found"
DRIVER_VERSION = "550.127.05"
CUDA_VERSION = "12.4"
#: What a pod's sessions see after its own bin dir (a root login's usual PATH).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SshMode = Literal["ok", "refuse", "hang", "noauth"]
LostMode = Literal["drop", "504"]

# -- catalogue --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimGpuType:
    """One GPU type of the simulated catalogue. Prices are per GPU per hour, as RunPod's are.

    A cloud whose on-demand price is None is not offered; a cloud whose stock is None has none in
    stock right now (``stockStatus: null``, deploys there fail with the capacity message).
    ``available`` is how many GPUs of this type can be rented at once (None: unlimited); deploys
    take from it and terminate/stop give back.
    """

    id: str
    display_name: str
    memory_gb: int
    secure_price: float | None
    community_price: float | None
    secure_spot_price: float | None = None
    community_spot_price: float | None = None
    secure_stock: str | None = "High"
    community_stock: str | None = "High"
    max_gpu_count: int = 8
    available: int | None = None
    manufacturer: str = "Nvidia"
    vcpus_per_gpu: int = 8
    ram_gb_per_gpu: int = 62
    memory_mib: int | None = None
    compute_cap: str = "8.0"
    smi_name: str | None = None

    def price(self, cloud: str, spot: bool) -> float | None:
        """Per-GPU price in ``cloud`` (SECURE/COMMUNITY), or None when not offered there."""
        secure = cloud == "SECURE"
        on_demand = self.secure_price if secure else self.community_price
        if on_demand is None:
            return None
        if not spot:
            return on_demand
        return self.secure_spot_price if secure else self.community_spot_price

    def stock(self, cloud: str) -> str | None:
        """RunPod's stockStatus word for ``cloud`` (None: nothing in stock)."""
        return self.secure_stock if cloud == "SECURE" else self.community_stock


DEFAULT_GPU_TYPES: tuple[SimGpuType, ...] = (
    SimGpuType(
        id="NVIDIA A100 80GB PCIe",
        display_name="A100 PCIe",
        memory_gb=80,
        secure_price=1.64,
        community_price=1.19,
        secure_spot_price=0.82,
        community_spot_price=0.60,
        vcpus_per_gpu=8,
        ram_gb_per_gpu=117,
        memory_mib=81920,
        compute_cap="8.0",
    ),
    SimGpuType(
        id="NVIDIA H100 80GB HBM3",
        display_name="H100 SXM",
        memory_gb=80,
        secure_price=2.99,
        community_price=2.69,
        secure_spot_price=1.75,
        community_spot_price=1.50,
        vcpus_per_gpu=16,
        ram_gb_per_gpu=125,
        memory_mib=81559,
        compute_cap="9.0",
    ),
    SimGpuType(
        id="NVIDIA GeForce RTX 4090",
        display_name="RTX 4090",
        memory_gb=24,
        secure_price=0.69,
        community_price=0.34,
        secure_spot_price=0.35,
        community_spot_price=0.20,
        secure_stock="Medium",
        vcpus_per_gpu=6,
        ram_gb_per_gpu=41,
        memory_mib=24564,
        compute_cap="8.9",
    ),
    SimGpuType(
        id="NVIDIA RTX A6000",
        display_name="RTX A6000",
        memory_gb=48,
        secure_price=0.49,
        community_price=0.33,
        secure_spot_price=0.25,
        community_spot_price=0.17,
        community_stock="Low",
        vcpus_per_gpu=8,
        ram_gb_per_gpu=50,
        memory_mib=49140,
        compute_cap="8.6",
    ),
)

# -- records exposed to tests -----------------------------------------------------------------


def _load_gpu_types(path: str) -> list[SimGpuType]:
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, list):
        raise SystemExit(f"{path}: expected a JSON list of GPU types")
    return [SimGpuType(**item) for item in raw]
