"""Issue 16: no path leaves a box billing untracked, and broker never destroys what is not its own.

Against the RunPod simulator (real HTTP, pods that are real sshd), with the real ``broker`` CLI as
a subprocess where the defect is about processes (signals), typer's runner elsewhere.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker import GPUClient, load_settings
from broker.cli import app
from broker.errors import AmbiguousCreateError, BudgetExceededError, ProvisionError
from broker.journal import Journal
from broker.testing import RunPodSimulator
from broker.types import utcnow

KEY = "sim-test-key-0123456789"  # the conftest simulator's key
DEPLOY = "podFindAndDeployOnDemand"
BROKER = str(Path(sys.executable).parent / "broker")
runner = CliRunner()

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="simulated pods log in as root only when the tests run as root"
)


def live_pods(sim: RunPodSimulator) -> list[str]:
    return [p.id for p in sim.pods(include_terminated=False)]


def journal() -> Journal:
    return Journal.default(load_settings().state_dir)


def backdate_sent(name: str, by: timedelta) -> None:
    """Pretend the create was sent ``by`` ago (no test waits 15 minutes)."""
    with sqlite3.connect(load_settings().state_dir / "journal.sqlite") as db:
        old = (utcnow() - by).isoformat()
        db.execute(
            "UPDATE instances SET sent_at = ?, updated_at = ? WHERE name = ?", (old, old, name)
        )


# -- 16.3 SIGTERM / SIGHUP ------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_during_create_terminates_the_box(
    env: RunPodSimulator, sig: signal.Signals, tmp_path: Path
) -> None:
    env.slow_start(60)  # the pod exists and bills, readiness waits for its sshd
    log = tmp_path / "create.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [BROKER, "create", "gpu~4090", "-n", "1", "--ttl", "1h", "-y"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
        try:
            env.wait_for(lambda: bool(live_pods(env)), timeout=60)
            with journal() as j:
                env.wait_for(lambda: any(e.instance_id for e in j.open_entries()), timeout=30)
            proc.send_signal(sig)
            code = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 128 + sig, log.read_text()
    assert "interrupted" in log.read_text() and "Traceback" not in log.read_text()
    assert live_pods(env) == []  # terminated, not left billing
    with journal() as j:
        assert not j.open_entries()


# -- 16.1 + 16.9 a pod that appears after the client gave up -------------------------------------


def test_late_pod_stays_pending_and_is_terminated_when_it_appears(env: RunPodSimulator) -> None:
    env.late_deploy(1, mode="drop")  # the answer is lost; the pod appears only on release
    with GPUClient(budget=50.0) as c:
        with pytest.raises(ProvisionError) as e:
            c.create("gpu~4090 !spot", gpu_count=1, ttl="1h", wait=False, detach=True)
        assert isinstance(e.value.__cause__, AmbiguousCreateError)
        (name,) = e.value.abandoned
        assert env.operations().count(DEPLOY) == 1  # never a second box
        assert c.journal.committed_spend() > 0.3  # pending, so counted in the budget

    # reconcile before the pod appears: pending, not a ghost; nothing to fix
    r = runner.invoke(app, ["instances", "reconcile", "-y", "--json"])
    assert r.exit_code == 0, r.output
    assert [(f["kind"], f["name"]) for f in json.loads(r.stdout)["findings"]] == [("pending", name)]
    with journal() as j:
        entry = j.get(name)
        assert entry is not None and entry.is_open and entry.state == "sent"
    listed = runner.invoke(app, ["instances", "list"])
    assert "pending" in listed.stdout

    # the provider acts late: the next broker command that sees it terminates it
    (pod_id,) = env.release_late()
    assert live_pods(env) == [pod_id]
    r = runner.invoke(app, ["instances", "list", "--json"])
    assert r.exit_code == 0, r.output
    assert f"reaped {name}" in r.stderr
    assert live_pods(env) == []
    with journal() as j:
        entry = j.get(name)
        assert entry is not None and not entry.is_open and entry.instance_id == pod_id


def test_unanswered_create_never_listed_is_closed_after_the_grace_period(
    env: RunPodSimulator,
) -> None:
    env.late_deploy(1, mode="504")
    with GPUClient() as c, pytest.raises(ProvisionError) as e:
        c.create("gpu~4090 !spot", gpu_count=1, ttl="1h", wait=False, detach=True)
    (name,) = e.value.abandoned
    dry = runner.invoke(app, ["instances", "reconcile", "--dry-run"])
    assert dry.exit_code == 0 and "pending" in dry.stdout  # nothing to fix yet
    backdate_sent(name, timedelta(minutes=16))  # past the documented 15 minutes
    with GPUClient() as c:  # reconcile's own verdict (the CLI's auto-reap would close it first)
        (finding,) = c.reconcile().findings
        assert (finding.kind, finding.name) == ("ghost", name)
    r = runner.invoke(app, ["instances", "reconcile", "-y", "--json"])
    assert r.exit_code == 0, r.output
    with journal() as j:
        assert not j.open_entries()
        assert any("not listed" in (d or "") for _, _, d in j.events(name))


# -- 16.2 another journal's pods --------------------------------------------------------------


def test_reconcile_leaves_another_journals_pods_alone(
    env: RunPodSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with GPUClient() as c:  # a colleague's live 6 h box, from their own state dir
        theirs = c.create("gpu~4090 !spot", gpu_count=1, ttl="6h", wait=False, detach=True)
    monkeypatch.setenv("BROKER_STATE_DIR", str(tmp_path / "my-state"))
    r = runner.invoke(app, ["instances", "reconcile", "-y", "--json"])
    assert r.exit_code == 0, r.output
    (finding,) = json.loads(r.stdout)["findings"]
    assert (finding["kind"], finding["name"]) == ("foreign", theirs.name)
    assert live_pods(env) == [theirs.instance_id]
    dry = runner.invoke(app, ["instances", "reconcile", "--dry-run"])
    assert dry.exit_code == 0 and "--include-foreign" in dry.stderr
    r = runner.invoke(app, ["instances", "reconcile", "-y", "--include-foreign"])
    assert r.exit_code == 0, r.output
    assert live_pods(env) == []


# -- 16.4 a budget bounds spend without a TTL -----------------------------------------------------


def test_budget_gives_every_create_a_ttl_that_fits(
    env: RunPodSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RunPodSimulator(api_key=KEY) as own:  # its clock is moved on: not the shared one
        monkeypatch.setenv("RUNPOD_API_URL", own.url)
        _budget_scenario(own)


def _budget_scenario(env: RunPodSimulator) -> None:
    price = 0.34  # RTX 4090, community, on-demand
    with GPUClient(budget=1.0) as c:
        first = c.create("gpu~4090 !spot", gpu_count=1, wait=False, detach=True)
        assert first.extra["ttl_from_budget"] and first.extra["ttl_enforced_by"] == "provider"
        ttl = first.extra["ttl_seconds"]
        assert abs(ttl - 1.0 / price * 3600) < 60
        (deploy,) = [r for r in env.requests if r.operation == DEPLOY]
        assert "terminateAfter" in deploy.variables["input"]  # the provider enforces it
        with pytest.raises(BudgetExceededError):
            c.create("gpu~4090 !spot", gpu_count=1, wait=False, detach=True)
    # Even if no broker command ever runs again, the provider ends it within the budget.
    env.advance(ttl + 60)
    env.wait_for(lambda: not live_pods(env), timeout=10)
    assert env.pod(first.instance_id).terminated_by == "terminateAfter"


def test_create_states_the_budget_ttl_and_who_enforces_it(
    env: RunPodSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_BUDGET", "2")
    r = runner.invoke(app, ["create", "gpu~4090", "-n", "1", "--no-wait", "-y"])
    assert r.exit_code == 0, r.output
    assert "the budget" in r.stderr  # in what it asks before renting
    assert "(set by the budget)" in r.stdout and "the provider terminates it" in r.stdout


# -- 16.5 terminate journaled before the provider call --------------------------------------------


def test_failed_terminate_shows_as_terminating_and_reap_finishes_it(
    env: RunPodSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with GPUClient() as c:
        inst = c.create("gpu~4090 !spot", gpu_count=1, wait=False, detach=True)
    env.fail_terminate(None)
    r = runner.invoke(app, ["terminate", inst.name or "", "-y"])
    assert r.exit_code == 1
    monkeypatch.setenv("BROKER_NO_AUTO_REAP", "1")
    (row,) = json.loads(runner.invoke(app, ["instances", "list", "--json"]).stdout)
    assert (row["status"], row["state"]) == ("terminating", "terminating")
    assert live_pods(env) == [inst.instance_id]  # still billing: nobody may forget it
    env.clear_faults()
    r = runner.invoke(app, ["instances", "reap", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"name": inst.name, "ok": True, "error": None}]
    assert live_pods(env) == []
    with journal() as j:
        assert not j.open_entries()


# -- 16.6 failover stops at an unconfirmed cleanup ------------------------------------------------


def test_failover_stops_and_reports_the_box_whose_cleanup_failed(env: RunPodSimulator) -> None:
    env.ssh_never_up(1, mode="refuse")
    env.fail_terminate(None)
    r = runner.invoke(
        app, ["create", "gpu~4090", "-n", "1", "-y", "--json", "--ready-timeout", "2"]
    )
    assert r.exit_code == 3, r.output
    data = json.loads(r.stdout)
    assert data["ok"] is False and len(data["abandoned"]) == 1
    assert env.operations().count(DEPLOY) == 1  # no second box
    env.clear_faults()
    assert runner.invoke(app, ["instances", "reap"]).exit_code == 0
    assert live_pods(env) == []


# -- 16.8 provider-terminated boxes ---------------------------------------------------------------


def test_list_shows_a_provider_terminated_box_as_gone(
    env: RunPodSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKER_NO_AUTO_REAP", "1")
    with GPUClient() as c:
        inst = c.create("gpu~4090 !spot", gpu_count=1, ttl="1h", detach=True)
    env.terminate_pod(inst.instance_id)  # console terminate: RunPod then forgets the pod
    r = runner.invoke(app, ["instances", "list"])
    assert r.exit_code == 0 and "0 open, $0.00/h" not in r.stdout
    assert "no instances" in r.stdout
    (row,) = json.loads(runner.invoke(app, ["instances", "list", "--all", "--json"]).stdout)
    assert row["status"] == "terminated" and row["ttl_left_s"] is None


# -- 19.1 / 19.2 / 19.4 ---------------------------------------------------------------------------


def test_paid_create_needs_yes_when_not_a_terminal(env: RunPodSimulator) -> None:
    r = runner.invoke(app, ["create", "gpu~4090", "-n", "1"])
    assert r.exit_code == 2
    assert "pass -y" in r.stderr and "will rent" in r.stderr and "on-demand" in r.stderr
    assert "no TTL" in r.stderr
    assert DEPLOY not in env.operations()


def test_create_prints_stage_lines_and_a_bifrost_hint_that_works(
    env: RunPodSimulator, user_key: Path
) -> None:
    r = runner.invoke(app, ["create", "gpu~4090", "-n", "1", "--ttl", "1h", "-y"])
    assert r.exit_code == 0, r.output
    for stage in ("provider", "tcp", "login", "probe"):
        assert sum(line.startswith(f"{stage}:") for line in r.stderr.splitlines()) == 1
    assert "TTL 1h00m" in r.stderr and "on-demand" in r.stdout
    (hint,) = [ln for ln in r.stdout.splitlines() if ln.startswith("bifrost:")]
    argv = shlex.split(hint.removeprefix("bifrost:"))
    assert argv[:3] == ["bifrost", "exec", "-i"] and argv[3] == str(user_key)
    argv[0] = str(Path(sys.executable).parent / "bifrost")
    clean = {k: v for k, v in os.environ.items() if k not in ("SSH_KEY_PATH",)}
    ran = subprocess.run(argv, capture_output=True, text=True, env=clean, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "RTX 4090" in ran.stdout
    name = next(ln.split()[-1] for ln in r.stdout.splitlines() if ln.startswith("stop it:"))
    ssh = runner.invoke(app, ["instances", "ssh", name, "--json"])
    assert ssh.exit_code == 0, ssh.output
    assert json.loads(ssh.stdout)["ssh_command"].startswith("ssh -p")
