"""The README's two commands exist, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

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


def test_main_job_is_the_outlier_deploy_on_local() -> None:
    """Command 1 runs deploy.py with flags it accepts (tests/experiments/test_outlier_deploy.py
    runs the same deploy end to end)."""
    from experiments.outlier_features.deploy import build_parser

    prefix = "python3 -m pip install -q uv && python3 -m uv run --locked --extra experiments "
    first = _readme_commands()[0]
    assert first.startswith(prefix)
    argv = shlex.split(first[len(prefix) :])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file()
    args = build_parser().parse_args(argv[2:])
    assert args.providers == ["local"] and args.model == "tiny-moe"
