"""The broker CLI through typer's runner: output, --json schema, exit codes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from typer.testing import CliRunner

from broker.cli import app

runner = CliRunner()


def test_search_local_json_schema() -> None:
    r = runner.invoke(app, ["search", "--provider", "local", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) == {"query", "offers", "providers"}
    assert data["query"] == "limit=20"
    (offer,) = data["offers"]
    for key in (
        "provider",
        "offer_id",
        "gpu_type",
        "gpu_provider_name",
        "manufacturer",
        "gpu_known",
        "gpu_count",
        "vram_gb",
        "total_vram_gb",
        "vcpus",
        "ram_gb",
        "disk_gb",
        "price_per_hour",
        "price_per_gpu_hour",
        "spot",
        "cloud_type",
        "region",
        "stock",
        "observed_at",
        "source",
    ):
        assert key in offer
    assert offer["provider"] == "local" and offer["price_per_hour"] == 0.0
    (rep,) = data["providers"]
    assert rep["provider"] == "local" and rep["status"] == "ok" and rep["offers"] == 1


def test_search_table_and_report() -> None:
    r = runner.invoke(app, ["search", "--provider", "local"])
    assert r.exit_code == 0
    assert "local" in r.stdout
    assert "ok local: 1 offers" in r.output


def test_search_bad_query_exits_2_with_message() -> None:
    r = runner.invoke(app, ["search", "vrma>=80"])
    assert r.exit_code == 2
    assert "unknown field 'vrma' at column 1; did you mean 'vram'?" in r.output
    assert "Traceback" not in r.output


def test_search_no_match_exits_0() -> None:
    r = runner.invoke(app, ["search", "gpus>=64", "--provider", "local", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["offers"] == []


def test_search_flags_become_query() -> None:
    r = runner.invoke(
        app,
        [
            "search",
            "--gpu-type",
            "H100",
            "--gpu-count",
            "2",
            "--min-vram",
            "80",
            "--max-price",
            "6",
            "--manufacturer",
            "nvidia",
            "--on-demand",
            "--sort",
            "price,-vram",
            "--limit",
            "5",
            "--explain",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["query"] == (
        "gpu~H100 gpus=2 vram>=80GB price<=6/h manufacturer=nvidia !spot sort=price,-vram limit=5"
    )
    assert plan["providers"][0]["provider"] == "local"


def test_limit_in_query_text_wins_over_default() -> None:
    r = runner.invoke(app, ["search", "limit=3", "--explain", "--json"])
    assert json.loads(r.stdout)["limit"] == 3


def test_explain_text() -> None:
    r = runner.invoke(app, ["search", "gpu~H100 gpus>=2", "--explain"])
    assert r.exit_code == 0
    assert "gpu~H100 gpus>=2" in r.stdout and "re-checked" in r.stdout


def test_unknown_provider_exits_2() -> None:
    r = runner.invoke(app, ["search", "--provider", "runpd"])
    assert r.exit_code == 2
    assert "did you mean 'runpod'" in r.output or "unknown provider 'runpd'" in r.output


def test_providers_json() -> None:
    r = runner.invoke(app, ["providers", "--json"])
    assert r.exit_code == 0
    rows = {row["provider"]: row for row in json.loads(r.stdout)}
    assert rows["local"]["configured"] is True
    assert set(rows["local"]["capabilities"]) >= {"stop_resume", "spot", "provider_ttl", "pushdown"}


def test_init_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "cfg" / "config.toml"
    r = runner.invoke(app, ["init", "--path", str(target)])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    target.write_text('runpod_api_key = "rp-secret-123"\n')
    r = runner.invoke(app, ["init", "--path", str(target)])
    assert r.exit_code == 2
    assert "already exists" in r.output
    assert target.read_text() == 'runpod_api_key = "rp-secret-123"\n'


def test_config_file_keys_are_secret_and_used(monkeypatch: object, tmp_path: Path) -> None:
    from broker.config import load_settings

    cfg = Path(os.environ["BROKER_CONFIG"])
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text('runpod_api_key = "rp-secret-123"\nmax_price_per_hour = 5.5\n')
    s = load_settings()
    assert s.runpod_api_key is not None
    assert s.runpod_api_key.get_secret_value() == "rp-secret-123"
    assert s.max_price_per_hour == 5.5
    assert "rp-secret-123" not in repr(s) and "rp-secret-123" not in str(s)


def test_env_overrides_config_and_bad_config_is_clear(monkeypatch: object, tmp_path: Path) -> None:
    import pytest

    from broker.config import load_settings
    from broker.errors import ConfigError

    mp = pytest.MonkeyPatch()
    try:
        cfg = Path(os.environ["BROKER_CONFIG"])
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text('vast_api_key = "from-file"\n')
        mp.setenv("VAST_API_KEY", "from-env")
        assert load_settings().vast_api_key.get_secret_value() == "from-env"  # type: ignore[union-attr]
        cfg.write_text("max_price_per_hour = -1\n")
        with pytest.raises(ConfigError, match="max_price_per_hour"):
            load_settings()
        cfg.write_text("this is = = not toml\n")
        r = runner.invoke(app, ["providers"])
        assert r.exit_code == 2 and "not valid TOML" in r.output
    finally:
        mp.undo()
