"""`broker create` and `broker instances ...` on the local provider, through typer's runner."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta

from typer.testing import CliRunner

from broker import load_settings
from broker.cli import app
from broker.journal import Journal
from broker.types import utcnow

runner = CliRunner()


def _create(*extra: str) -> dict:  # type: ignore[type-arg]
    r = runner.invoke(app, ["create", "--provider", "local", "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_create_list_status_terminate_round_trip() -> None:
    made = _create("--ttl", "2h", "--name", "My Run")
    assert made["ok"] and made["target"] == "local"
    name = made["instance"]["name"]
    assert name.startswith("broker-") and name.endswith("-my-run")
    assert made["journal"]["ttl_left_s"] > 7000
    assert made["journal"]["owner"] is None  # the CLI detaches: it outlives the command

    r = runner.invoke(app, ["instances", "list", "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    for key in (
        "provider",
        "instance_id",
        "name",
        "gpu_type",
        "status",
        "age_s",
        "price_per_hour",
        "cost_so_far",
        "ttl_left_s",
    ):
        assert key in row
    assert row["status"] == "running"

    table = runner.invoke(app, ["list"])  # the old flat alias
    assert table.exit_code == 0 and name in table.stdout and "TTL left" in table.stdout

    st = runner.invoke(app, ["instances", "status", name[:14], "--json"])
    assert st.exit_code == 0, st.output
    events = [e["status"] for e in json.loads(st.stdout)["events"]]
    assert events[:4] == ["intent", "sent", "running", "ready"]  # the journaled state machine

    ssh = runner.invoke(app, ["instances", "ssh", name, "--print"])
    assert ssh.exit_code == 0 and "local machine" in ssh.stdout

    no = runner.invoke(app, ["terminate", name], input="n\n")
    assert no.exit_code == 1
    t = runner.invoke(app, ["terminate", name, "-y", "--json"])
    assert t.exit_code == 0, t.output
    assert json.loads(t.stdout) == [{"name": name, "ok": True, "status": "terminated"}]
    assert json.loads(runner.invoke(app, ["list", "--json"]).stdout) == []
    assert len(json.loads(runner.invoke(app, ["list", "--all", "--json"]).stdout)) == 1


def test_terminate_all_by_provider_and_confirmation() -> None:
    a = _create()["instance"]["name"]
    b = _create()["instance"]["name"]
    r = runner.invoke(app, ["instances", "terminate", "--provider", "local"], input="y\n")
    assert r.exit_code == 0, r.output
    assert a in r.stdout and b in r.stdout
    assert json.loads(runner.invoke(app, ["list", "--json"]).stdout) == []


def test_bad_input_is_a_clear_error_with_exit_code_2() -> None:
    r = runner.invoke(app, ["create", "--provider", "local", "--ttl", "3 hours"])
    assert r.exit_code == 2
    assert "cannot read ttl" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["create", "--provider", "nosuch"])
    assert r.exit_code == 2 and "unknown provider" in r.stderr
    r = runner.invoke(app, ["instances", "terminate"])
    assert r.exit_code == 2 and "--all" in r.output
    r = runner.invoke(app, ["instances", "status", "broker-doesnotexist"])
    assert r.exit_code == 1 and "no instance" in r.stderr


def test_no_matching_offer_is_an_error() -> None:
    # The local offer is $0/h, so a query for a GPU count it lacks finds nothing to rent.
    r = runner.invoke(app, ["create", "--provider", "local", "-n", "8"])
    assert r.exit_code == 1
    assert "no offer matches" in r.stderr


def test_every_command_reaps_instances_past_their_ttl() -> None:
    name = _create("--ttl", "1h")["instance"]["name"]
    settings = load_settings()
    past = (utcnow() - timedelta(minutes=5)).isoformat()
    with sqlite3.connect(settings.state_dir / "journal.sqlite") as db:
        db.execute("UPDATE instances SET expires_at = ? WHERE name = ?", (past, name))
    r = runner.invoke(app, ["list", "--json"])  # any command
    assert r.exit_code == 0, r.output
    assert f"reaped {name}" in r.stderr
    assert json.loads(r.stdout) == []
    with Journal.default(settings.state_dir) as j:
        entry = j.get(name)
        assert entry is not None and entry.status == "terminated"


def test_reconcile_reports_and_fixes_a_ghost() -> None:
    name = _create()["instance"]["name"]
    settings = load_settings()
    # The lease disappears behind the journal's back (e.g. someone deleted it by hand).
    for p in (settings.state_dir / "local").glob("local-*.json"):
        p.unlink()
    dry = runner.invoke(app, ["instances", "reconcile", "--dry-run", "--json"])
    assert dry.exit_code == 1, dry.output  # issue 19.6: something to fix is not a success
    (finding,) = json.loads(dry.stdout)["findings"]
    assert finding["kind"] == "ghost" and finding["name"] == name
    fixed = runner.invoke(app, ["instances", "reconcile", "-y"])
    assert fixed.exit_code == 0, fixed.output
    assert "closed in journal" in fixed.stdout
    again = runner.invoke(app, ["instances", "reconcile", "-y"])
    assert "no orphans, no ghosts" in again.stdout


def test_error_text_with_brackets_is_printed_verbatim() -> None:
    # BrokerError strings start with "[provider HTTP 503]": rich must not eat it as markup.
    r = runner.invoke(app, ["instances", "status", "[runpod HTTP 503]"])
    assert r.exit_code == 1
    assert "[runpod HTTP 503]" in r.stderr


def test_list_settings_from_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BROKER_SSH_HOSTS", "root@a:22, ubuntu@b")
    assert load_settings().ssh_hosts == ["root@a:22", "ubuntu@b"]
    monkeypatch.setenv("BROKER_SSH_HOSTS", '["root@a:22"]')
    assert load_settings().ssh_hosts == ["root@a:22"]
    monkeypatch.setenv("BROKER_SSH_HOSTS", "[broken")
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 2
    assert "ssh_hosts" in r.stderr and "Traceback" not in r.output


def test_forget_closes_an_entry_whose_provider_is_gone() -> None:
    name = _create()["instance"]["name"]
    settings = load_settings()
    with sqlite3.connect(settings.state_dir / "journal.sqlite") as db:
        db.execute("UPDATE instances SET provider = 'runpod' WHERE name = ?", (name,))
    # No RunPod key any more: terminate cannot reach it ...
    r = runner.invoke(app, ["terminate", name, "-y"])
    assert r.exit_code == 1 and "not configured" in r.stderr
    # ... so the user closes the entry by hand.
    r = runner.invoke(app, ["instances", "forget", name, "-y"])
    assert r.exit_code == 0, r.output
    assert json.loads(runner.invoke(app, ["list", "--json"]).stdout) == []
