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
from bifrost.exec import Result
from bifrost.gpus import GPU, GPUReport
from bifrost.group import Group, HostOutcome
from bifrost.host import Host, connect
from bifrost.hostkeys import KnownHosts, forget_host
from bifrost.jobs import Job, JobStatus, LogDecoder
from bifrost.sync import PushResult, list_files
from bifrost.target import Target, parse_target

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
