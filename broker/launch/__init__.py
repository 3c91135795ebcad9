"""Launch and sweep: a task spec in, results out, no box forgotten.

:class:`Task` (YAML or Python) says what to rent, push, set up, run and pull back;
:func:`launch` runs it end to end; :class:`Sweep` runs a task template over a parameter matrix
with a concurrency cap, resumable after its own process was killed. See ``docs/launch.md``.
"""

from __future__ import annotations

from broker.launch.records import LaunchRecord, LaunchStore
from broker.launch.runner import Launch, LaunchError, LaunchResult, Plan, launch
from broker.launch.task import Resources, Retries, Task, TaskError, load_task

__all__ = [
    "Launch",
    "LaunchError",
    "LaunchRecord",
    "LaunchResult",
    "LaunchStore",
    "Plan",
    "Resources",
    "Retries",
    "Task",
    "TaskError",
    "launch",
    "load_task",
]
