"""bifrost benchmarks against a throwaway loopback sshd (run by hand, as root or not).

    uv run python bench/bench_bifrost.py            # writes bench/results/bifrost.json

1. per-command latency on a reused connection vs a fresh `ssh host cmd` each time
2. push of a 2,000-file project vs plain rsync: first time and after a one-file change
3. `exec true` on 32 hosts vs 1 host
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
from pathlib import Path

from bifrost import Group, Host
from bifrost.testing import SSHServer, ensure_user


def timed(fn, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    home = tempfile.mkdtemp(prefix="bifrost-bench-home-")
    os.environ["BIFROST_HOME"] = home
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "python": sys.version.split()[0],
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
        (proj / "pkg0" / "mod0.py").write_text("# changed\n")
        again_b = statistics.median(timed(lambda: host.push(proj, name="benchproj"), 3))
        again_r = statistics.median(timed(plain, 3))
        results["push_2000_files"] = {
            "bifrost_first_s": first_b, "rsync_first_s": first_r, "ratio_first": first_b / first_r,
            "bifrost_one_change_s": again_b, "rsync_one_change_s": again_r,
            "ratio_one_change": again_b / again_r,
        }  # fmt: skip
        print("push", results["push_2000_files"], flush=True)
        host.close()

    a = SSHServer(run_as=run_as, listen=[f"127.0.0.{i}" for i in range(2, 18)]).start()
    b = SSHServer(run_as=run_as, listen=[f"127.0.0.{i}" for i in range(18, 34)]).start()
    try:
        hosts = [Host(t, identity_file=s.client_key) for s in (a, b) for t in s.targets()]
        one = Group(hosts[:1])
        many = Group(hosts, concurrency=32)
        one.exec("true")
        many.exec("true")  # connect + pin first: we measure commands, not handshakes
        t1 = statistics.median(timed(lambda: one.exec("true"), 5))
        t32 = statistics.median(timed(lambda: many.exec("true"), 5))
        # and cold: connect + command, as a fresh CLI invocation would
        cold = Group([Host(h.spec, identity_file=h.target.identity_files[0]) for h in hosts])
        t32_cold = timed(lambda: cold.exec("true"), 1)[0]
        results["fanout"] = {
            "exec_true_1_host_s": t1, "exec_true_32_hosts_s": t32, "ratio": t32 / t1,
            "exec_true_32_hosts_cold_connect_s": t32_cold,
        }  # fmt: skip
        print("fanout", results["fanout"], flush=True)
        for g in (one, many, cold):
            g.close()
    finally:
        a.stop()
        b.stop()
    out = Path(__file__).parent / "results" / "bifrost.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
