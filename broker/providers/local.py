"""The ``local`` provider: this machine as one offer at $0/h.

GPUs come from ``nvidia-smi`` when it is present; otherwise the offer is CPU-only (``gpu_count``
0). "Creating" an instance leases this machine: the lease is a small JSON file in the state dir,
so every broker process sees it, and bifrost reaches it through the ``local`` target.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from broker import catalog
from broker.errors import NotFoundError
from broker.providers.base import Capabilities, Provider, cpu_only_offer, register
from broker.types import (
    CloudType,
    CreateRequest,
    GPUOffer,
    Instance,
    InstanceStatus,
    StockLevel,
    utcnow,
)

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.query import Query

_CUDA = re.compile(r"CUDA Version:\s*([\d.]+)")


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _mem_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


@register
class LocalProvider(Provider):
    """This machine, free, always available."""

    name: ClassVar[str] = "local"
    display_name: ClassVar[str] = "This machine"
    capabilities: ClassVar[Capabilities] = Capabilities(requires_api_key=False)

    def __init__(self, state_dir: Path, *, nvidia_smi: str = "nvidia-smi") -> None:
        self.state_dir = Path(state_dir) / "local"
        self.nvidia_smi = nvidia_smi

    @classmethod
    def is_configured(cls, settings: Settings) -> bool:
        """Always usable: it needs nothing."""
        return True

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalProvider:
        """Keep leases under the configured state dir."""
        return cls(settings.state_dir)

    # -- offers --------------------------------------------------------------------------------
    def probe(self) -> GPUOffer:
        """Describe this machine as an offer (GPUs from nvidia-smi, else CPU-only)."""
        host = socket.gethostname()
        disk = shutil.disk_usage(Path.home()).free / 1e9
        common = {
            "provider": self.name,
            "offer_id": f"local:{host}",
            "vcpus": float(os.cpu_count() or 1),
            "ram_gb": _mem_gb(),
            "disk_gb": round(disk, 1),
            "price_per_hour": 0.0,
            "cloud_type": CloudType.LOCAL,
            "region": "local",
            "datacenter": host,
            "stock": StockLevel.HIGH,
        }
        gpus = self._gpus() if shutil.which(self.nvidia_smi) else None
        if gpus:
            names = [g[0] for g in gpus]
            first, vram_mib, driver = gpus[0]
            res = catalog.resolve(first, vram_gb=vram_mib / 1024, manufacturer="nvidia")
            header = _run([self.nvidia_smi]) or ""
            m = _CUDA.search(header)
            return GPUOffer(
                **common,
                gpu_type=res.name,
                gpu_provider_name=first if len(set(names)) == 1 else ", ".join(names),
                manufacturer=res.manufacturer,
                gpu_known=res.known,
                gpu_count=len(gpus),
                vram_gb=res.vram_gb,
                cuda_version=m.group(1) if m else None,
                driver_version=driver,
                compute_capability=res.compute_capability,
                form_factor=res.form_factor,
                source="local:nvidia-smi",
            )
        return cpu_only_offer(**common, source="local:cpu")

    def _gpus(self) -> list[tuple[str, float, str]]:
        out = _run(
            [
                self.nvidia_smi,
                "--query-gpu=name,memory.total,driver_version",
                "--format=csv,noheader,nounits",
            ]
        )
        gpus = []
        for line in (out or "").splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 3:
                try:
                    gpus.append((parts[0], float(parts[1]), parts[2]))
                except ValueError:
                    continue
        return gpus

    def search(self, query: Query) -> list[GPUOffer]:
        """The one offer this machine is (the client filters it like any other)."""
        return [self.probe()]

    # -- leases --------------------------------------------------------------------------------
    def _lease_path(self, instance_id: str) -> Path:
        if not re.fullmatch(r"local-[0-9a-f]{12}", instance_id):
            raise NotFoundError(f"no local lease {instance_id!r}", provider=self.name)
        return self.state_dir / f"{instance_id}.json"

    def _write(self, inst: Instance) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self._lease_path(inst.instance_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(inst.model_dump_json())
        tmp.replace(path)

    def create(self, request: CreateRequest) -> Instance:
        """Lease this machine under ``request.name``."""
        inst = Instance(
            provider=self.name,
            instance_id=f"local-{uuid.uuid4().hex[:12]}",
            name=request.name,
            status=InstanceStatus.RUNNING,
            provider_status="leased",
            gpu_type=request.offer.gpu_type,
            gpu_count=request.offer.gpu_count,
            price_per_hour=0.0,
            created_at=utcnow(),
            offer=request.offer,
            extra={"target": "local"},
        )
        self._write(inst)
        return inst

    def get(self, instance_id: str) -> Instance:
        """The lease as last written."""
        path = self._lease_path(instance_id)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"no local lease {instance_id!r}", provider=self.name) from None
        inst = Instance.model_validate(data)
        inst.observed_at = utcnow()
        return inst

    def list_instances(self) -> list[Instance]:
        """Every lease, released ones included."""
        if not self.state_dir.exists():
            return []
        return [self.get(p.stem) for p in sorted(self.state_dir.glob("local-*.json"))]

    def terminate(self, instance_id: str) -> None:
        """Release the lease (idempotent)."""
        inst = self.get(instance_id)
        if inst.status is not InstanceStatus.TERMINATED:
            inst.status = InstanceStatus.TERMINATED
            inst.provider_status = "released"
            self._write(inst)
