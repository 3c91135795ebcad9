"""`broker create` and `broker instances ...` on the local provider, through typer's runner."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from broker import load_settings
from broker.cli import app
from broker.journal import Journal
from broker.lifecycle import current_owner
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


# -- issues 16.7, 16.8, 19.4, 19.6 ------------------------------------------------------------------


def test_a_corrupt_journal_does_not_block_search() -> None:
    settings = load_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "journal.sqlite").write_bytes(b"garbage" * 1000)
    r = runner.invoke(app, ["search", "--provider", "local", "--json"])
    assert r.exit_code == 0, r.output
    assert "auto-reap skipped" in r.stderr and "corrupt" in r.stderr
    r = runner.invoke(app, ["instances", "list"])
    assert (r.exit_code == 1 and r.exception is None) or isinstance(r.exception, SystemExit)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "journal" in line and "Traceback" not in r.output


def test_a_state_dir_that_is_a_file_is_one_line(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("BROKER_STATE_DIR", str(tmp_path / "f"))
    r = runner.invoke(app, ["instances", "list"])
    assert r.exit_code == 2 and "not a directory" in r.stderr
    assert isinstance(r.exception, SystemExit)
    r = runner.invoke(app, ["create", "--provider", "local", "--json"])
    assert r.exit_code == 2 and "not a directory" in json.loads(r.stdout)["error"]["message"]


def test_absurd_disk_and_ready_timeout_are_refused() -> None:
    for args in (["--disk", "100000000000000000000"], ["--ready-timeout", "inf"]):
        r = runner.invoke(app, ["create", "--provider", "local", *args])
        assert r.exit_code == 2, (args, r.output)
    from broker import GPUClient
    from broker.errors import ConfigError

    with GPUClient(providers=["local"]) as c:
        with pytest.raises(ConfigError):
            c.create(None, disk_gb=10**20)
        with pytest.raises(ConfigError):
            c.create(None, ready_timeout=float("nan"))


def test_world_readable_config_with_a_key_is_warned_about(isolated_broker_env) -> None:  # type: ignore[no-untyped-def]
    from broker.permissions import secret_file_warning

    cfg = isolated_broker_env / "config.toml"
    cfg.write_text('lambda_api_key = "secret-value-123"\n')
    cfg.chmod(0o644)
    warning = secret_file_warning(cfg)
    assert warning is not None and "chmod 600" in warning and "secret-value" not in warning
    r = runner.invoke(app, ["create", "--provider", "local", "--json"])
    assert r.exit_code == 0, r.output
    assert "readable by everyone" in r.stderr
    cfg.chmod(0o600)
    assert secret_file_warning(cfg) is None


def test_list_marks_a_dead_holder_and_no_ttl_for_closed_ones() -> None:
    held = _create("--ttl", "2h")["instance"]["name"]
    settings = load_settings()
    host = current_owner().split(":")[0]
    with sqlite3.connect(settings.state_dir / "journal.sqlite") as db:
        db.execute("UPDATE instances SET owner = ? WHERE name = ?", (f"{host}:999999:1", held))
    (row,) = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
    assert row["holder"] == "dead" and row["holder_alive"] is False
    table = runner.invoke(app, ["list"])
    assert "(holder dead)" in table.stdout and "local" in table.stdout
    assert runner.invoke(app, ["terminate", held, "-y"]).exit_code == 0
    (row,) = json.loads(runner.invoke(app, ["list", "--all", "--json"]).stdout)
    assert row["ttl_left_s"] is None
    assert "-" in runner.invoke(app, ["list", "--all"]).stdout


def test_ssh_and_forget_take_json() -> None:
    name = _create()["instance"]["name"]
    r = runner.invoke(app, ["instances", "ssh", name, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["local"] is True
    r = runner.invoke(app, ["instances", "forget", name, "-y", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == [{"name": name, "forgotten": True}]
