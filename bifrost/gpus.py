"""``bifrost gpus``: nvidia-smi's view of a box, parsed into plain objects."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bifrost.session import Session

_QUERY_GPUS = (
    "if ! command -v nvidia-smi >/dev/null 2>&1; then echo BIFROST_NO_NVIDIA_SMI; exit 0; fi; "
    "nvidia-smi --query-gpu=index,uuid,name,memory.used,memory.total,utilization.gpu "
    "--format=csv,noheader,nounits || exit $?"
)
_QUERY = (
    _QUERY_GPUS + "; echo BIFROST_APPS; "
    "nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory "
    "--format=csv,noheader,nounits 2>/dev/null || true"
)


@dataclass(frozen=True)
class GPUProcess:
    """A process holding GPU memory."""

    pid: int
    name: str
    memory_mib: int | None


@dataclass(frozen=True)
class GPU:
    """One GPU as nvidia-smi reports it."""

    index: int
    uuid: str
    name: str
    memory_used_mib: int | None
    memory_total_mib: int | None
    utilization_pct: int | None
    processes: list[GPUProcess] = field(default_factory=list)


@dataclass(frozen=True)
class GPUReport:
    """All GPUs of one host; ``available`` False (with ``message``) when there are none."""

    host: str
    available: bool
    gpus: list[GPU]
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return asdict(self)


def _int(text: str) -> int | None:
    text = text.strip()
    try:
        return int(float(text))
    except ValueError:
        return None


def parse_nvidia_smi(host: str, text: str) -> GPUReport:
    """Parse the output of bifrost's nvidia-smi query (exposed for tests)."""
    if "BIFROST_NO_NVIDIA_SMI" in text:
        return GPUReport(host, False, [], "no NVIDIA GPU: nvidia-smi is not installed")
    gpu_part, _, app_part = text.partition("BIFROST_APPS")
    gpus: list[GPU] = []
    for line in gpu_part.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 6:
            continue
        gpus.append(
            GPU(int(cols[0]), cols[1], cols[2], _int(cols[3]), _int(cols[4]), _int(cols[5]))
        )
    by_uuid = {g.uuid: g for g in gpus}
    for line in app_part.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) >= 4 and cols[0] in by_uuid and cols[1].isdigit():
            by_uuid[cols[0]].processes.append(GPUProcess(int(cols[1]), cols[2], _int(cols[3])))
    if not gpus:
        return GPUReport(host, False, [], "no NVIDIA GPU: nvidia-smi lists no devices")
    return GPUReport(host, True, gpus)


async def agpus(
    host: Session, *, processes: bool = True, timeout: float | None = None
) -> GPUReport:
    """Coroutine behind :meth:`bifrost.Host.gpus`."""
    from bifrost.exec import run_command

    result, timed_out = await run_command(
        await host.atransport(), _QUERY if processes else _QUERY_GPUS, timeout=timeout
    )
    if timed_out:
        # nvidia-smi hangs on a wedged driver or GPU: that box has no usable GPU.
        return GPUReport(host.name, False, [], f"nvidia-smi did not answer within {timeout:g}s")
    if result.exit_code != 0:
        msg = (result.stderr or result.stdout).strip().splitlines()
        return GPUReport(
            host.name,
            False,
            [],
            "nvidia-smi failed: " + (msg[-1] if msg else f"exit {result.exit_code}"),
        )
    return parse_nvidia_smi(host.name, result.stdout)
