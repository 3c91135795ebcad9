"""The broker CLI through typer's runner: output, --json schema, exit codes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
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


# --- script-friendly output (issue 19.4, 20.6) ------------------------------------------------


def _broker_exe() -> Path:
    """The installed `broker` console script of this environment."""
    import sys

    return Path(sys.executable).parent / "broker"


def _run_broker(
    args: list[str], env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    # The code under test, also when this tree is not the one installed in the environment.
    root = str(Path(__file__).resolve().parents[2])
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    full_env.update(env or {})
    return subprocess.run(
        [str(_broker_exe()), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
        **kw,  # type: ignore[arg-type]
    )


def test_providers_table_piped_is_neither_cut_nor_wrapped() -> None:
    """`broker providers | grep primeintellect` finds the whole row, pushdown list included."""
    rows = json.loads(runner.invoke(app, ["providers", "--json"]).stdout)
    r = runner.invoke(app, ["providers"], env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout
    for row in rows:
        pushdown = ", ".join(row["capabilities"]["pushdown"]) or "-"
        assert any(row["provider"] in ln and pushdown in ln for ln in r.stdout.splitlines()), (
            row["provider"],
            r.stdout,
        )


def test_providers_through_a_real_pipe_greps() -> None:
    r = _run_broker(["providers"], env={"COLUMNS": "40"})
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if "primeintellect" in ln]
    assert "gpu_count" in line and "…" not in line


def test_search_table_piped_keeps_long_cells() -> None:
    """Search tables are not cut at any width when piped (was: a fixed 180 columns)."""
    import io

    from broker.cli import PipeConsole, offers_table
    from broker.types import GPUOffer

    data = json.loads(runner.invoke(app, ["search", "--provider", "local", "--json"]).stdout)
    region = "a-very-long-region-name-" * 10
    offer = GPUOffer.model_validate({**data["offers"][0], "region": region})
    buf = io.StringIO()
    PipeConsole(file=buf).print(offers_table([offer]))
    (row,) = [ln for ln in buf.getvalue().splitlines() if "local" in ln]
    assert region in row


def test_errors_are_one_line_whatever_the_path_length(tmp_path: Path) -> None:
    """A long config path in an error is never hard-wrapped (was: wrapped at 80 columns)."""
    long_dir = tmp_path / ("d" * 120) / ("e" * 60)
    long_dir.mkdir(parents=True)
    cfg = long_dir / "config.toml"
    cfg.write_text("this is = = not toml\n")
    r = runner.invoke(app, ["providers"], env={"BROKER_CONFIG": str(cfg), "COLUMNS": "50"})
    assert r.exit_code == 2
    (line,) = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert f"config file {cfg} is not valid TOML" in line
    p = _run_broker(["providers"], env={"BROKER_CONFIG": str(cfg), "COLUMNS": "50"})
    assert p.returncode == 2
    assert f"error: config file {cfg} is not valid TOML" in p.stderr.splitlines()[0]
    assert "Traceback" not in p.stderr


def test_print_error_does_not_wrap_on_a_narrow_terminal() -> None:
    import io

    import broker.cli as cli

    buf = io.StringIO()
    narrow = cli.PipeConsole(file=buf, force_terminal=True, width=30, color_system=None)
    old, cli.err = cli.err, narrow
    try:
        cli.print_error("x" * 50 + " [not markup] " + "y" * 50)
    finally:
        cli.err = old
    assert buf.getvalue() == "error: " + "x" * 50 + " [not markup] " + "y" * 50 + "\n"


def test_version_and_short_help() -> None:
    from broker import __version__

    for flag in ("--version", "-V"):
        r = runner.invoke(app, [flag])
        assert r.exit_code == 0 and r.stdout.strip() == f"broker {__version__}"
    r = runner.invoke(app, ["-h"])
    assert r.exit_code == 0 and "Usage: broker" in r.stdout and "search" in r.stdout
    r = runner.invoke(app, ["search", "-h"])
    assert r.exit_code == 0 and "--gpu-type" in r.stdout
    r = runner.invoke(app, ["instances", "list", "-h"])
    assert r.exit_code == 0 and "--json" in r.stdout


def _all_command_paths() -> list[list[str]]:
    import typer.main

    paths: list[list[str]] = []

    def walk(cmd: object, path: list[str]) -> None:
        paths.append(path)
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_help_has_no_bool_markers() -> None:
    """Flags read as flags: no `<bool>` that invites `--json true`."""
    paths = _all_command_paths()
    assert ["instances", "list"] in paths and ["search"] in paths
    for path in paths:
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        assert "<bool>" not in r.stdout, (path, r.stdout)
    assert "--json" in runner.invoke(app, ["search", "--help"]).stdout


def test_shell_completion_bash_zsh_fish() -> None:
    """typer's completion scripts, and the completions they ask the program for."""
    for shell in ("bash", "zsh", "fish"):
        script = _run_broker([], env={"_BROKER_COMPLETE": f"source_{shell}"})
        assert script.returncode == 0, (shell, script.stderr)
        assert f"_BROKER_COMPLETE=complete_{shell}" in script.stdout, (shell, script.stdout)
    bash = _run_broker(
        [],
        env={"_BROKER_COMPLETE": "complete_bash", "COMP_WORDS": "broker prov", "COMP_CWORD": "1"},
    )
    assert bash.stdout.split() == ["providers"], bash
    zsh = _run_broker(
        [], env={"_BROKER_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "broker instances re"}
    )
    assert "reap" in zsh.stdout and "reconcile" in zsh.stdout, zsh
    fish = _run_broker(
        [],
        env={
            "_BROKER_COMPLETE": "complete_fish",
            "_TYPER_COMPLETE_ARGS": "broker search --prov",
            "_TYPER_COMPLETE_FISH_ACTION": "get-args",
        },
    )
    assert "--provider" in fish.stdout, fish
    r = runner.invoke(app, ["--help"])
    assert "--install-completion" in r.stdout and "--show-completion" in r.stdout


# --- exit codes (issue 19.6) -------------------------------------------------------------------


def test_missing_api_key_exits_2_and_says_how_to_set_it() -> None:
    r = runner.invoke(app, ["search", "--provider", "runpod"])
    assert r.exit_code == 2, r.output
    assert "RUNPOD_API_KEY" in r.stderr and "runpod_api_key" in r.stderr
    r = runner.invoke(app, ["search", "--provider", "runpod", "--json"])
    assert r.exit_code == 2
    (rep,) = json.loads(r.stdout)["providers"]
    assert rep["error"]["type"] == "ConfigError"


def test_search_names_the_clouds_left_out_and_how_to_add_them() -> None:
    r = runner.invoke(app, ["search"])
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    for name, env in [
        ("runpod", "RUNPOD_API_KEY"),
        ("primeintellect", "PRIME_API_KEY"),
        ("lambdalabs", "LAMBDA_API_KEY"),
        ("vast", "VAST_API_KEY"),
    ]:
        assert any(f"skipped {name}: " in ln and env in ln for ln in lines), r.stderr
    assert "excluded by the query" not in r.stderr
    # Asked for by name (or by the providers setting): nothing to add.
    r = runner.invoke(app, ["search", "--provider", "local"])
    assert "not configured" not in r.stderr
    r = runner.invoke(app, ["search"], env={"BROKER_PROVIDERS": "local"})
    assert "not configured" not in r.stderr


def test_every_command_takes_json(tmp_path: Path) -> None:
    """Every broker command prints data, so every one takes --json (a new one must too)."""
    import typer.main

    leaves: list[str] = []

    def walk(cmd: object, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        elif "--json" not in {o for p in getattr(cmd, "params", []) for o in p.opts}:
            leaves.append(" ".join(path))

    walk(typer.main.get_command(app), [])
    assert leaves == []
    target = tmp_path / "c" / "config.toml"
    r = runner.invoke(app, ["init", "--path", str(target), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"path": str(target), "mode": "0600"}


def test_search_table_says_spot_or_on_demand_and_the_cloud() -> None:
    from rich.console import Console

    from broker.cli import offers_table
    from broker.types import GPUOffer

    offers = [
        GPUOffer(provider="runpod", offer_id="a", gpu_type="A100", gpu_provider_name="A100",
                 manufacturer="nvidia", gpu_known=True, gpu_count=1, vram_gb=80,
                 price_per_hour=1.0, spot=True, cloud_type="secure", source="test"),
        GPUOffer(provider="runpod", offer_id="b", gpu_type="A100", gpu_provider_name="A100",
                 manufacturer="nvidia", gpu_known=True, gpu_count=1, vram_gb=80,
                 price_per_hour=2.0, spot=False, cloud_type="community", source="test"),
    ]
    console = Console(width=300, record=True)
    console.print(offers_table(offers))
    text = console.export_text()
    assert "spot, secure" in text and "on-demand, community" in text
