from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bifrost import Group, Host
from bifrost.testing import SSHServer


def test_fanout_20_hosts(sshd_many: list[SSHServer], capsys: pytest.CaptureFixture[str]) -> None:
    hosts = [Host(t, identity_file=s.client_key) for s in sshd_many for t in s.targets()]
    targets = [h.spec for h in hosts]
    assert len(targets) == 20
    with Group(hosts, concurrency=8) as g:
        outcomes = g.exec(
            'echo "$SSH_CONNECTION" | cut -d" " -f3; [ "${SSH_CONNECTION##* 127.0.0.5 *}" ] || exit 9',
            echo=True,
        )
        statuses = g.status()
    assert [o.host for o in outcomes] == targets
    for o, t in zip(outcomes, targets, strict=True):
        addr = t.split("@")[1].rsplit(":", 1)[0]
        assert o.value is not None and o.value.stdout.strip() == addr
    bad = [o for o in outcomes if not o.ok]
    assert [o.host.split("@")[1].split(":")[0] for o in bad] == ["127.0.0.5"]
    assert bad[0].value is not None and bad[0].value.exit_code == 9
    printed = capsys.readouterr().out.splitlines()
    assert f"[{targets[0]}] 127.0.0.2" in printed and len(printed) == 20
    assert all(o.ok for o in statuses)


def test_cli_fanout_exit_code_and_json(sshd_many: list[SSHServer], bifrost_home: object) -> None:
    hosts = ",".join(sshd_many[0].targets()[:5])
    base = [sys.executable, "-m", "bifrost.cli", "exec", "-i", str(sshd_many[0].client_key)]
    ok = subprocess.run(
        [*base, hosts, "hostname >/dev/null; echo ok"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert len([ln for ln in ok.stdout.splitlines() if ln.endswith("] ok")]) == 5
    failing = subprocess.run(
        [*base, "--json", hosts, 'case "$SSH_CONNECTION" in *127.0.0.3*) exit 4;; esac'],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failing.returncode == 1
    rows = json.loads(failing.stdout)
    assert [r["ok"] for r in rows] == [True, False, True, True, True]
    assert rows[1]["result"]["exit_code"] == 4


def test_cli_fanout_passes_secret_env_and_merge(sshd_many: list[SSHServer]) -> None:
    import os

    hosts = ",".join(sshd_many[0].targets()[:2])
    env = {**os.environ, "MYSEC": "fan-out-secret"}
    base = [sys.executable, "-m", "bifrost.cli", "exec", "-i", str(sshd_many[0].client_key)]
    r = subprocess.run(
        [*base, "--json", "--secret-env", "MYSEC", "--merge", hosts,
         'printf "%s\\n" "$MYSEC"; echo to-stderr >&2'],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for row in json.loads(r.stdout):
        assert row["result"]["stdout"] == "fan-out-secret\nto-stderr\n"
        assert row["result"]["stderr"] == ""


def test_cli_fanout_failure_shows_the_exit_code(sshd_many: list[SSHServer]) -> None:
    hosts = ",".join(sshd_many[0].targets()[:2])
    base = [sys.executable, "-m", "bifrost.cli", "exec", "-i", str(sshd_many[0].client_key)]
    r = subprocess.run([*base, hosts, "exit 3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "FAILED: exit 3" in r.stderr and "None" not in r.stderr
    r = subprocess.run(
        [*base, "--json", hosts, "exit 3"], capture_output=True, text=True, timeout=120
    )
    assert [row["error"] for row in json.loads(r.stdout)] == ["exit 3", "exit 3"]


def test_cli_run_follow_on_several_hosts_is_refused(sshd_many: list[SSHServer]) -> None:
    from bifrost.cli import main

    hosts = ",".join(sshd_many[0].targets()[:2])
    assert main(["run", "-f", "-i", str(sshd_many[0].client_key), hosts, "--", "true"]) == 2
