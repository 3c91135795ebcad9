"""A stand-in ``nvidia-smi`` for simulated pods (stdlib only; run as a script inside a pod).

The simulator copies this file into each pod's ``bin/`` as ``nvidia-smi`` (with a shebang for the
simulator's own interpreter) next to a ``gpus.json`` describing the pod's GPUs. It answers the
forms that probes and :mod:`bifrost.gpus` use:

* ``nvidia-smi -L`` / ``--list-gpus``
* ``nvidia-smi --query-gpu=index,uuid,name,... --format=csv[,noheader][,nounits] [-i 0,1]``
* ``nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,...``
* plain ``nvidia-smi`` (a short summary table)

``gpus.json``: ``{"driver_version": str, "cuda_version": str, "driver_error": bool,
"gpus": [{"index", "uuid", "name", "memory_total_mib", "memory_used_mib", "utilization_pct",
"compute_cap", "bus_id"}], "processes": [{"gpu_uuid", "pid", "name", "used_memory_mib"}]}``.
``driver_error`` makes every call fail the way nvidia-smi does on a box without a working driver;
``hang`` (optional) makes every call hang until killed, as on a wedged driver.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DRIVER_ERROR = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
BAD_ARGS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."

Row = dict[str, Any]
#: field -> (unit shown without ``nounits``, value getter). Aliases share a getter.
_Field = tuple[str, Callable[[Row, int], str]]


def _mib(key: str) -> Callable[[Row, int], str]:
    return lambda g, _n: str(int(g.get(key, 0)))


_GPU_FIELDS: dict[str, _Field] = {
    "index": ("", lambda g, _n: str(g["index"])),
    "uuid": ("", lambda g, _n: str(g["uuid"])),
    "gpu_uuid": ("", lambda g, _n: str(g["uuid"])),
    "name": ("", lambda g, _n: str(g["name"])),
    "gpu_name": ("", lambda g, _n: str(g["name"])),
    "count": ("", lambda _g, n: str(n)),
    "memory.total": ("MiB", _mib("memory_total_mib")),
    "memory.used": ("MiB", _mib("memory_used_mib")),
    "memory.free": (
        "MiB",
        lambda g, _n: str(int(g.get("memory_total_mib", 0)) - int(g.get("memory_used_mib", 0))),
    ),
    "memory.reserved": ("MiB", lambda _g, _n: "0"),
    "utilization.gpu": ("%", lambda g, _n: str(int(g.get("utilization_pct", 0)))),
    "utilization.memory": ("%", lambda _g, _n: "0"),
    "temperature.gpu": ("", lambda _g, _n: "34"),
    "power.draw": ("W", lambda _g, _n: "61.27"),
    "power.limit": ("W", lambda _g, _n: "350.00"),
    "pstate": ("", lambda _g, _n: "P0"),
    "persistence_mode": ("", lambda _g, _n: "Enabled"),
    "compute_cap": ("", lambda g, _n: str(g.get("compute_cap", "8.0"))),
    "pci.bus_id": ("", lambda g, _n: str(g.get("bus_id", ""))),
    "gpu_bus_id": ("", lambda g, _n: str(g.get("bus_id", ""))),
    "serial": ("", lambda g, _n: f"13240{int(g['index']):08d}"),
    "clocks.sm": ("MHz", lambda _g, _n: "1410"),
    "clocks.max.sm": ("MHz", lambda _g, _n: "1980"),
}

_APP_FIELDS: dict[str, _Field] = {
    "gpu_uuid": ("", lambda p, _n: str(p["gpu_uuid"])),
    "pid": ("", lambda p, _n: str(p["pid"])),
    "process_name": ("", lambda p, _n: str(p["name"])),
    "name": ("", lambda p, _n: str(p["name"])),
    "used_memory": ("MiB", lambda p, _n: str(int(p.get("used_memory_mib", 0)))),
    "used_gpu_memory": ("MiB", lambda p, _n: str(int(p.get("used_memory_mib", 0)))),
}


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _csv(
    fields: Sequence[str], table: dict[str, _Field], rows: Sequence[Row], fmt: set[str], n: int
) -> tuple[list[str], int]:
    for f in fields:
        if f not in table:
            return [f'Field "{f}" is not a valid field to query.', ""], 2
    units = "nounits" not in fmt
    out: list[str] = []
    if "noheader" not in fmt:
        out.append(", ".join(f"{f} [{table[f][0]}]" if table[f][0] else f for f in fields))
    for row in rows:
        vals = []
        for f in fields:
            unit, get = table[f]
            v = get(row, n)
            vals.append(f"{v} {unit}" if units and unit else v)
        out.append(", ".join(vals))
    return out, 0


def _summary(data: dict[str, Any], gpus: Sequence[Row]) -> list[str]:
    lines = [
        "+-----------------------------------------------------------------------------+",
        f"| NVIDIA-SMI {data.get('driver_version', '')}   Driver Version: "
        f"{data.get('driver_version', '')}   CUDA Version: {data.get('cuda_version', '')} |",
        "|-------------------------------+----------------------+----------------------+",
    ]
    for g in gpus:
        lines.append(
            f"| {g['index']:>3}  {g['name']:<28} | {g.get('bus_id', '')} | "
            f"{int(g.get('memory_used_mib', 0))}MiB / {int(g.get('memory_total_mib', 0))}MiB | "
            f"{int(g.get('utilization_pct', 0))}% |"
        )
    lines.append("+-----------------------------------------------------------------------------+")
    if not data.get("processes"):
        lines.append("| No running processes found" + " " * 50 + "|")
    return lines


def run(argv: Sequence[str], data: dict[str, Any]) -> tuple[list[str], int]:
    """Output lines and exit code for ``nvidia-smi argv`` on a box described by ``data``."""
    if data.get("driver_error"):
        return [DRIVER_ERROR, ""], 9
    gpus: list[Row] = list(data.get("gpus", []))
    query_gpu: list[str] | None = None
    query_apps: list[str] | None = None
    fmt: set[str] | None = None
    ids: set[str] | None = None
    list_gpus = False
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        value: str | None = None
        if "=" in a and a.startswith("--"):
            a, value = a.split("=", 1)
        elif a in ("-i", "--id", "--format", "--query-gpu", "--query-compute-apps") and i + 1 < len(
            args
        ):
            i += 1
            value = args[i]
        if a in ("-L", "--list-gpus"):
            list_gpus = True
        elif a in ("--query-gpu", "-q-gpu") and value is not None:
            query_gpu = [f.strip() for f in value.split(",") if f.strip()]
        elif a == "--query-compute-apps" and value is not None:
            query_apps = [f.strip() for f in value.split(",") if f.strip()]
        elif a == "--format" and value is not None:
            fmt = {f.strip() for f in value.split(",")}
        elif a in ("-i", "--id") and value is not None:
            ids = {v.strip() for v in value.split(",")}
        else:
            return [BAD_ARGS, ""], 2
        i += 1
    if ids is not None:
        gpus = [g for g in gpus if str(g["index"]) in ids or g["uuid"] in ids]
        if not gpus:
            return ["No devices were found", ""], 6
    if not data.get("gpus"):
        return ["No devices were found", ""], 6
    if list_gpus:
        return [f"GPU {g['index']}: {g['name']} (UUID: {g['uuid']})" for g in gpus], 0
    if query_gpu is not None or query_apps is not None:
        if fmt is None or "csv" not in fmt:
            return ['"--format" option is required and must include "csv".', ""], 2
        if query_gpu is not None:
            return _csv(query_gpu, _GPU_FIELDS, gpus, fmt, len(gpus))
        assert query_apps is not None
        uuids = {g["uuid"] for g in gpus}
        procs = [p for p in data.get("processes", []) if p.get("gpu_uuid") in uuids]
        return _csv(query_apps, _APP_FIELDS, procs, fmt, len(gpus))
    return _summary(data, gpus), 0


def main() -> int:
    """Entry point when run as the pod's ``nvidia-smi``."""
    data = _load(Path(sys.argv[0]).resolve().with_name("gpus.json"))
    if data.get("hang"):
        import time

        time.sleep(24 * 3600)  # a wedged driver: no answer until killed
    lines, code = run(sys.argv[1:], data)
    # The real tool prints its errors on stdout too, and callers parse that.
    text = "\n".join(lines)
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
