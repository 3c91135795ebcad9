"""The sweep harness with fake training commands (tiny ``python -c`` scripts)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

from experiments.common.sweep import (
    RESULT_KEYS,
    ExperimentSpec,
    SweepError,
    SweepOptions,
    expand_matrix,
    load_results,
    result_path,
    run_sweep,
)

OK = (
    "import json, os; "
    "json.dump({'metrics': {'test_acc': 0.5, 'val_acc': 0.6},"
    " 'efficiency': {'trainable_params': 7}},"
    " open(os.environ['SWEEP_METRICS_FILE'], 'w')); print('trained')"
)
CRASH = "import sys; print('about to fail'); raise SystemExit('boom: CUDA out of memory')"
NO_METRICS = "print('forgot to write metrics')"


def spec(key: str, code: str, **config: object) -> ExperimentSpec:
    cmd = [sys.executable, "-c", code]
    return ExperimentSpec(key=key, config={"name": key, **config}, command=cmd)


def opts(tmp_path: Path, **kw: object) -> SweepOptions:
    return SweepOptions(output_dir=tmp_path / "sweep", stream=io.StringIO(), **kw)  # type: ignore[arg-type]


def test_expand_matrix_filters_and_rejects_typos() -> None:
    axes = {"model": ["ast", "htsat"], "strategy": ["lora", "ia3"], "aug": [True, False]}
    full = expand_matrix(axes)
    assert len(full) == 8
    assert full[0] == {"model": "ast", "strategy": "lora", "aug": True}
    sub = expand_matrix(axes, filters={"model": ["htsat"], "aug": [True]})
    assert sub == [
        {"model": "htsat", "strategy": "lora", "aug": True},
        {"model": "htsat", "strategy": "ia3", "aug": True},
    ]
    assert len(expand_matrix(axes, where=lambda c: c["strategy"] != "ia3")) == 4
    with pytest.raises(SweepError, match="unknown value"):
        expand_matrix(axes, filters={"model": ["asst"]})
    with pytest.raises(SweepError, match="unknown axis"):
        expand_matrix(axes, filters={"modle": ["ast"]})


def test_completed_failed_and_missing_metrics(tmp_path: Path) -> None:
    o = opts(tmp_path)
    s = run_sweep([spec("good", OK), spec("crash", CRASH), spec("nometrics", NO_METRICS)], o)
    assert (s.completed, s.failed, s.skipped) == (1, 2, 0)
    out = o.output_dir
    good = json.loads(result_path(out, "good").read_text())
    assert list(good)[: len(RESULT_KEYS)] == list(RESULT_KEYS)
    assert good["status"] == "completed"
    assert good["error"] is None
    assert good["metrics"]["test_acc"] == 0.5
    assert good["efficiency"]["trainable_params"] == 7
    assert good["experiment_id"].startswith("good_")
    assert good["config"]["name"] == "good"
    assert "trained" in Path(good["log_file"]).read_text()
    crash = json.loads(result_path(out, "crash").read_text())
    assert crash["status"] == "failed"
    assert "exit status 1" in crash["error"]
    assert "out of memory" in crash["error"]  # last log line surfaces in the error
    assert crash["metrics"] == {}
    err_logs = sorted(p.name for p in (out / "errors").iterdir())
    assert len(err_logs) == 2
    assert all(n.endswith("_error.log") for n in err_logs)
    assert "about to fail" in (out / "errors" / f"{crash['experiment_id']}_error.log").read_text()
    nm = json.loads(result_path(out, "nometrics").read_text())
    assert nm["status"] == "failed"
    assert "no metrics file" in nm["error"]
    progress = o.stream.getvalue()  # type: ignore[union-attr]
    assert "Completed: 1, Failed: 2, Skipped: 0" in progress
    assert "Estimated time remaining" in progress
    assert "Progress: 3/3 (100.0%)" in progress


def test_resume_skips_completed_and_reruns_failed(tmp_path: Path) -> None:
    first = run_sweep([spec("a", OK), spec("b", CRASH)], opts(tmp_path))
    assert (first.completed, first.failed) == (1, 1)
    a_before = result_path(tmp_path / "sweep", "a").read_text()
    # Without --resume/--force existing results are protected.
    with pytest.raises(SweepError, match="--resume"):
        run_sweep([spec("a", OK), spec("b", OK)], opts(tmp_path))
    again = run_sweep([spec("a", OK), spec("b", OK)], opts(tmp_path, resume=True))
    assert (again.completed, again.failed, again.skipped) == (1, 0, 1)
    assert result_path(tmp_path / "sweep", "a").read_text() == a_before  # untouched
    b = json.loads(result_path(tmp_path / "sweep", "b").read_text())
    assert b["status"] == "completed"
    forced = run_sweep([spec("a", OK), spec("b", OK)], opts(tmp_path, force=True))
    assert (forced.completed, forced.skipped) == (2, 0)
    with pytest.raises(SweepError, match="contradict"):
        run_sweep([spec("a", OK)], opts(tmp_path, force=True, resume=True))


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # The child spawns a grandchild that would outlive a plain kill of the child.
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    t0 = time.monotonic()
    s = run_sweep([spec("slow", code)], opts(tmp_path, timeout_s=1.5))
    assert time.monotonic() - t0 < 20
    r = s.results[0]
    assert r["status"] == "timeout"
    assert "timed out after 1.5 s" in r["error"]
    gpid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(gpid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("grandchild survived the timeout")
    assert (tmp_path / "sweep" / "errors" / f"{r['experiment_id']}_error.log").is_file()


def test_parallel_workers_and_partial_loading(tmp_path: Path) -> None:
    sleepy = "import time; time.sleep(1.0); " + OK
    specs = [spec(f"e{i}", sleepy) for i in range(4)]
    t0 = time.monotonic()
    s = run_sweep(specs, opts(tmp_path, workers=4))
    elapsed = time.monotonic() - t0
    assert s.completed == 4
    assert elapsed < 3.5  # 4 x 1 s sequentially would be > 4 s
    # A half-written or foreign file in runs/ is reported, not fatal.
    (tmp_path / "sweep" / "runs" / "junk.json").write_text("{not json")
    good, bad = load_results(tmp_path / "sweep")
    assert len(good) == 4
    assert [p.name for p in bad] == ["junk.json"]
    assert not list((tmp_path / "sweep" / "runs").glob("*.tmp"))


def test_bad_command_and_bad_options(tmp_path: Path) -> None:
    s = run_sweep(
        [ExperimentSpec("nope", {}, ["/nonexistent/trainer"])], opts(tmp_path, timeout_s=5)
    )
    assert s.results[0]["status"] == "failed"
    assert "could not start command" in s.results[0]["error"]
    with pytest.raises(SweepError, match="workers"):
        run_sweep([spec("x", OK)], opts(tmp_path, workers=0, force=True))
    with pytest.raises(SweepError, match="duplicate"):
        run_sweep([spec("x", OK), spec("x", OK)], opts(tmp_path, force=True))


def test_dry_run_runs_nothing(tmp_path: Path) -> None:
    o = opts(tmp_path, dry_run=True)
    s = run_sweep([spec("a", OK)], o)
    assert s.completed == 0
    assert not result_path(o.output_dir, "a").exists()
    assert "Would run a" in o.stream.getvalue()  # type: ignore[union-attr]
