"""deploy.py / deploy_sweep.py (thin clients of broker.launch) on `local` with the tiny MoEs.

Each test gets its own broker config, journal and bifrost state, and a temp $HOME (the `local`
target keeps workspaces and job dirs there), so nothing leaks into or out of the developer's.
The job itself runs ``run.py`` in a child process; the tiny models keep that to seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bifrost import Host
from experiments.outlier_features import deploy, deploy_sweep

#: The `journal` fixture (tests/experiments/conftest.py): all broker journal entries.
Journal = Callable[[], list[Any]]

FAST = ["--num-sequences", "4", "--seq-len", "64"]


def test_deploy_tiny_moe_on_local_end_to_end(env: Path, journal: Journal,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = deploy.main(["--provider", "local", "--model", "tiny-moe", "--results-dir", str(env),
                      *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    # The seed's layout: the run's files right in <results>/<model>/ (temp dir renamed away).
    assert sorted(p.name for p in env.iterdir()) == ["tiny-moe"]
    res = env / "tiny-moe"
    summary = json.loads((res / "summary.json").read_text())
    assert summary["model"]["id"] == "tiny-moe"
    assert summary["results"]["with_pos0"]["n_dims"] == 0
    assert (res / "per_dim.csv").read_text().startswith("dim,")
    assert "sequences:" in (res / "job.log").read_text()
    record = json.loads((res / "deploy.json").read_text())
    assert record["status"] == "succeeded" and record["provider"] == "local"
    [entry] = journal()
    assert entry.name == record["instance"] and not entry.is_open
    assert entry.tag == "tiny-moe" and entry.status == "terminated"
    assert f"{entry.name} terminated, confirmed gone" in out
    assert "  | sequences:" in out
    home = Path(os.environ["HOME"])
    assert list((home / ".bifrost" / "workspaces").iterdir()) == []
    with Host("local") as h:
        assert h.job(record["job_id"]).status().state == "succeeded"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_deploy_interrupt_terminates_the_instance(env: Path, journal: Journal,
                                                  sig: signal.Signals) -> None:
    cmd = [sys.executable, str(Path(deploy.__file__)), "--provider", "local", "--model",
           "tiny-moe", "--results-dir", str(env), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # wait until the job runs, then interrupt
        seen.append(line)
        if line.startswith("run: job "):
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + sig, "".join(seen) + rest
    [entry] = journal()
    assert not entry.is_open
    job_id = next(ln for ln in seen if ln.startswith("run: job ")).split()[2].rstrip(":")
    # On `local` the terminate alone would not stop the job: the launch killed it.
    with Host("local") as h:
        assert h.job(job_id).status().state == "cancelled"
    assert not (env / "tiny-moe").exists()


def test_deploy_bad_input_and_no_offer(env: Path, journal: Journal,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert deploy.main(["--model", "99", "--provider", "local"]) == 2
    err = capsys.readouterr().err
    assert "unknown model '99'" in err and "01 (OLMoE-1B-7B)" in err and "tiny-moe" in err
    assert deploy.main(["--model", "tiny-moe", "--provider", "nope"]) == 2
    assert "unknown provider 'nope'" in capsys.readouterr().err
    assert deploy.main(["--model", "tiny-moe", "--provider", "local", "--gpu-count", "0"]) == 2
    assert "--gpu-count must be >= 1" in capsys.readouterr().err
    assert deploy.main(["--model", "tiny-moe", "--provider", "local", "--ttl", "5s"]) == 2
    assert "shorter than one minute" in capsys.readouterr().err
    # This machine has no A100 80GB: says what it searched, rents nothing.
    assert deploy.main(["--model", "01", "--provider", "local"]) == 3
    err = capsys.readouterr().err
    assert "no offer for olmoe-1b-7b" in err and "gpu~A100" in err
    assert journal() == []


def test_sweep_dry_run_and_status_without_sweep(env: Path, journal: Journal,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = deploy_sweep.main(["--dry-run", "--provider", "local", "--models", "tiny-moe",
                            "--results-dir", str(env)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "tiny-moe" in out and "CPU only" in out and "estimated total $0.00" in out
    # One model without an offer: a dry run says so and exits non-zero.
    assert deploy_sweep.main(["--dry-run", "--provider", "local", "--models", "tiny-moe", "01",
                              "--results-dir", str(env)]) == 3
    assert "no offer" in capsys.readouterr().out
    assert journal() == [] and not env.exists()
    assert deploy_sweep.main(["--status", "--provider", "local"]) == 2
    assert "no sweep has run yet" in capsys.readouterr().err
    assert deploy_sweep.main(["--models", "nope", "--dry-run", "--provider", "local"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_sweep_of_two_tiny_models_then_status(env: Path, journal: Journal,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    sweep_id = "outlier-test-sweep"
    args = ["--provider", "local", "--models", "tiny-moe", "tiny-moe-planted",
            "--max-concurrent", "2", "-y", "--sweep-id", sweep_id, "--results-dir", str(env),
            *FAST]
    rc = deploy_sweep.main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    planted = json.loads((env / "tiny-moe-planted" / "summary.json").read_text())
    assert planted["results"]["with_pos0"]["dims"] == [7, 42, 99]
    assert (env / "tiny-moe" / "summary.json").is_file()
    entries = journal()
    assert {e.tag for e in entries} == {"tiny-moe", "tiny-moe-planted"}
    assert all(e.sweep == sweep_id and not e.is_open for e in entries)
    assert f"sweep {sweep_id}: 2/2 succeeded" in out and "nothing leaked" in out
    assert deploy_sweep.main(["--status", "--provider", "local"]) == 0
    status = capsys.readouterr().out
    assert status.startswith(f"sweep {sweep_id}")
    assert status.count("succeeded") == 2
    # Run again: both are done, so nothing is rented twice.
    assert deploy_sweep.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skip: done") == 2 and len(journal()) == 2
