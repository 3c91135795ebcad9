"""`broker launch`, `broker sweep` and `nodes: N` on the RunPod simulator (run by hand, as root).

    uv run --locked python bench/bench_launch.py     # writes bench/results/launch.json

The simulator runs in this process; its pods are real sshd processes on loopback that log in as
root (so this must run as root). Every `broker` call is a new process, as users type it; the
Python API (`GPUClient().launch(task)` in this warm process) is timed beside it.

The pods run with ``shell_rc=False``: their bash sessions skip this machine's ~/.bashrc, as on a
stock image whose .bashrc returns at once for non-interactive shells. (Root's ~/.bashrc on the
development machine runs `pyenv init`, which forks ~300 processes per SSH session and made every
simulated session cost ~0.1 CPU-s of the same 2 cores the client runs on; that is recorded as
`ssh_true_with_this_machines_bashrc_s`.)

1. launch overhead for a trivial task (push a 5-file project, `mkdir -p out && echo hi > out/x`,
   pull `out`, terminate): `broker launch t.yaml -y` vs the same steps by hand — the pod created
   and terminated through the same API calls broker makes (`GPUClient().create(...)`, which
   returns once SSH works, and `inst.terminate()`, which confirms it gone) plus plain OpenSSH:
   `ssh mkdir` + `rsync -a -e ssh` the project + `ssh 'cd dir && ...'` + `rsync` `out` back.
   One warm-up each, then interleaved repetitions.
2. a sweep of 8 trivial tasks at `--max-parallel 8` vs a sweep of one (`broker sweep -y`).
3. multi-node bring-up: `nodes: N` for N = 1, 2, 4, 8, wall from the start of renting to every
   node ready (the launch's own `timings_s.rent_s`), and the whole launch's wall.
4. the same trivial launch through the Python API (`GPUClient().launch(task)`), no new process.

    uv run --locked python bench/bench_launch.py --reps 2 --sweep-reps 1 --node-reps 1   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

KEY = "bench-launch-key-0123456789"
BROKER = str(Path(sys.executable).parent / "broker")
QUERY = "gpu~A100 !spot"
RUN = "mkdir -p out && echo hi > out/x"
REMOTE_HOME = Path("/root")
CPUS = os.cpu_count() or 1  # simulated pods log in as root on this machine


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def project(root: Path) -> Path:
    p = root / "proj"
    (p / "src").mkdir(parents=True, exist_ok=True)
    (p / "README.md").write_text("# trivial project\n")
    (p / "train.py").write_text("print('hi')\n" * 20)
    (p / "config.yaml").write_text("lr: 3.0e-4\nsteps: 10\n")
    (p / "src" / "__init__.py").write_text("")
    (p / "src" / "model.py").write_text("x = 1\n" * 200)
    return p


def task(name: str, nodes: int | None = None) -> dict[str, object]:
    """The trivial task; with ``nodes``, a bring-up task: `nodes: N`, `run: true`, no workdir
    (the figure is the time to every node ready, before any push)."""
    if nodes is not None:
        return {"name": name, "nodes": nodes, "run": "true", "workdir": None,
                "resources": {"query": QUERY, "gpus": 1, "ttl": "1h"}}  # fmt: skip
    return {
        "name": name,
        "resources": {"query": QUERY, "gpus": 1, "ttl": "1h"},
        "workdir": "proj",
        "run": RUN,
        "outputs": ["out"],
    }


def busy_cpu_s() -> float:
    """CPU seconds this whole machine has spent busy since boot (every process, not only ours)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


BUSY: dict[str, list[float]] = {}  # label -> fraction of all cores busy during each call
CPU: dict[str, list[float]] = {}  # label -> CPU seconds of our children during each call
OWN: dict[str, list[float]] = {}  # label -> CPU seconds of the `broker` process itself


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def broker(
    args: list[str], cwd: Path, timeout: float = 300, label: str | None = None
) -> tuple[float, dict]:
    """Run one `broker ...` process; its wall time and its --json result."""
    c, k = busy_cpu_s(), children_cpu_s()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(
            [BROKER, *args, "--json"], cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )
        killer = threading.Timer(timeout, p.kill)
        killer.start()
        # Reaped here (not by Popen) to read this one process's own rusage.
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        if not killer.is_alive():
            raise SystemExit(f"broker {' '.join(args)} ran past {timeout}s")
        killer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if label:
        BUSY.setdefault(label, []).append(round((busy_cpu_s() - c) / wall / CPUS, 2))
        CPU.setdefault(label, []).append(round(children_cpu_s() - k, 2))
        # The broker process itself and what it waited for (rsync, ssh), no pod's sshd.
        OWN.setdefault(label, []).append(round(usage.ru_utime + usage.ru_stime, 2))
    if p.returncode != 0:
        raise SystemExit(f"broker {' '.join(args)} exited {p.returncode}:\n{stdout}\n{stderr}")
    return wall, json.loads(stdout)


def launch_once(
    tmp: Path, name: str, nodes: int | None = None, suffix: str = ""
) -> tuple[float, dict]:
    spec = tmp / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(task(name, nodes)))
    args = ["launch", str(spec), "-y", "--results", str(tmp / "res")]
    label = "launch" if nodes is None else f"bring-up nodes={nodes}{suffix}"
    wall, data = broker(args, tmp, label=label)
    assert data["exit_code"] == 0, data
    assert data["state"] == "succeeded", data
    if nodes is None:
        assert (tmp / "res" / name / "out" / "x").read_text() == "hi\n"
    return wall, data


def by_hand_once(tmp: Path, name: str, key: Path) -> dict[str, float]:
    """The same steps with the provider API (as broker calls it) and plain ssh + rsync."""
    from broker import GPUClient

    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    inst = GPUClient().create(QUERY, gpu_count=1, ttl="1h", name=name)
    t1 = time.perf_counter()
    steps["create_s"] = t1 - t0
    assert inst.ssh is not None
    e = inst.ssh
    opts = ssh_opts(key, e.port)
    dest = f"{e.user}@{e.host}"
    rsh = " ".join(["ssh", *opts])
    remote = f"bench-hw/{name}"
    out = tmp / "hw-res" / name
    out.mkdir(parents=True)
    t2 = t1
    try:
        for argv in (
            ["ssh", *opts, dest, f"mkdir -p {remote}"],
            ["rsync", "-a", "-e", rsh, f"{tmp / 'proj'}/", f"{dest}:{remote}/"],
            ["ssh", *opts, dest, f"cd {remote} && {RUN}"],
            ["rsync", "-a", "-e", rsh, f"{dest}:{remote}/out", f"{out}/"],
        ):
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
        t2 = time.perf_counter()
        steps["ssh_rsync_s"] = t2 - t1
    finally:
        inst.terminate()
    steps["terminate_s"] = time.perf_counter() - t2
    steps["total_s"] = time.perf_counter() - t0
    assert (out / "out" / "x").read_text() == "hi\n"
    return steps


def bench_launch(tmp: Path, key: Path, tag: str, reps: int) -> dict[str, object]:
    launch_walls: list[float] = []
    timings: list[dict[str, float]] = []
    hand: list[dict[str, float]] = []
    for i in range(reps + 1):  # round 0 is the warm-up of both
        w, data = launch_once(tmp, f"{tag}-l{i}")
        h = by_hand_once(tmp, f"{tag}-h{i}", key)
        if i:
            launch_walls.append(w)
            timings.append(data.get("timings_s", {}))
            hand.append(h)
        print(
            f"  launch round {i}{' (warm-up)' if not i else ''}: broker {w:.2f}s, "
            f"by hand {h['total_s']:.2f}s",
            flush=True,
        )
    lm = med(launch_walls)
    hm = med([h["total_s"] for h in hand])
    breakdown = {k: med([t[k] for t in timings if k in t]) for k in ("rent_s", "run_s", "pull_s")}
    return {
        "broker_launch_median_s": lm,
        "by_hand_median_s": hm,
        "ratio": round(lm / hm, 3),
        "target_ratio": 1.5,
        "met": lm / hm <= 1.5,
        "broker_launch_timings_median_s": breakdown,
        "by_hand_steps_median_s": {k: med([h[k] for h in hand]) for k in hand[0]},
        "samples": {
            "broker_launch_s": [round(x, 3) for x in launch_walls],
            "broker_launch_timings_s": timings,
            "by_hand_s": [{k: round(v, 3) for k, v in h.items()} for h in hand],
        },
    }


def bench_api(tmp: Path, tag: str, reps: int, by_hand_median: float) -> dict[str, object]:
    """The same trivial launch through `GPUClient().launch(task)` in this (warm) process."""
    from broker import GPUClient
    from broker.launch import Task

    walls: list[float] = []
    for i in range(reps + 1):  # round 0 is the warm-up
        name = f"{tag}-a{i}"
        spec = dict(task(name), workdir=str(tmp / "proj"))
        t = time.perf_counter()
        res = GPUClient().launch(Task.model_validate(spec), results_dir=str(tmp / "res"))
        wall = time.perf_counter() - t
        assert (res.exit_code, res.state) == (0, "succeeded"), res
        assert (tmp / "res" / name / "out" / "x").read_text() == "hi\n"
        if i:
            walls.append(wall)
        print(f"  api round {i}{' (warm-up)' if not i else ''}: {wall:.2f}s", flush=True)
    m = med(walls)
    return {
        "api_launch_median_s": m,
        "ratio_to_by_hand": round(m / by_hand_median, 3),
        "samples_s": [round(x, 3) for x in walls],
    }


def sweep_once(tmp: Path, name: str, n: int, suffix: str = "") -> tuple[float, dict]:
    spec = tmp / f"{name}.yaml"
    t = task(name + "-{{ i }}")
    spec.write_text(yaml.safe_dump({"name": name, "task": t, "matrix": {"i": list(range(n))}}))
    wall, data = broker(
        ["sweep", str(spec), "-y", "--max-parallel", "8", "--results", str(tmp / "res")],
        tmp,
        label=f"sweep of {n}{suffix}",
    )
    assert data["leaked"] == [], data
    assert [r["state"] for r in data["rows"]] == ["succeeded"] * n, data
    return wall, data


def bench_sweep(tmp: Path, tag: str, reps: int, suffix: str = "") -> dict[str, object]:
    walls: dict[str, list[float]] = {"one": [], "eight": []}
    for i in range(reps):
        walls["one"].append(sweep_once(tmp, f"{tag}-s1r{i}", 1, suffix)[0])
        walls["eight"].append(sweep_once(tmp, f"{tag}-s8r{i}", 8, suffix)[0])
        print(
            f"  sweep round {i}: 1 task {walls['one'][-1]:.2f}s, 8 tasks {walls['eight'][-1]:.2f}s",
            flush=True,
        )
    one, eight = med(walls["one"]), med(walls["eight"])
    return {
        "sweep_of_1_median_s": one,
        "sweep_of_8_max_parallel_8_median_s": eight,
        "ratio": round(eight / one, 3),
        "target_ratio": 2.0,
        "met": eight / one <= 2.0,
        "samples_s": {k: [round(x, 3) for x in v] for k, v in walls.items()},
    }


def bench_nodes(
    tmp: Path, tag: str, counts: list[int], reps: int, suffix: str = ""
) -> dict[str, object]:
    rent: dict[int, list[float]] = {n: [] for n in counts}
    wall: dict[int, list[float]] = {n: [] for n in counts}
    for i in range(reps):
        for n in counts:
            w, data = launch_once(tmp, f"{tag}-n{n}r{i}", nodes=n, suffix=suffix)
            rent[n].append(float(data["timings_s"]["rent_s"]))
            wall[n].append(w)
            print(
                f"  nodes={n} round {i}: all ready after {rent[n][-1]:.2f}s, launch {w:.2f}s",
                flush=True,
            )
    base = statistics.median(rent[counts[0]])
    out: dict[str, object] = {
        str(n): {
            "all_ready_median_s": med(rent[n]),
            "ratio_to_1": round(statistics.median(rent[n]) / base, 3),
            "launch_wall_median_s": med(wall[n]),
            "all_ready_samples_s": rent[n],
            "launch_wall_samples_s": [round(x, 3) for x in wall[n]],
        }
        for n in counts
    }
    if 8 in rent:
        r8 = statistics.median(rent[8]) / base
        out["target_ratio_8"] = 1.5
        out["met"] = r8 <= 1.5
    return out


def ssh_opts(key: Path, port: int) -> list[str]:
    """Plain OpenSSH options for a pod: its port, the key, no prompts, no host-key pinning."""
    return ["-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR"]  # fmt: skip


def ssh_true_median(key: Path, port: int, n: int = 5) -> float:
    """One plain `ssh root@pod true`: the floor every SSH session pays on this machine."""
    argv = ["ssh", *ssh_opts(key, port), "root@127.0.0.1", "true"]
    walls = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
    return med(walls)


def cli_startup_median(n: int = 5) -> float:
    """`broker launch --help`: Python start-up and the CLI's imports, paid by every launch."""
    walls = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([BROKER, "launch", "--help"], check=True, capture_output=True)
        walls.append(time.perf_counter() - t)
    return med(walls)


def _head() -> str:
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)  # fmt: skip
    return r.stdout.strip()


def _noise_note(r: dict) -> None:
    """Say in the notes when the figures look noisy: the load or the spread of the samples."""
    lv, sw, mn = r["launch_vs_by_hand"], r["sweep_8_vs_1"], r["multinode_bringup"]
    lists = {
        "broker launch": lv["samples"]["broker_launch_s"],
        "by hand": [h["total_s"] for h in lv["samples"]["by_hand_s"]],
        **{f"sweep of {k}": v for k, v in sw["samples_s"].items()},
        **{f"nodes={k} all ready": v["all_ready_samples_s"] for k, v in mn.items()
           if isinstance(v, dict)},
    }  # fmt: skip
    spread = {k: round(max(v) / min(v), 2) for k, v in lists.items() if v and min(v) > 0}
    r["sample_spread_max_over_min"] = spread
    load = max(r["loadavg_start"][0], r["loadavg_end"][0])
    wide = {k: v for k, v in spread.items() if v > 1.3}
    if load > CPUS or wide:
        r["notes"].append(
            f"noisy: 1-minute load average up to {load} on {CPUS} cores (shared machine)"
            + (f"; samples spread more than 1.3x (max/min) in: {', '.join(wide)}" if wide else "")
            + "; ratios near a target can land on either side of it from run to run"
        )


def _dirty() -> list[str]:
    """Modified code under broker/ and bifrost/ when the run starts (the CLI runs the tree)."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "broker", "bifrost"],
                       capture_output=True, text=True)  # fmt: skip
    return [line[3:] for line in r.stdout.splitlines()]


def _write(results: dict[str, object], out: Path) -> None:
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    print("wrote", out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5, help="rounds after a warm-up")
    ap.add_argument("--sweep-reps", type=int, default=3)
    ap.add_argument("--node-reps", type=int, default=3)
    ap.add_argument("--nodes", default="1,2,4,8")
    ap.add_argument(
        "--boot",
        type=float,
        default=3.0,
        help="also run the sweep and bring-up with pods that take this many seconds to "
        "provision (0: skip)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "launch.json"))
    opts = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the simulator's pods log in as root")

    from bifrost.testing.sshd import keygen
    from broker.testing import RunPodSimulator

    tmp = Path(tempfile.mkdtemp(prefix="broker-bench-launch-"))
    tag = f"bl{secrets.token_hex(3)}"
    key = tmp / "id_ed25519"
    keygen(key)
    project(tmp)
    env = {
        "BIFROST_HOME": str(tmp / "bifrost-home"),
        "BROKER_STATE_DIR": str(tmp / "state"),
        "BROKER_CONFIG": str(tmp / "config.toml"),
        "BROKER_ENV_FILE": str(tmp / "no.env"),
        "RUNPOD_API_KEY": KEY,
        "SSH_KEY_PATH": str(key),
        "BROKER_PROVIDERS": "runpod",
    }
    os.environ.update(env)
    # As installed: Python caches compiled modules after the first run (this sandbox may set
    # PYTHONDONTWRITEBYTECODE=1, which would recompile every module in every `broker` process).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    for k in (
        "PRIME_API_KEY",
        "PRIME_INTELLECT_API_KEY",
        "LAMBDA_API_KEY",
        "VAST_API_KEY",
        "BROKER_SSH_HOSTS",
    ):
        os.environ.pop(k, None)
    t_start = time.perf_counter()
    results: dict[str, object] = {
        "commit_start": _head(),
        "uncommitted_code_at_start": _dirty(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "task": {"project_files": 5, "run": RUN, "outputs": ["out"], "query": QUERY},
        "bring_up_task": "nodes: N, run: true, no workdir (nothing pushed), 1 GPU per node",
        "notes": [
            "all pods are sshd processes on this machine, sharing its cores with the broker "
            "process and (on a shared machine) other users: N pods do not add hardware",
            "pods log in as root with shell_rc=False: their sessions skip this machine's "
            "~/.bashrc, as on a stock image (root's here runs `pyenv init`: see "
            "ssh_true_with_this_machines_bashrc_s); broker and the by-hand sequence use the "
            "same pods",
            "by hand: the pod is created and terminated in this (already warm) Python process "
            "through GPUClient, so it pays no interpreter start-up, while every `broker` call "
            "does (see broker_cli_startup_median_s)",
            "machine_busy_fraction counts every process on the machine, not only ours",
        ],
    }
    try:
        with RunPodSimulator(api_key=KEY, shell_rc=False) as sim:
            os.environ["RUNPOD_API_URL"] = sim.url
            from broker import GPUClient

            with GPUClient().create(QUERY, gpu_count=1, ttl="1h", name=f"{tag}-probe") as probe:
                assert probe.ssh is not None
                results["ssh_true_median_s"] = ssh_true_median(key, probe.ssh.port)
            sim.shell_rc = True  # for the record: what this machine's ~/.bashrc costs a session
            with GPUClient().create(QUERY, gpu_count=1, ttl="1h", name=f"{tag}-rc") as probe:
                assert probe.ssh is not None
                results["ssh_true_with_this_machines_bashrc_s"] = ssh_true_median(
                    key, probe.ssh.port
                )
            sim.shell_rc = False
            results["broker_cli_startup_median_s"] = cli_startup_median()
            print(
                "ssh true",
                results["ssh_true_median_s"],
                "broker --help",
                results["broker_cli_startup_median_s"],
                flush=True,
            )
            print("1. launch vs by hand", flush=True)
            results["launch_vs_by_hand"] = bench_launch(tmp, key, tag, opts.reps)
            print("1b. launch through the Python API", flush=True)
            lv = results["launch_vs_by_hand"]
            assert isinstance(lv, dict)
            results["api_launch"] = bench_api(tmp, tag, opts.reps, float(lv["by_hand_median_s"]))
            print("2. sweep of 8 vs 1", flush=True)
            results["sweep_8_vs_1"] = bench_sweep(tmp, tag, opts.sweep_reps)
            print("3. multi-node bring-up", flush=True)
            counts = [int(x) for x in opts.nodes.split(",")]
            results["multinode_bringup"] = bench_nodes(tmp, tag, counts, opts.node_reps)
            if opts.boot > 0:
                # Pods that take time to boot, as real ones do (RunPod: tens of seconds): what
                # the parallel bring-up and sweep are for. CPU work overlaps the waiting.
                sim.provision_delay = opts.boot
                sfx = f" boot {opts.boot:g}s"
                print(f"4. with pods that boot in {opts.boot:g} s", flush=True)
                results["boot_s"] = opts.boot
                results["sweep_8_vs_1_booting"] = bench_sweep(
                    tmp, f"{tag}b", opts.sweep_reps, sfx
                )
                results["multinode_bringup_booting"] = bench_nodes(
                    tmp, f"{tag}b", counts, opts.node_reps, sfx
                )
                sim.provision_delay = 0.0
            leaked = [p.id for p in sim.pods(include_terminated=False)]
            results["pods_left_running"] = leaked
            results["machine_busy_fraction"] = {
                "meaning": "share of all cores busy (every process on the machine) per call",
                **{k: {"median": med(v), "samples": v} for k, v in BUSY.items()},
            }
            results["broker_process_cpu_s"] = {
                "meaning": "CPU seconds of the `broker` process itself (and the rsync/ssh it "
                "ran) per call: the client's own work, without any pod's sshd or sessions",
                **{k: {"median": med(v), "samples": v} for k, v in OWN.items()},
            }
            results["cpu_s_per_call"] = {
                "meaning": "CPU seconds of this script's reaped children during each call: the "
                "`broker` process, plus the sshd (and its sessions) of every pod it terminated",
                **{k: {"median": med(v), "samples": v} for k, v in CPU.items()},
            }
    finally:
        # What the pods (this machine's /root) kept: workspaces, their push state, by-hand dirs.
        for d in [
            *(REMOTE_HOME / ".bifrost" / "workspaces").glob(f"{tag}*"),
            *(REMOTE_HOME / ".bifrost" / "state").glob(f"{tag}*"),
            *(REMOTE_HOME / "bench-hw").glob(f"{tag}*"),
        ]:
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            (REMOTE_HOME / "bench-hw").rmdir()  # only when empty
        shutil.rmtree(tmp, ignore_errors=True)
    results["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    results["commit_end"] = _head()  # differs if the tree changed under the run
    results["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    _noise_note(results)
    _table(results)
    _write(results, Path(opts.out))


def _table(r: dict) -> None:
    lv = r["launch_vs_by_hand"]
    print(f"\n{'measure':<44}{'value':>10}{'target':>10}  met")
    print(f"{'broker launch (median s)':<44}{lv['broker_launch_median_s']:>10.2f}")
    print(f"{'by hand: create+ssh+rsync+terminate (s)':<44}{lv['by_hand_median_s']:>10.2f}")
    print(f"{'  ratio':<44}{lv['ratio']:>10.2f}{'<= 1.5':>10}  {lv['met']}")
    api = r["api_launch"]
    print(f"{'GPUClient().launch (median s) / by hand':<44}"
          f"{api['api_launch_median_s']:>6.2f}/{api['ratio_to_by_hand']:<4.2f}")  # fmt: skip
    for key, title in (("", "instant pods"), ("_booting", f"pods booting {r.get('boot_s')}s")):
        if f"sweep_8_vs_1{key}" in r:
            print(f"-- {title}")
            _table_part(r[f"sweep_8_vs_1{key}"], r[f"multinode_bringup{key}"])


def _table_part(sw: dict, mn: dict) -> None:
    print(f"{'sweep of 1 (median s)':<44}{sw['sweep_of_1_median_s']:>10.2f}")
    print(
        f"{'sweep of 8, --max-parallel 8 (median s)':<44}"
        f"{sw['sweep_of_8_max_parallel_8_median_s']:>10.2f}"
    )
    print(f"{'  ratio':<44}{sw['ratio']:>10.2f}{'<= 2':>10}  {sw['met']}")
    for n, v in mn.items():
        if isinstance(v, dict):
            tgt = "<= 1.5" if n == "8" else ""
            met = str(mn.get("met", "")) if n == "8" else ""
            print(
                f"{f'nodes={n}: all ready (median s) / ratio':<44}"
                f"{v['all_ready_median_s']:>6.2f}/{v['ratio_to_1']:<4.2f}{tgt:>9}  {met}"
            )


if __name__ == "__main__":
    main()
