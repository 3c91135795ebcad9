"""Instance lifecycle: create with failover, staged readiness, terminate, reap, reconcile.

The rules that keep every instance accounted for:

* The journal entry (with a unique ``broker-<journal id>-<id>`` name also sent to the provider)
  is written *before* the provider is called, so a create interrupted at any point can be found
  by name; the journal id tells this journal's instances from other journals' (*foreign*) ones.
* Each entry walks a recorded state machine, ``intent → sent → created → ready → terminating →
  closed`` (:class:`broker.journal.Phase`); every recovery decision reads it.
* An entry is either *held* by a live process (``owner``: host, pid and the pid's start time, so a
  reused pid is not mistaken for the holder) or *detached* (``owner`` empty: ``broker create``, a
  script that calls :meth:`ManagedInstance.detach`). ``reconcile`` treats instances whose holder
  died as orphans; detached ones live until terminated or their TTL passes.
* ``terminate`` is journaled before the provider is asked and polls until the instance is really
  gone before closing the entry; ``reap`` finishes terminates nobody finished.

Modules: :mod:`~broker.lifecycle.base` (TTL, owners, deadlines, the polling helper),
:mod:`~broker.lifecycle.provision` (create and failover), :mod:`~broker.lifecycle.readiness`,
:mod:`~broker.lifecycle.reconcile` (terminate, reap, reconcile) and
:mod:`~broker.lifecycle.instance` (the handle). :class:`~broker.client.GPUClient` exposes all of
this; nothing here imports :mod:`broker.client`.
"""

from __future__ import annotations

from broker.lifecycle.base import (
    ABANDONED,
    Deadline,
    LifecycleClient,
    ProgressFn,
    Retry,
    Stage,
    current_owner,
    format_duration,
    owner_alive,
    parse_ttl,
    poll,
)
from broker.lifecycle.instance import ManagedInstance
from broker.lifecycle.provision import CreateOptions, create, instance_name
from broker.lifecycle.readiness import wait_until_ready
from broker.lifecycle.reconcile import (
    Finding,
    ReconcileReport,
    entries_to_reap,
    expired_entries,
    find_discrepancies,
    fix,
    orphan_reason,
    reap,
    reap_reason,
    resolve_entry,
    terminate,
)

__all__ = [
    "ABANDONED",
    "CreateOptions",
    "Deadline",
    "Finding",
    "LifecycleClient",
    "ManagedInstance",
    "ProgressFn",
    "ReconcileReport",
    "Retry",
    "Stage",
    "create",
    "current_owner",
    "entries_to_reap",
    "expired_entries",
    "find_discrepancies",
    "fix",
    "format_duration",
    "instance_name",
    "orphan_reason",
    "owner_alive",
    "parse_ttl",
    "poll",
    "reap",
    "reap_reason",
    "resolve_entry",
    "terminate",
    "wait_until_ready",
]
