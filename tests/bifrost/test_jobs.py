from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bifrost import Host, JobNotFoundError
from bifrost.testing import SSHServer

from .conftest import CuttableProxy


def _poll(fn, timeout: float = 30.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met before the deadline")


def test_run_status_wait_logs(host: Host) -> None:
    job = host.run("echo start; echo to-stderr >&2; exit 3", name="basic")
    st = job.wait(timeout=30)
    assert (st.state, st.exit_code) == ("failed", 3)
    assert st.started_at and st.ended_at and st.name == "basic"
    assert job.logs() == "start\nto-stderr\n"
    assert job.logs(tail=1) == "to-stderr\n"
    files = host.exec(f"ls ~/.bifrost/jobs/{job.id}").stdout.split()
    for f in [
        "cmd",
        "meta.json",
        "pid",
        "boot_id",
        "log",
        "exit_code",
        "started_at",
        "ended_at",
    ]:
        assert f in files
    assert "env" not in files  # sourced by the wrapper, then deleted (it may hold secrets)
    assert any(s.id == job.id for s in host.jobs())


def test_hostile_names_commands_and_env(host: Host) -> None:
    evil = "'; rm -rf ~; echo '$(touch /tmp/bifrost-pwned)\nnext"
    job = host.run('printf "%s|%s" "$A" "$S"', name=evil, env={"A": evil}, secrets={"S": "$(id)"})
    st = job.wait(timeout=30)
    assert st.state == "succeeded" and st.name == evil
    assert job.logs() == f"{evil}|$(id)"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", job.id)
    assert not Path("/tmp/bifrost-pwned").exists()


def test_invalid_job_id_rejected(host: Host) -> None:
    from bifrost import JobError

    with pytest.raises(JobError, match="invalid job id"):
        host.job("../../etc; rm -rf ~")
    with pytest.raises(JobNotFoundError):
        host.job("does-not-exist").status()


def test_kill_cancels_the_whole_group(host: Host) -> None:
    marker = f"bf-kill-{time.monotonic_ns()}"
    job = host.run(f"bash -c 'sleep 301; echo {marker}' & sleep 300; wait")
    _poll(lambda: host.exec(f"pgrep -f '[s]leep 301; echo {marker}'", warn=True).ok)
    assert job.status().state == "running"
    assert job.kill(grace=2) == "cancelled"
    st = job.status()
    assert st.state == "cancelled"
    assert not host.exec(f"pgrep -f '[s]leep 301; echo {marker}'", warn=True).ok


def test_died_when_the_wrapper_vanishes(host: Host) -> None:
    job = host.run("sleep 300")
    pid = job.status().pid
    host.exec(f"kill -KILL -- -{pid}")
    assert _poll(lambda: job.status().state == "died")


def test_lost_after_reboot(host: Host) -> None:
    job = host.run("sleep 300")
    host.exec(f"echo another-boot > ~/.bifrost/jobs/{job.id}/boot_id")
    assert job.status().state == "lost"
    host.exec(f"kill -KILL -- -{job.status().pid}")


def test_follow_across_forced_disconnect(sshd: SSHServer, proxy: CuttableProxy) -> None:
    n = 60
    # One line per tick; a multi-byte character and a \r progress update in the middle.
    cmd = (
        f"for i in $(seq 1 {n}); do printf 'line %s ✓\\n' $i; "
        "if [ $i = 20 ]; then printf '50%%\\r100%%\\n'; fi; sleep 0.05; done"
    )
    with Host(f"{sshd.user}@127.0.0.1:{proxy.port}", identity_file=sshd.client_key) as h:
        job = h.run(cmd)
        seen: list[str] = []
        cut_done: list[bool] = []

        def on_line(line: str) -> None:
            seen.append(line)
            if len(seen) == 10 and not cut_done:
                cut_done.append(True)
                proxy.cut()

        st = job.follow(on_line)
    assert cut_done and proxy.connections >= 2
    expected = [f"line {i} ✓" for i in range(1, 21)] + ["50%", "100%"]
    expected += [f"line {i} ✓" for i in range(21, n + 1)]
    assert seen == expected
    assert st.state == "succeeded"


def test_job_survives_client_sigkill(sshd: SSHServer, bifrost_home: Path) -> None:
    env = {**os.environ, "BIFROST_HOME": str(bifrost_home)}
    cmd = "echo before; while [ ! -e go ]; do sleep 0.05; done; echo after; exit 3"
    client = subprocess.Popen(
        [sys.executable, "-m", "bifrost.cli", "run", sshd.target, "-i", str(sshd.client_key),
         "--follow", "--cwd", "/tmp", "--", cmd],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert client.stdout is not None
    job_id = client.stdout.readline().decode().strip()
    assert job_id, client.stderr.read() if client.stderr else ""
    assert client.stdout.readline().decode().strip() == "before"
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    with Host(sshd.target, identity_file=sshd.client_key) as h:
        job = h.job(job_id)
        assert job.status().state == "running"
        h.exec("touch /tmp/go")
        try:
            st = job.wait(timeout=30)
        finally:
            h.exec("rm -f /tmp/go")
        assert (st.state, st.exit_code) == ("failed", 3)
        assert job.logs() == "before\nafter\n"


def test_local_target_jobs(local_home: Path) -> None:
    with Host("local") as h:
        job = h.run("echo hi from local; exit 0", env={"X": "y"})
        st = job.wait(timeout=30)
        assert st.state == "succeeded"
        assert job.logs() == "hi from local\n"
        assert (local_home / ".bifrost" / "jobs" / job.id / "exit_code").read_text() == "0\n"


def test_pull_job_results(host: Host, tmp_path: Path) -> None:
    job = host.run(
        "mkdir -p out/sub && echo 1 > out/a.txt && echo 2 > out/sub/b.txt && echo done",
        cwd="/tmp", outputs=["out"], secrets={"K": "v"},
    )  # fmt: skip
    job.wait(timeout=30)
    dest = job.pull_results(tmp_path)
    assert (dest / "job" / "log").read_text() == "done\n"
    assert (dest / "job" / "exit_code").read_text() == "0\n"
    assert not (dest / "job" / "env").exists()
    assert (dest / "outputs" / "out" / "sub" / "b.txt").read_text() == "2\n"


def test_job_index_survives_concurrent_starters(tmp_path: Path) -> None:
    """Many processes recording jobs at once (a sweep's workers) lose no entry and never fail."""
    env = {**os.environ, "BIFROST_HOME": str(tmp_path)}
    code = (
        "import sys; from bifrost.jobs import _remember\n"
        "for i in range(40): _remember(f'job-{sys.argv[1]}-{i}', 'root@h:' + sys.argv[1])\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(n)], env=env, stderr=subprocess.PIPE)
        for n in range(4)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0 and not err, err
    import json

    index = json.loads((tmp_path / "jobs.json").read_text())
    assert len(index) == 160 and index["job-3-39"] == "root@h:3"
    assert not list(tmp_path.glob("*.tmp"))


def test_wait_timeout_on_a_running_job(host: Host, sshd: SSHServer, bifrost_home: Path) -> None:
    from bifrost import JobTimeout

    job = host.run("sleep 300")
    try:
        started = time.monotonic()
        with pytest.raises(JobTimeout, match="still running"):
            job.wait(timeout=0.5)
        assert time.monotonic() - started < 10
        env = {**os.environ, "BIFROST_HOME": str(bifrost_home)}
        r = subprocess.run(
            [sys.executable, "-m", "bifrost.cli", "wait", "--timeout", "1",
             "-i", str(sshd.client_key), sshd.target, job.id],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert r.returncode == 124, r.stderr
        assert "still running" in r.stderr and "Traceback" not in r.stderr
    finally:
        job.kill(grace=0.5)


def test_pull_results_twice_never_copies_env(host: Host, tmp_path: Path) -> None:
    job = host.run("echo done", cwd="/tmp", secrets={"MYSEC": "hush-hush"})
    job.wait(timeout=30)
    # Whatever the wrapper did with it, an env file holding a secret must never come back.
    host.exec(f"printf 'export MYSEC=hush-hush\\n' > ~/.bifrost/jobs/{job.id}/env")
    first = job.pull_results(tmp_path / "res")
    host.exec(f"echo again >> ~/.bifrost/jobs/{job.id}/log")
    second = job.pull_results(tmp_path / "res")
    assert first == second == tmp_path / "res" / job.id
    assert (second / "job" / "log").read_text() == "done\nagain\n"
    assert not (second / "job" / "job").exists()
    for p in (tmp_path / "res").rglob("*"):
        assert p.name != "env"
        assert not p.is_file() or b"hush-hush" not in p.read_bytes(), p


def test_follow_with_tail_keeps_an_unfinished_last_line_whole(host: Host) -> None:
    gate = f"/tmp/bf-tail-gate-{time.monotonic_ns()}"
    # 'é' is split across the wait: its first byte is written before, its second after.
    job = host.run(
        f"printf 'first\\n'; printf 'abc\\303'; while [ ! -e {gate} ]; do sleep 0.05; done; "
        "printf '\\251def\\n'; printf 'last\\n'"
    )
    try:
        _poll(lambda: host.exec(f"cat ~/.bifrost/jobs/{job.id}/log").stdout.startswith("first"))
        _poll(lambda: "abc" in host.exec(f"cat ~/.bifrost/jobs/{job.id}/log").stdout)
        seen: list[str] = []

        def on_line(line: str) -> None:
            seen.append(line)
            if line == "first":
                Path(gate).touch()  # the sshd is on this machine (and this runs on bifrost's loop)

        st = job.follow(on_line, tail=1)
    finally:
        Path(gate).unlink(missing_ok=True)
    assert st.state == "succeeded"
    assert seen == ["first", "abcédef", "last"]
    assert job.logs(tail=2) == "abcédef\nlast\n"


def test_tail_edge_cases(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    from bifrost import JobError
    from bifrost.cli import main

    job = host.run("printf 'one\\ntwo\\nthree'")
    job.wait(timeout=30)
    assert job.logs(tail=2) == "two\nthree\n"
    assert job.logs(tail=0) == ""
    with pytest.raises(ValueError, match="tail"):
        job.logs(tail=-3)
    key = str(host.target.identity_files[0])
    for bad in ["--tail=-3", "--tail=99999999999999999999"]:
        assert main(["logs", bad, "-i", key, str(host.target), job.id]) == 2
        assert "--tail" in capsys.readouterr().err
    host.exec(f"rm ~/.bifrost/jobs/{job.id}/log")
    with pytest.raises(JobError, match="no log"):
        job.logs(tail=1)
    with pytest.raises(JobError, match="cannot read the log"):
        job.logs()


def test_job_env_file_with_secrets_is_deleted_after_launch(host: Host) -> None:
    job = host.run('[ "${#MYSEC}" = 13 ] && echo got-it', secrets={"MYSEC": "launch-secret"})
    assert job.wait(timeout=30).state == "succeeded"
    assert job.logs() == "got-it\n"
    d = f"~/.bifrost/jobs/{job.id}"
    assert "env" not in host.exec(f"ls -A {d}").stdout.split()
    assert host.exec(f"grep -rl launch-secret {d}", warn=True).stdout == ""


def _follow_bounded(job, seconds: float = 30.0):  # type: ignore[no-untyped-def]
    """Job.afollow with a deadline: a follow that never ends fails the test instead of hanging."""
    import asyncio

    from bifrost._loop import run_sync

    lines: list[str] = []
    return run_sync(asyncio.wait_for(job.afollow(lines.append), seconds)), lines


def test_follow_ends_on_a_lost_job(host: Host) -> None:
    job = host.run("echo up; sleep 300")
    _poll(lambda: job.logs() == "up\n")
    host.exec(f"echo another-boot > ~/.bifrost/jobs/{job.id}/boot_id")  # as after a reboot
    try:
        st, lines = _follow_bounded(job)
        assert (st.state, lines) == ("lost", ["up"])
    finally:
        host.exec(f"kill -KILL -- -{job.status().pid}", warn=True)


def test_follow_ends_when_the_pid_was_reused(host: Host) -> None:
    """The wrapper died and its pid now belongs to another live process (pid 1 here: as root
    `kill -0 1` succeeds, so `tail --pid` would follow forever)."""
    job = host.run("sleep 300")
    pid = job.status().pid
    host.exec(f"kill -KILL -- -{pid}; echo 1 > ~/.bifrost/jobs/{job.id}/pid")
    st, _ = _follow_bounded(job)
    assert st.state == "died"


def test_cut_launch_starts_nothing(host: Host) -> None:
    """A launch request cut anywhere (here: inside the command) is refused whole by the box:
    bash would otherwise run the part of the heredoc that arrived."""
    from bifrost._loop import run_sync
    from bifrost.exec import capture
    from bifrost.jobs import launch_script, new_job_id

    marker = f"/tmp/bf-cut-{time.monotonic_ns()}"
    job_id = new_job_id("cut")
    fields = {"id": job_id, "cmd": f"echo partial > {marker}; echo whole >> {marker}",
              "meta": "{}", "cwd": "~", "venv": "", "env": ""}  # fmt: skip
    script = launch_script(fields)
    cmd_at = script.index(b"\ncmd ") + 5
    for cut in (cmd_at + 20, cmd_at + 40, script.index(b"\nsum ") + 30):
        r = run_sync(
            capture(host._transport or host.connect()._transport,  # type: ignore[union-attr]
                    "bash --norc --noprofile -s --", stdin=script[:cut])
        )  # fmt: skip
        assert "BIFROST_STARTED" not in r.stdout, cut
        assert not host.exec(f"test -e ~/.bifrost/jobs/{job_id} || test -e {marker}", warn=True).ok
    r = run_sync(capture(host._transport, "bash --norc --noprofile -s --", stdin=script))  # type: ignore[arg-type]
    assert "BIFROST_STARTED" in r.stdout
    host.job(job_id).wait(timeout=30)
    assert host.exec(f"cat {marker}; rm -f {marker}").stdout == "partial\nwhole\n"


def test_job_dir_and_log_are_private(host: Host) -> None:
    job = host.run("echo hi > out.txt", cwd="/tmp")
    job.wait(timeout=30)
    modes = host.exec(
        f"stat -c '%a %n' ~/.bifrost/jobs ~/.bifrost/jobs/{job.id} ~/.bifrost/jobs/{job.id}/log "
        f"~/.bifrost/jobs/{job.id}/cmd /tmp/out.txt; rm -f /tmp/out.txt"
    ).stdout.split("\n")
    assert [m.split()[0] for m in modes if m] == ["700", "700", "600", "600", "644"]
