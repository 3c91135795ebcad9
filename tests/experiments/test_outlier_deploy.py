"""deploy.py / deploy_sweep.py end to end on the `local` provider with the tiny random MoEs.

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
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bifrost import Host
from broker import GPUClient, GPUOffer
from broker.providers.base import Capabilities, Provider
from experiments.outlier_features import deploy, deploy_sweep
from experiments.outlier_features.configs import get_spec

#: The `journal` fixture (tests/experiments/conftest.py): all broker journal entries.
Journal = Callable[[], list[Any]]

FAST = ["--num-sequences", "4", "--seq-len", "64"]


def test_deploy_tiny_moe_on_local_end_to_end(env: Path, journal: Journal,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc = deploy.main(["--provider", "local", "--model", "tiny-moe", "--results-dir", str(env),
                      *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    # Results pulled (and only the final folder left: the temp pull dir was renamed away).
    assert sorted(p.name for p in env.iterdir()) == ["tiny-moe"]
    res = env / "tiny-moe"
    summary = json.loads((res / "summary.json").read_text())
    assert summary["model"]["id"] == "tiny-moe"
    assert summary["results"]["with_pos0"]["n_dims"] == 0
    assert (res / "per_dim.csv").read_text().startswith("dim,")
    assert "sequences:" in (res / "job.log").read_text()
    record = json.loads((res / "deploy.json").read_text())
    assert record["status"] == "succeeded" and record["provider"] == "local"
    # The instance is terminated and its journal entry closed, tagged with the model.
    [entry] = journal()
    assert entry.name == record["instance"] and not entry.is_open
    assert entry.tag == "tiny-moe" and entry.status == "terminated"
    assert f"terminated {entry.name}" in out
    # Progress came from the job's log; the per-instance workspace copy is gone.
    assert "  | sequences:" in out and "100%" in out
    home = Path(os.environ["HOME"])
    assert list((home / ".bifrost" / "workspaces").iterdir()) == []
    with Host("local") as h:
        assert h.job(record["job_id"]).status().state == "succeeded"


def test_deploy_ctrl_c_terminates_the_instance(env: Path, journal: Journal) -> None:
    state = env / "state.json"
    cmd = [sys.executable, str(Path(deploy.__file__)), "--provider", "local", "--model",
           "tiny-moe", "--results-dir", str(env), "--state-file", str(state), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # wait until the job runs, then press "Ctrl-C"
        seen.append(line)
        if line.startswith("  job "):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, "".join(seen) + rest
    record = json.loads(state.read_text())
    assert record["status"] == "cancelled" and record["instance_state"] == "terminated"
    [entry] = journal()
    assert not entry.is_open
    # On `local` the terminate alone would not stop the job: deploy.py killed it.
    with Host("local") as h:
        assert h.job(record["job_id"]).status().state == "cancelled"
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
    # This machine has no A100 80GB: says what it searched, rents nothing.
    assert deploy.main(["--model", "01", "--provider", "local"]) == 3
    err = capsys.readouterr().err
    assert "no offer for 01 (OLMoE-1B-7B): searched `gpu~A100" in err and "on local" in err
    assert journal() == []


class _PricedProvider(Provider):
    """One A100 offer at $3.10/h: dearer than OLMoE's $2.50/h cap."""

    name: ClassVar[str] = "priced"
    display_name: ClassVar[str] = "priced"
    capabilities: ClassVar[Capabilities] = Capabilities(requires_api_key=False)

    @classmethod
    def is_configured(cls, settings):  # type: ignore[no-untyped-def]
        return True

    @classmethod
    def from_settings(cls, settings):  # type: ignore[no-untyped-def]
        return cls()

    def search(self, query):  # type: ignore[no-untyped-def]
        return [GPUOffer(provider="priced", offer_id="a100", gpu_type="A100 SXM 80GB",
                         gpu_provider_name="A100-SXM4-80GB", manufacturer="nvidia",
                         gpu_known=True, gpu_count=1, vram_gb=80, price_per_hour=3.1,
                         source="test")]

    def create(self, request):  # type: ignore[no-untyped-def]
        raise AssertionError("nothing may be created over the cap")

    get = list_instances = terminate = create


def test_no_offer_under_cap_names_the_cheapest(env: Path) -> None:
    with GPUClient(providers=[_PricedProvider()]) as c:
        spec = get_spec("01")
        assert spec is not None
        plan = deploy.plan_deploy(c, spec, deploy.DeployOptions(model="01"))
        assert plan.offer is None
        msg = plan.no_offer_message()
        assert "searched `gpu~A100 gpus=1 vram>=80GB price<=2.5/h" in msg
        assert "cheapest match is priced 1x A100 SXM 80GB at $3.10/h" in msg
        assert "over the cap $2.50/h" in msg and "--max-price to 3.10" in msg
        ok = deploy.plan_deploy(c, spec, deploy.DeployOptions(model="01", max_price=3.5))
        assert ok.offer is not None and ok.est_cost == pytest.approx(3.1 * ok.est_hours)


def test_sweep_dry_run_and_status_without_sweep(env: Path, journal: Journal,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = deploy_sweep.main(["--dry-run", "--provider", "local", "--models", "tiny-moe", "01",
                            "--results-dir", str(env)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "2 model(s) on local" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "CPU only" in lines["tiny-moe"] and "0.00" in lines["tiny-moe"]
    assert "NO OFFER" in lines["01"] and "1x A100 >=80GB" in lines["01"]
    assert "01: no offer for 01 (OLMoE-1B-7B): searched `gpu~A100" in out
    assert "dry run: nothing rented" in out
    assert journal() == [] and not env.exists()
    assert deploy_sweep.main(["--status", "--results-dir", str(env)]) == 2
    assert "no sweep found" in capsys.readouterr().out
    assert deploy_sweep.main(["--models", "nope", "--dry-run", "--provider", "local"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().out


def test_sweep_of_two_tiny_models_then_status(env: Path, journal: Journal,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    sweep_id = "outlier-test-sweep"
    rc = deploy_sweep.main(["--provider", "local", "--models", "tiny-moe", "tiny-moe-planted",
                            "--max-concurrent", "2", "-y", "--sweep-id", sweep_id,
                            "--results-dir", str(env), *FAST])
    out = capsys.readouterr().out
    assert rc == 0, out
    planted = json.loads((env / "tiny-moe-planted" / "summary.json").read_text())
    assert planted["results"]["with_pos0"]["dims"] == [7, 42, 99]
    assert (env / "tiny-moe" / "summary.json").is_file()
    # Every instance carries the sweep id and its model; all are closed; costs are summed.
    entries = journal()
    assert {e.tag for e in entries} == {"tiny-moe", "tiny-moe-planted"}
    assert all(e.sweep == sweep_id and not e.is_open for e in entries)
    assert "[tiny-moe-planted]   | " in out  # worker output, prefixed with its model
    assert f"leak check: all 2 instance(s) of {sweep_id} are closed" in out
    assert "cost (journal, actual $/h x time; estimate was $0.00)" in out
    logs = sorted(p.name for p in (env / "sweeps" / sweep_id / "logs").iterdir())
    assert logs == ["deploy_tiny-moe-planted_1.log", "deploy_tiny-moe_1.log"]
    record = json.loads((env / "sweeps" / sweep_id / "sweep.json").read_text())
    assert {m: o["status"] for m, o in record["outcomes"].items()} == {
        "tiny-moe": "succeeded", "tiny-moe-planted": "succeeded"}
    assert record["left_open"] == []

    assert deploy_sweep.main(["--status", "--provider", "local", "--results-dir",
                              str(env)]) == 0
    status = capsys.readouterr().out
    assert status.startswith(f"sweep {sweep_id}: started ")
    rows = {ln.split()[0]: ln for ln in status.splitlines()[2:] if ln.strip()}
    for model in ("tiny-moe", "tiny-moe-planted"):
        assert "succeeded" in rows[model] and "terminated" in rows[model]
        assert f"outlier-{model}-" in rows[model]  # the job id, with its final state
    assert "2 instance(s), 0 open; cost so far $0.00" in status


class _ScriptedSweep(deploy_sweep.Sweep):
    """Workers run a small script instead of deploy.py (retry and Ctrl-C logic only)."""

    script = ""

    def command(self, model: str, state_file: Path) -> list[str]:
        return [sys.executable, "-c", self.script]


def _sweep_opts(tmp_path: Path, retries: int) -> deploy_sweep.SweepOptions:
    return deploy_sweep.SweepOptions(sweep_id="outlier-t", providers=["local"],
                                     results_dir=tmp_path, max_concurrent=2, delay_s=0,
                                     retries=retries)


def test_sweep_retries_a_failed_model(tmp_path: Path) -> None:
    lines: list[str] = []
    sweep = _ScriptedSweep(_sweep_opts(tmp_path, retries=2), out=lines.append)
    sweep.script = "print('boom'); raise SystemExit(1)"
    spec = get_spec("tiny-moe")
    assert spec is not None
    outcome = sweep.run([spec])["tiny-moe"]
    assert outcome.status == "failed" and len(outcome.attempts) == 3
    assert [a["exit_code_deploy"] for a in outcome.attempts] == [1, 1, 1]
    assert sum("retrying" in ln for ln in lines) == 2 and "[tiny-moe] boom" in lines
    logs = sorted(p.name for p in (tmp_path / "sweeps" / "outlier-t" / "logs").iterdir())
    assert logs == [f"deploy_tiny-moe_{i}.log" for i in (1, 2, 3)]
    # Bad input (exit 2) is not retried.
    sweep.script = "raise SystemExit(2)"
    assert len(sweep.run([spec])["tiny-moe"].attempts) == 1


def test_sweep_interrupt_reaches_every_worker_once(tmp_path: Path) -> None:
    started = threading.Event()
    count = 0

    def out(line: str) -> None:
        nonlocal count
        if line.endswith("] started"):
            count += 1
            if count == 2:
                started.set()

    sweep = _ScriptedSweep(_sweep_opts(tmp_path, retries=3), out=out)
    # A worker that exits 130 on its first SIGINT (as deploy.py does after its cleanup).
    sweep.script = ("import signal, sys\n"
                    "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
                    "print('started', flush=True)\nsignal.pause()")
    specs = [get_spec("tiny-moe"), get_spec("tiny-moe-planted")]
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(sweep.run(specs)))  # type: ignore[arg-type]
    t.start()
    assert started.wait(60)
    assert sweep.interrupt() == 2
    t.join(60)
    assert {m: (o.status, len(o.attempts)) for m, o in result.items()} == {
        "tiny-moe": ("cancelled", 1), "tiny-moe-planted": ("cancelled", 1)}
