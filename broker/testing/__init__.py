"""Test doubles for broker: a local RunPod cloud whose pods are real sshd processes.

See :class:`RunPodSimulator` and ``docs/simulator.md``.
"""

from broker.testing.runpod_sim import (
    CAPACITY_MESSAGE,
    DEFAULT_GPU_TYPES,
    PodInfo,
    RequestRecord,
    RunPodSimulator,
    SimGpuType,
)

__all__ = [
    "CAPACITY_MESSAGE",
    "DEFAULT_GPU_TYPES",
    "PodInfo",
    "RequestRecord",
    "RunPodSimulator",
    "SimGpuType",
]
