"""Without the `experiments` extra every experiment script says how to install it: one line on
stderr, exit status 2, no ModuleNotFoundError traceback, `--help` included (issue 19, item 7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Runs a script the way `python SCRIPT ARGS` / `python -m MOD ARGS` would, in an interpreter where
# the extra's packages cannot be imported (as in a fresh clone without `--extra experiments`).
_BLOCKED_RUN = """
import runpy, sys
BLOCK = {"torch", "transformers", "numpy", "pandas", "scipy", "matplotlib", "statsmodels",
         "peft", "nnsight", "accelerate"}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
args = sys.argv[1:]
if args[0] == "-m":
    sys.argv = [args[1], *args[2:]]
    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")
"""

SCRIPTS = [
    ["experiments/bh_routing/run_bh_experiments.py"],
    ["experiments/bh_routing/analyze_bh_results.py"],
    ["experiments/multi_gpu_model/multi_gpu_model.py"],
    ["experiments/multi_gpu_model/analyze_multi_gpu_results.py"],
    ["-m", "experiments.outlier_features.run"],
    ["-m", "experiments.outlier_features.compare"],
    ["experiments/outlier_features/generate_comparison_plots.py"],
    ["experiments/peft_sweep/scripts/run_sweep.py"],
    ["experiments/peft_sweep/scripts/analyze_sweep.py"],
    ["experiments/peft_sweep/train.py"],
    ["bench/bench_bh_routing.py"],
]
#: Scripts whose ``--help`` works without the extra (argparse only); running them must still
#: give the one-line hint.
RUN_ONLY = [["bench/bench_outlier_features.py"]]


CASES = [(s, a) for s in SCRIPTS for a in (["--help"], [])] + [(s, []) for s in RUN_ONLY]


@pytest.mark.parametrize(
    ("script", "args"),
    CASES,
    ids=[f"{s[-1].rsplit('/', 1)[-1]}-{'help' if a else 'run'}" for s, a in CASES],
)
def test_missing_extra_gives_one_line_install_hint(script: list[str], args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN, *script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "ModuleNotFoundError" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "install with `--extra experiments`" in lines[0], r.stderr
    assert r.stdout == ""
