"""bifrost: run things on any SSH box (or ``local``), robustly.

Quick tour::

    from bifrost import Host
    with Host("root@1.2.3.4:22022") as box:
        print(box.exec("nvidia-smi -L").stdout)
        box.push(".", bootstrap=True)
        job = box.run("python train.py", workspace="myproj")
        job.follow()

Errors all derive from :class:`BifrostError`.
"""

from __future__ import annotations

import importlib

from bifrost.errors import (
    AuthError,
    BifrostError,
    CommandError,
    CommandTimeout,
    ConnectError,
    ConnectionLostError,
    HostKeyChangedError,
    JobError,
    JobNotFoundError,
    JobTimeout,
    TargetError,
    TransferError,
)

# `typing` costs ~5 ms at import; every CLI call imports this module, and mypy treats a
# local TYPE_CHECKING like typing's.
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any

    from bifrost.exec import Result
    from bifrost.gpus import GPU, GPUReport
    from bifrost.group import Group, HostOutcome
    from bifrost.host import Host, connect
    from bifrost.hostkeys import KnownHosts, forget_host
    from bifrost.jobs import Job, JobStatus, LogDecoder
    from bifrost.sync import PushResult, list_files
    from bifrost.target import Target, parse_target

# Imported on first use (PEP 562): `import bifrost.cli` must not pay for asyncio, tqdm and the
# rest when a call only needs a few stdlib modules (every CLI call imports this package).
_LAZY = {
    "Result": "bifrost.exec",
    "GPU": "bifrost.gpus",
    "GPUReport": "bifrost.gpus",
    "Group": "bifrost.group",
    "HostOutcome": "bifrost.group",
    "Host": "bifrost.host",
    "connect": "bifrost.host",
    "KnownHosts": "bifrost.hostkeys",
    "forget_host": "bifrost.hostkeys",
    "Job": "bifrost.jobs",
    "JobStatus": "bifrost.jobs",
    "LogDecoder": "bifrost.jobs",
    "PushResult": "bifrost.sync",
    "list_files": "bifrost.sync",
    "Target": "bifrost.target",
    "parse_target": "bifrost.target",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bifrost' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GPU",
    "AuthError",
    "BifrostError",
    "CommandError",
    "CommandTimeout",
    "ConnectError",
    "ConnectionLostError",
    "GPUReport",
    "Group",
    "Host",
    "HostKeyChangedError",
    "HostOutcome",
    "Job",
    "JobError",
    "JobNotFoundError",
    "JobStatus",
    "JobTimeout",
    "KnownHosts",
    "LogDecoder",
    "PushResult",
    "Result",
    "Target",
    "TargetError",
    "TransferError",
    "connect",
    "forget_host",
    "list_files",
    "parse_target",
]
