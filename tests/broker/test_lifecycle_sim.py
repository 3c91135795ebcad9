"""The lifecycle end to end against the RunPod simulator: real HTTP, pods that are real sshd.

Covers: create → ready → exec → terminate; failover past capacity errors; SSH that never comes
up; SIGKILL of the client at each step of a create followed by `broker instances reconcile`
(zero leaks); provider-side TTL; budget refusal; ghosts; concurrent broker processes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from broker import GPUClient, load_settings
from broker.cli import app
from broker.errors import BudgetExceededError, ProviderUnavailableError, ProvisionError
from broker.journal import AMBIGUOUS_GRACE_S, Journal
from broker.testing import RunPodSimulator
from broker.types import utcnow

KEY = "sim-test-key-0123456789"  # the conftest simulator's key
DEPLOY = "podFindAndDeployOnDemand"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="simulated pods log in as root only when the tests run as root"
)


def live_pods(sim: RunPodSimulator) -> list[str]:
    return [p.id for p in sim.pods(include_terminated=False)]


def test_create_ready_exec_terminate(env: RunPodSimulator) -> None:
    stages: list[str] = []
    with GPUClient() as c:
        with c.create(
            "gpu~A100 !spot", gpu_count=2, ttl="2h", on_progress=lambda s, d: stages.append(s)
        ) as inst:
            assert inst.status.value == "running" and inst.ssh is not None
            res = inst.host().exec("nvidia-smi -L")
            assert res.stdout.count("A100") == 2
            pod = env.pod(inst.instance_id)
            assert pod.name == inst.name and pod.ssh_running
        assert live_pods(env) == []
        assert not env.pod(inst.instance_id).ssh_running
        entry = c.journal.get(inst.name or "")
        assert entry is not None and entry.status == "terminated"
    for s in ("provider", "tcp", "login", "probe", "ready"):
        assert s in stages
    (deploy,) = [r for r in env.requests if r.operation == DEPLOY]
    assert deploy.variables["input"]["name"] == inst.name
    assert "terminateAfter" in deploy.variables["input"]  # the provider enforces the TTL too


def test_failover_when_the_first_two_offers_have_no_capacity(env: RunPodSimulator) -> None:
    env.fail_capacity(2)
    with GPUClient() as c:
        offers = c.search("!spot", gpu_count=1).offers
        assert len(offers) >= 3
        with c.create(offers) as inst:
            attempts = inst.extra["attempts"]
            assert [a["error_type"] for a in attempts] == [
                "NoCapacityError",
                "NoCapacityError",
                None,
            ]
            assert inst.offer is not None and inst.offer.key == offers[2].key
        cooling = c.journal.cooling()
        assert offers[0].key in cooling and offers[1].key in cooling
    assert live_pods(env) == []


@pytest.mark.parametrize(("mode", "stage"), [("refuse", "tcp"), ("noauth", "login")])
def test_ssh_never_coming_up_terminates_the_instance(
    env: RunPodSimulator, mode: str, stage: str
) -> None:
    env.ssh_never_up(1, mode=mode)  # type: ignore[arg-type]
    with GPUClient() as c, pytest.raises(ProvisionError) as e:
        c.create("gpu~H100 !spot", gpu_count=1, n_offers=1, ready_timeout=4)
    (attempt,) = e.value.attempts
    assert attempt.error_type == "ReadinessError"
    assert f"stage '{stage}'" in (attempt.error or "")
    assert live_pods(env) == []
    with Journal.default(load_settings().state_dir) as j:
        assert not j.open_entries()


def test_a_hung_nvidia_smi_fails_the_probe_within_the_deadline(env: RunPodSimulator) -> None:
    """A wedged driver (nvidia-smi never answers) is a box without a usable GPU: the probe gives
    up at the readiness deadline, the box is terminated, nothing is left open."""
    import time

    env.wedge_gpus(1)
    t = time.monotonic()
    with GPUClient() as c, pytest.raises(ProvisionError) as e:
        c.create("gpu~H100 !spot", gpu_count=1, n_offers=1, ready_timeout=4)
    assert time.monotonic() - t < 20  # not a hang: the deadline holds
    (attempt,) = e.value.attempts
    assert attempt.error_type == "ReadinessError"
    assert "stage 'probe'" in (attempt.error or "")
    assert "nvidia-smi did not answer within" in (attempt.error or "")
    assert live_pods(env) == []
    with Journal.default(load_settings().state_dir) as j:
        assert not j.open_entries()


def test_budget_refusal_sends_no_create(env: RunPodSimulator) -> None:
    with GPUClient(budget=1.0) as c, pytest.raises(BudgetExceededError) as e:
        c.create("gpu~H100 !spot", gpu_count=1, ttl="3h", wait=False)
    assert "budget $1.00" in str(e.value)
    assert DEPLOY not in env.operations()


def test_provider_ttl_then_reconcile_closes_the_ghost(env: RunPodSimulator) -> None:
    with GPUClient() as c:
        inst = c.create("gpu~4090 !spot", gpu_count=1, ttl="1m", wait=False, detach=True)
        env.advance(120)  # the provider's clock passes terminateAfter
        env.wait_for(lambda: not live_pods(env), timeout=5)
        assert env.pod(inst.instance_id).terminated_by == "terminateAfter"
    r = CliRunner().invoke(app, ["instances", "reconcile", "-y", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [(f["kind"], f["name"]) for f in data["findings"]] == [("ghost", inst.name)]
    with Journal.default(load_settings().state_dir) as j:
        assert not j.open_entries()


def test_terminate_with_the_api_down_keeps_the_entry_then_succeeds(env: RunPodSimulator) -> None:
    with GPUClient() as c:
        inst = c.create("gpu~4090 !spot", gpu_count=1, wait=False, detach=True)
    env.fail_terminate(None)
    r = CliRunner().invoke(app, ["terminate", inst.name or "", "-y"])
    assert r.exit_code == 1 and "HTTP 503" in r.stderr
    assert live_pods(env) == [inst.instance_id]
    env.clear_faults()
    r = CliRunner().invoke(app, ["terminate", "--all", "-y"])
    assert r.exit_code == 0, r.output
    assert live_pods(env) == []


# -- SIGKILL at each step of create, then reconcile -----------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import broker.lifecycle as lc
    from broker import GPUClient
    from broker.providers.runpod import RunPodProvider

    step = sys.argv[1]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    real_create = RunPodProvider.create
    real_wait = lc.wait_until_ready

    def create(self, request):
        if step == "before_call":
            die()
        inst = real_create(self, request)
        if step == "after_accept":
            die()
        return inst

    def wait(client, inst, **kw):
        client.get_provider(inst.provider).get(inst.instance_id)
        die()

    RunPodProvider.create = create
    lc.wait_until_ready = wait
    GPUClient().create("gpu~4090 !spot", gpu_count=1, ttl="1h")
    print("not killed")
    """
)


@pytest.mark.parametrize("step", ["before_call", "after_accept", "during_wait"])
def test_sigkill_at_each_step_then_reconcile_leaves_no_leak(
    env: RunPodSimulator, step: str
) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, step], env=os.environ.copy(), capture_output=True, text=True
    )
    assert child.returncode == -9, child.stdout + child.stderr
    pods_before = live_pods(env)
    assert len(pods_before) == (0 if step == "before_call" else 1)

    r = CliRunner().invoke(app, ["instances", "reconcile", "-y", "--json"])
    assert r.exit_code == 0, r.output
    kinds = [f["kind"] for f in json.loads(r.stdout)["findings"]]
    # Killed after the entry was marked sent: the request may have gone out, so the entry
    # stays pending until the grace period has passed; then it is a ghost.
    assert kinds == (["pending"] if step == "before_call" else ["orphan"])
    if step == "before_call":
        old = (utcnow() - timedelta(seconds=AMBIGUOUS_GRACE_S + 60)).isoformat()
        with sqlite3.connect(load_settings().state_dir / "journal.sqlite") as db:
            db.execute("UPDATE instances SET sent_at = ?, updated_at = ?", (old, old))
        r = CliRunner().invoke(app, ["instances", "reconcile", "-y", "--json"])
        assert [f["kind"] for f in json.loads(r.stdout)["findings"]] == ["ghost"]
    assert live_pods(env) == []  # zero leaks
    with Journal.default(load_settings().state_dir) as j:
        assert not j.open_entries()
        assert len(j.all_entries()) == 1
    again = CliRunner().invoke(app, ["instances", "reconcile", "-y"])
    assert "no orphans, no ghosts" in again.stdout


def test_reconcile_adopts_a_foreign_instance_only_when_asked(env: RunPodSimulator) -> None:
    # A create made by a broker on another machine (or with a lost journal): another journal id.
    with GPUClient() as c:
        inst = c.create("gpu~4090 !spot", gpu_count=1, wait=False, detach=True)
    os.remove(load_settings().state_dir / "journal.sqlite")
    with GPUClient() as c:
        (finding,) = c.reconcile().findings
        assert finding.kind == "foreign" and finding.name == inst.name
    r = CliRunner().invoke(app, ["instances", "reconcile", "-y"])
    assert r.exit_code == 0, r.output
    assert live_pods(env) == [inst.instance_id]
    r = CliRunner().invoke(app, ["instances", "reconcile", "-y", "--include-foreign"])
    assert r.exit_code == 0, r.output
    assert live_pods(env) == []
    with Journal.default(load_settings().state_dir) as j:
        adopted = j.get(inst.name or "")
        assert adopted is not None and adopted.status == "terminated"


def test_concurrent_broker_processes_share_one_journal(env: RunPodSimulator) -> None:
    script = textwrap.dedent(
        """
        from broker import GPUClient
        with GPUClient() as c:
            with c.create("gpu~4090 !spot", gpu_count=1, ttl="1h", sweep="par") as inst:
                inst.host().exec("true")
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(), text=True)
        for _ in range(3)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    with Journal.default(load_settings().state_dir) as j:
        entries = j.all_entries(sweep="par")
        assert len(entries) == 3 and len({e.name for e in entries}) == 3
        assert {e.status for e in entries} == {"terminated"}
    assert live_pods(env) == []


def test_api_down_during_readiness_is_retried_not_fatal(env: RunPodSimulator) -> None:
    env.slow_ports(0.5)
    env.fail_requests(2, operation="pod")
    with GPUClient() as c, c.create("gpu~4090 !spot", gpu_count=1, ready_timeout=30) as inst:
        assert inst.ssh is not None and inst.ssh.direct


def test_unreachable_provider_blocks_no_ghost_verdict(env: RunPodSimulator) -> None:
    with GPUClient() as c:
        inst = c.create("gpu~4090 !spot", gpu_count=1, wait=False, detach=True)
        env.fail_requests(None, operation="myself")
        report = c.reconcile()
        assert report.findings == [] and "runpod" in report.unreachable
        env.clear_faults()
        env.fail_terminate(None)
        with pytest.raises(ProviderUnavailableError):
            c.terminate(inst)
        env.clear_faults()
        c.terminate(inst)
    assert live_pods(env) == []


def test_the_readiness_login_is_the_first_host_connection(
    env: RunPodSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create() logs in once: the first inst.host() gets that connection (no second SSH
    handshake), with the Host's own reconnect settings; terminate closes an unused one."""
    import bifrost.transport.ssh as ssh_transport
    from bifrost import Host

    opened: list[str] = []
    real_open = ssh_transport.open_transport

    async def counting_open(target, **kw):  # type: ignore[no-untyped-def]
        opened.append(target.display)
        return await real_open(target, **kw)

    monkeypatch.setattr(ssh_transport, "open_transport", counting_open)
    defaults = Host("root@127.0.0.1:22")
    with GPUClient() as c:
        with c.create("gpu~A100 !spot", gpu_count=1, ttl="1h") as inst:
            assert len(opened) == 1  # the readiness login
            host = inst.host()
            assert host.current_transport() is not None  # already connected
            want = (defaults.retries, defaults.connect_timeout)
            assert (host.retries, host.connect_timeout) == want
            assert host.exec("nvidia-smi -L").stdout.count("A100") == 1
            assert host.exec("echo $SSH_CLIENT").ok
            assert len(opened) == 1  # both commands went over the readiness connection
            other = inst.host()  # the next caller opens its own
            assert other is not host and other.current_transport() is None
            other.exec("true")
            assert len(opened) == 2
            host.close()
            other.close()
        with c.create("gpu~A100 !spot", gpu_count=1, ttl="1h") as unused:
            kept = unused._ready_host
            assert kept is not None and kept.current_transport() is not None
        assert kept.current_transport() is None  # terminate closed the unused connection
    assert live_pods(env) == []
