"""Settings errors name their real source: the argument, the environment variable, the .env file
or the config file, and the setting (issue 19.5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app
from broker.config import api_key_hint, load_settings, setting_names
from broker.errors import ConfigError

runner = CliRunner()


def _config() -> Path:
    cfg = Path(os.environ["BROKER_CONFIG"])
    cfg.parent.mkdir(parents=True, exist_ok=True)
    return cfg


def test_bad_env_value_is_blamed_on_the_variable_not_a_missing_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = _config()
    assert not cfg.exists()
    monkeypatch.setenv("BROKER_MAX_PRICE_PER_HOUR", "four-dollars")
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "environment variable BROKER_MAX_PRICE_PER_HOUR" in msg
    assert "max_price_per_hour" in msg and "valid number" in msg
    assert str(cfg) not in msg and "config file" not in msg
    assert "four-dollars" not in msg  # values are never echoed: they may be keys


def test_env_value_beats_a_good_config_value_and_is_the_one_blamed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _config().write_text("budget_total = 10\n")
    monkeypatch.setenv("broker_budget", "-5")  # environment names are case-insensitive
    with pytest.raises(
        ConfigError, match=r"environment variable broker_budget \(setting budget_total\)"
    ):
        load_settings()


def test_bad_value_in_env_file_names_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "my.env"
    env_file.write_text("BROKER_SEARCH_TIMEOUT=0\nOTHER_TOOL=1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=str(env_file))
    assert f"BROKER_SEARCH_TIMEOUT in {env_file} (setting search_timeout_s)" in str(info.value)


def test_bad_value_in_config_file_names_the_file_and_key() -> None:
    cfg = _config()
    cfg.write_text("ready_timeout_s = -1\n")
    with pytest.raises(ConfigError, match=f"ready_timeout_s in config file {cfg}: "):
        load_settings()


def test_bad_argument_is_blamed_on_the_argument() -> None:
    with pytest.raises(ConfigError, match="argument budget_total: "):
        load_settings(budget_total="lots")


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("max_price", "max_price_per_hour"),
        ("runpod_key", "runpod_api_key"),
        ("budget", "budget_total"),
        ("BROKER_BUDGTE", "budget_total"),
        ("ssh_host", "ssh_hosts"),
    ],
)
def test_misspelt_config_key_is_an_error_with_did_you_mean(key: str, suggestion: str) -> None:
    cfg = _config()
    cfg.write_text(f"{key} = 4\n")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        f"config file {cfg}: unknown setting {key!r}; did you mean {suggestion!r}?"
    )


def test_unknown_config_key_without_a_near_name_lists_the_settings() -> None:
    _config().write_text("zzz = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'zzz'; settings are: runpod_api_key, "):
        load_settings()


def test_config_file_accepts_every_documented_key_and_env_style_names() -> None:
    _config().write_text(
        'default_ttl = "6h"\nBROKER_BUDGET = 20\nssh_key_path = "~/.ssh/none"\n'
        'providers = ["local"]\nrunpod_api_url = "http://127.0.0.1:1"\n'
    )
    s = load_settings()
    assert s.default_ttl == "6h" and s.budget_total == 20 and s.providers == ["local"]


def test_misspelt_key_exits_2_from_the_cli() -> None:
    cfg = _config()
    cfg.write_text("max_price = 4\n")
    r = runner.invoke(app, ["providers"])
    assert r.exit_code == 2
    assert f"error: config file {cfg}: unknown setting 'max_price'; did you mean" in r.stderr


def test_invalid_default_ttl_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_DEFAULT_TTL", "forever")
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "environment variable BROKER_DEFAULT_TTL (setting default_ttl)" in msg
    assert "cannot read ttl 'forever'" in msg and "'3h'" in msg
    r = runner.invoke(app, ["search", "--provider", "local"])
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    # One line: the command's error, not also an "auto-reap skipped" with the same message.
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [f"error: {msg}"]


def test_default_ttl_as_seconds_in_the_config_file() -> None:
    _config().write_text("default_ttl = 3600\n")
    assert load_settings().default_ttl == "3600"
    _config().write_text("default_ttl = 30\n")
    with pytest.raises(ConfigError, match="default_ttl in config file .*shorter than one minute"):
        load_settings()


def test_setting_names_and_api_key_hint() -> None:
    assert setting_names("budget_total") == ["BROKER_BUDGET", "budget_total"]
    assert setting_names("prime_api_key")[0] == "PRIME_API_KEY"
    hint = api_key_hint("lambdalabs")
    assert hint is not None and "LAMBDA_API_KEY" in hint and "lambda_api_key" in hint
    assert api_key_hint("local") is None
