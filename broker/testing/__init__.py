"""Test doubles for broker: a local RunPod cloud whose pods are real sshd processes.

See :class:`RunPodSimulator` and ``docs/simulator.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m broker.testing.runpod_sim` does not find its own module
    # already imported by the package (runpy warns about that).
    if name in __all__:
        from broker.testing import runpod_sim

        return getattr(runpod_sim, name)
    raise AttributeError(f"module 'broker.testing' has no attribute {name!r}")
