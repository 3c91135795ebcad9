"""The README's two commands exist, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must open with a bash block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_opens_with_two_commands() -> None:
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert all(c.startswith("python3 -m pip install -q uv && ") for c in cmds)
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_main_job_is_the_outlier_deploy_on_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Command 1 runs deploy.py with flags it accepts: the same argv plus --dry-run plans the
    deploy on this machine and rents nothing (tests/experiments/test_outlier_deploy.py runs the
    same deploy end to end)."""
    from experiments.outlier_features.deploy import main

    prefix = "python3 -m pip install -q uv && python3 -m uv run --locked --extra experiments "
    first = _readme_commands()[0]
    assert first.startswith(prefix)
    argv = shlex.split(first[len(prefix) :])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file()
    assert argv[1] == "experiments/outlier_features/deploy.py"
    for var, path in (
        ("BROKER_CONFIG", "c.toml"),
        ("BROKER_STATE_DIR", "s"),
        ("BROKER_ENV_FILE", "e"),
    ):
        monkeypatch.setenv(var, str(tmp_path / path))
    assert main([*argv[2:], "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "tiny-moe" in plan and "local" in plan
