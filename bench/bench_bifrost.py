"""bifrost benchmarks against a throwaway loopback sshd (run by hand, as root or not).

    uv run python bench/bench_bifrost.py            # writes bench/results/bifrost.json

1. the CLI: `bifrost exec HOST true` (a new process per call, the host's connection holder
   warm) vs a fresh `ssh HOST true` and vs OpenSSH ControlMaster (`ssh -S ctl HOST true`),
   interleaved in rounds; plus `bifrost status` (the asyncio path through the holder)
2. per-command latency of the API on a reused connection vs a fresh `ssh host cmd` each time
3. push of a 2,000-file project vs plain rsync: first time and after a one-file change
4. `exec true` on 32 hosts vs 1 host, against plain asyncssh on the same sshds, with the client's
   and the sshds' CPU time per command (all "hosts" share this machine's cores)

    uv run python bench/bench_bifrost.py --skip-fanout   # 1-3 only
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bifrost import Group, Host
from bifrost.testing import SSHServer, ensure_user


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def sshd_cpu_s(roots: set[int]) -> float:
    """CPU seconds used so far by the sshd processes in ``roots`` and all their descendants
    (per-connection sshd, and the shells they reaped via cutime/cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        procs[int(name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    total = 0
    for pid, (_ppid, cpu) in procs.items():
        p = pid
        while p in procs:
            if p in roots:
                total += cpu
                break
            p = procs[p][0]
    return total / tick


def measured(
    fn: Callable[[], object], repeat: int, commands: int, roots: set[int]
) -> dict[str, float]:
    """Median/min wall per call plus client and sshd CPU per command over ``repeat`` calls."""
    c0, s0 = time.process_time(), sshd_cpu_s(roots)
    walls = timed(fn, repeat)
    c1, s1 = time.process_time(), sshd_cpu_s(roots)
    n = repeat * commands
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "client_cpu_per_cmd_ms": (c1 - c0) / n * 1e3,
        "sshd_cpu_per_cmd_ms": (s1 - s0) / n * 1e3,
    }


def fanout(servers: list[SSHServer]) -> dict[str, object]:
    """`exec true` on 1 vs 32 warm connections: bifrost, plain asyncssh on the same sshds, and
    where the CPU goes (this process vs every sshd process and the shells they start)."""
    import asyncio

    import asyncssh

    from bifrost.transport.ssh import CIPHERS

    roots = {s.proc.pid for s in servers if s.proc is not None}
    hosts = [Host(t, identity_file=s.client_key) for s in servers for t in s.targets()]
    one, many = Group(hosts[:1]), Group(hosts, concurrency=32)
    one.exec("true")
    many.exec("true")  # connect + pin first: we measure commands, not handshakes
    out: dict[str, list[dict[str, float]]] = {
        k: [] for k in ("bifrost_1", "bifrost_32", "asyncssh_1", "asyncssh_32")
    }
    for _ in range(3):  # interleaved rounds: a shared machine's load drifts
        out["bifrost_1"].append(measured(lambda: one.exec("true"), 20, 1, roots))
        out["bifrost_32"].append(measured(lambda: many.exec("true"), 8, 32, roots))

    # Plain asyncssh (same ciphers, no bifrost code) on the same 32 sshds: isolates bifrost.
    async def connect_all() -> list[asyncssh.SSHClientConnection]:
        return list(
            await asyncio.gather(
                *(
                    asyncssh.connect(
                        h.target.host, h.target.port, username=h.target.user,
                        client_keys=list(h.target.identity_files), known_hosts=None,
                        config=None, encryption_algs=list(CIPHERS),
                    )
                    for h in hosts
                )
            )
        )  # fmt: skip

    loop = asyncio.new_event_loop()
    conns = loop.run_until_complete(connect_all())

    def raw(k: int) -> None:
        async def go() -> None:
            await asyncio.gather(*(c.run("true") for c in conns[:k]))

        loop.run_until_complete(go())

    raw(32)
    for _ in range(3):
        out["asyncssh_1"].append(measured(lambda: raw(1), 20, 1, roots))
        out["asyncssh_32"].append(measured(lambda: raw(32), 8, 32, roots))
    for c in conns:
        c.close()
    loop.close()

    summary = {
        key: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        for key, rounds in out.items()
    }
    b1, b32 = summary["bifrost_1"], summary["bifrost_32"]
    a1, a32 = summary["asyncssh_1"], summary["asyncssh_32"]
    cpus = os.cpu_count() or 1
    cpu_32 = 32 * (b32["client_cpu_per_cmd_ms"] + b32["sshd_cpu_per_cmd_ms"]) / 1e3
    # cold: connect + command, as a fresh CLI invocation would
    cold = Group([Host(h.spec, identity_file=h.target.identity_files[0]) for h in hosts])
    t32_cold = timed(lambda: cold.exec("true"), 1)[0]
    for g in (one, many, cold):
        g.close()
    return {
        "exec_true_1_host_s": b1["median_s"],
        "exec_true_32_hosts_s": b32["median_s"],
        "ratio": b32["median_s"] / b1["median_s"],
        "exec_true_32_hosts_cold_connect_s": t32_cold,
        "asyncssh_1_host_s": a1["median_s"],
        "asyncssh_32_hosts_s": a32["median_s"],
        "asyncssh_ratio": a32["median_s"] / a1["median_s"],
        "bifrost_over_asyncssh_32": b32["median_s"] / a32["median_s"],
        "client_cpu_per_cmd_ms": b32["client_cpu_per_cmd_ms"],
        "client_cpu_per_cmd_ms_asyncssh": a32["client_cpu_per_cmd_ms"],
        "sshd_cpu_per_cmd_ms": b32["sshd_cpu_per_cmd_ms"],
        "sshd_cpu_per_cmd_ms_asyncssh": a32["sshd_cpu_per_cmd_ms"],
        "cpu_seconds_per_32_host_round": cpu_32,
        "cpu_bound_32_hosts_s": cpu_32 / cpus,
        "rounds": out,
    }


def _holder_ready(host: Host) -> bool:
    from bifrost import holder
    from bifrost.hostkeys import KnownHosts

    path = holder.socket_path(host.target, host.identity_file, KnownHosts().path)
    return path is not None and holder._connect_sync(path) is not None


def cli_vs_ssh(srv: SSHServer, ssh: list[str], home: str, rounds: int = 6, per: int = 5) -> dict:
    """Median wall time of a whole CLI call (new process each time) against fresh ssh and
    OpenSSH ControlMaster, interleaved so load drift hits all three alike."""
    exe = Path(sys.executable).with_name("bifrost")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "bifrost.cli"]
    key = str(srv.client_key)
    bifrost_exec = [*cli, "exec", "-i", key, srv.target, "true"]
    ctl = f"{home}/cm-%C"
    master = [*ssh[:-1], "-o", "ControlMaster=yes", "-o", f"ControlPath={ctl}",
              "-o", "ControlPersist=120", "-fN", ssh[-1]]  # fmt: skip
    subprocess.run(master, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
    cm = [*ssh[:-1], "-o", "ControlMaster=no", "-o", f"ControlPath={ctl}", ssh[-1], "true"]
    # As installed: Python caches compiled modules after the first run. (This sandbox sets
    # PYTHONDONTWRITEBYTECODE=1, which would recompile bifrost's modules on every call, ~35 ms.)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["BIFROST_HOLD"] = "1"

    def run(argv: list[str]) -> None:
        subprocess.run(argv, check=True, env=env, stdin=subprocess.DEVNULL)

    run(bifrost_exec)  # first call: direct, and starts the holder
    probe = Host(srv.target, identity_file=key)
    deadline = time.monotonic() + 30
    while not _holder_ready(probe) and time.monotonic() < deadline:
        time.sleep(0.1)
    run(bifrost_exec)  # warm-up through the holder
    job = subprocess.run([*cli, "run", "-i", key, srv.target, "true"], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    status = [*cli, "status", "-i", key, srv.target, job]
    times: dict[str, list[float]] = {"bifrost_exec": [], "ssh_fresh": [], "ssh_controlmaster": [],
                                     "bifrost_status": []}  # fmt: skip
    for _ in range(rounds):
        times["bifrost_exec"] += timed(lambda: run(bifrost_exec), per)
        times["ssh_fresh"] += timed(lambda: run([*ssh, "true"]), per)
        times["ssh_controlmaster"] += timed(lambda: run(cm), per)
        times["bifrost_status"] += timed(
            lambda: subprocess.run(status, check=True, env=env, capture_output=True), per
        )
    subprocess.run([*ssh[:-1], "-o", f"ControlPath={ctl}", "-O", "exit", ssh[-1]],
                   capture_output=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        **{f"{k}_median_s": v for k, v in med.items()},
        "ratio_exec_vs_fresh_ssh": med["bifrost_exec"] / med["ssh_fresh"],
        "ratio_exec_vs_controlmaster": med["bifrost_exec"] / med["ssh_controlmaster"],
        "ratio_status_vs_fresh_ssh": med["bifrost_status"] / med["ssh_fresh"],
        "python_startup_median_s": statistics.median(
            timed(lambda: run([sys.executable, "-c", "pass"]), 10)
        ),
        "calls_per_measure": rounds * per,
        "cli": " ".join(cli[-2:] if len(cli) > 1 else [Path(cli[0]).name]),
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-fanout", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bifrost.json"))
    opts = ap.parse_args()
    home = tempfile.mkdtemp(prefix="bifrost-bench-home-")
    os.environ["BIFROST_HOME"] = home
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "python": sys.version.split()[0],
        "loadavg_start": os.getloadavg(),
        "note": "loopback sshd; the login user has a stock Debian ~/.bashrc "
        "(as root, a fresh `bifrost-test` user: root's .bashrc here runs `pyenv init`, "
        "~0.3 s of CPU per SSH session, which would swamp every figure)",
    }
    run_as = ensure_user("bifrost-test") if os.geteuid() == 0 else None
    with SSHServer(run_as=run_as) as srv:
        key = str(srv.client_key)
        kh = Path(home) / "known_hosts"
        ssh = ["ssh", "-p", str(srv.port), "-i", key, "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={kh}",
               f"{srv.user}@127.0.0.1"]  # fmt: skip
        host = Host(srv.target, identity_file=key)
        host.exec("true")  # connect + pin the key
        results["cli"] = cli_vs_ssh(srv, ssh, home)
        print("cli", results["cli"], flush=True)
        reused = timed(lambda: host.exec("true"), 20)
        fresh = timed(lambda: subprocess.run([*ssh, "true"], check=True), 10)
        results["latency"] = {
            "bifrost_reused_median_s": statistics.median(reused),
            "ssh_fresh_median_s": statistics.median(fresh),
            "speedup": statistics.median(fresh) / statistics.median(reused),
        }
        print("latency", results["latency"], flush=True)

        proj = Path(tempfile.mkdtemp(prefix="bifrost-bench-proj-"))
        for i in range(2000):
            d = proj / f"pkg{i % 40}"
            d.mkdir(exist_ok=True)
            (d / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * 50)
        subprocess.run(["git", "init", "-q", str(proj)], check=True)
        files = subprocess.run(
            ["git", "-C", str(proj), "ls-files", "--others", "--exclude-standard", "-z"],
            capture_output=True, check=True,
        ).stdout  # fmt: skip
        rsync_dest = f"{srv.user}@127.0.0.1:bench-plain-rsync/"
        rsync = ["rsync", "-az", "--files-from=-", "--from0", "-e", " ".join(ssh[:-1]),
                 str(proj) + "/", rsync_dest]  # fmt: skip

        def plain() -> None:
            subprocess.run(rsync, input=files, check=True)

        host.exec(
            "rm -rf ~/bench-plain-rsync ~/.bifrost/workspaces/benchproj ~/.bifrost/state/benchproj"
        )
        first_b = timed(lambda: host.push(proj, name="benchproj"), 1)[0]
        first_r = timed(plain, 1)[0]
        again_b_all: list[float] = []
        again_r_all: list[float] = []
        for i in range(5):  # interleaved: one file changed before each pair
            (proj / "pkg0" / "mod0.py").write_text(f"# changed {i}\n")
            again_b_all += timed(lambda: host.push(proj, name="benchproj"), 1)
            (proj / "pkg0" / "mod0.py").write_text(f"# changed again {i}\n")
            again_r_all += timed(plain, 1)
        again_b = statistics.median(again_b_all)
        again_r = statistics.median(again_r_all)
        results["push_2000_files"] = {
            "bifrost_first_s": first_b, "rsync_first_s": first_r, "ratio_first": first_b / first_r,
            "bifrost_one_change_s": again_b, "rsync_one_change_s": again_r,
            "ratio_one_change": again_b / again_r,
        }  # fmt: skip
        print("push", results["push_2000_files"], flush=True)
        host.close()

    if opts.skip_fanout:
        _write(results, Path(opts.out))
        return
    a = SSHServer(run_as=run_as, listen=[f"127.0.0.{i}" for i in range(2, 18)]).start()
    b = SSHServer(run_as=run_as, listen=[f"127.0.0.{i}" for i in range(18, 34)]).start()
    try:
        results["fanout"] = fanout([a, b])
        print("fanout", results["fanout"], flush=True)
    finally:
        a.stop()
        b.stop()
    _write(results, Path(opts.out))


def _write(results: dict[str, object], out: Path) -> None:
    results["loadavg_end"] = os.getloadavg()
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    print("wrote", out)


if __name__ == "__main__":
    main()
