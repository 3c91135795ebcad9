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
