"""`broker launch` / `broker sweep` on the `local` provider, and the task spec's validation.

Real `broker` processes (a new interpreter per call, as a user types them), a real SQLite journal,
real detached bifrost jobs in a temp $HOME. The simulator-backed tests are in test_launch_sim.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from broker import F
from broker.journal import Journal
from broker.launch import LaunchStore, Task, TaskError, load_task
from broker.launch.sweep import Sweep, load_sweep

BROKER = [str(Path(sys.executable).parent / "broker")]


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with a job script, a temp $HOME for the `local` box, and the cwd."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    p = tmp_path / "proj"
    p.mkdir()
    (p / "job.sh").write_text(
        'echo "task=$BROKER_TASK rank=$BROKER_NODE_RANK nodes=$BROKER_NUM_NODES"\n'
        'mkdir -p out && echo 42 > out/answer.txt\n'
        'echo "secret-length=${#MY_SECRET}"\n'
        'exit "${EXIT_WITH:-0}"\n'
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_task(dir_: Path, name: str = "hello", **extra: object) -> Path:
    data: dict[str, object] = {
        "name": name,
        "resources": {"providers": ["local"]},
        "workdir": "proj",
        "run": "bash job.sh",
        "outputs": ["out"],
    }
    data.update(extra)
    path = dir_ / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def broker(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BROKER, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def journal_entries() -> list:
    return Journal.default(Path(os.environ["BROKER_STATE_DIR"])).all_entries()


# -- the task spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: t\nrun: x\nresorces: {}\n", "unknown key 'resorces'; did you mean 'resources'?"),
        ("name: t\nrun: x\nresources: {gpu: 2}\n", "unknown key 'resources.gpu'; did you mean 'resources.gpus'?"),
        ("name: t\noutputs: [a]\n", "'run' is required"),
        ("name: t\nrun: x\noutputs: [../up]\n", "outputs: '../up' escapes the workdir"),
        ("name: t\nrun: x\noutputs: [/etc]\n", "outputs: '/etc' is absolute"),
        ("name: t\nrun: x\nresources: {query: 'gpu~A100 vram>=80XB'}\n", "resources.query: bad query"),
        ("name: t\nrun: x\nresources: {ttl: 5s}\n", "resources.ttl: ttl '5s' is shorter than one minute"),
        ("name: 'a b'\nrun: x\n", "name: 'a b' is not a usable name"),
        ("name: t\nrun: '  '\n", "run: is empty"),
        ("- a\n- b\n", "expected a mapping"),
        ("name: t\nrun: [unclosed\n", "not valid YAML at line"),
    ],
)
def test_bad_task_files_get_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TaskError) as info:
        load_task(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_task_file_on_the_cli_exits_2_with_one_line(proj: Path) -> None:
    path = proj / "bad.yaml"
    path.write_text("name: t\nrun: x\nresorces: {}\n")
    r = broker("launch", str(path), "-y")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {path}: unknown key 'resorces'; did you mean 'resources'?"
    assert "Traceback" not in r.stderr
    assert journal_entries() == []


def test_set_overrides_builder_query_and_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "run": "python train.py", "workdir": ".",
        "resources": {"query": {"gpu": "~A100", "vram": ">=80GB", "spot": False}},
    }))
    task = load_task(path, ["resources.gpus=2", "run=echo true", "retries=4", "env.SEED=7"])
    assert task.resources.gpus == 2 and task.run == "echo true"
    assert task.retries.max == 4 and task.env == {"SEED": "7"}
    assert sorted(task.resources.query_text().split()) == ["!spot", "gpu~A100", "vram>=80GB"]
    assert task.workdir_path() == tmp_path.resolve()  # relative to the file, not the cwd
    again = tmp_path / "again.yaml"
    again.write_text(task.to_yaml())
    back = load_task(again)
    assert back.model_dump(exclude={"base_dir"}) == task.model_dump(exclude={"base_dir"})
    with pytest.raises(TaskError, match="use key=value"):
        load_task(path, ["resources.gpus"])


def test_task_in_python_with_a_builder_query() -> None:
    t = Task(name="py", run="nvidia-smi", resources={"query": F.gpu_type.contains("H100") & (F.gpu_count >= 2)})
    assert "H100" in t.resources.query_text() and "gpus>=2" in t.resources.query_text()


def test_sweep_expands_matrix_with_include_exclude_and_unique_names(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "sw",
        "task": {"name": "train-{{ lr }}-{{ seed }}", "run": "python t.py --lr {{ lr }}", "workdir": None},
        "matrix": {"lr": [0.1, 0.01], "seed": [1, 2]},
        "exclude": [{"lr": 0.01, "seed": 2}],
        "include": [{"lr": 0.5, "seed": 9}],
    }))
    sw = load_sweep(path)
    names = [t.name for t in sw.tasks()]
    assert names == ["train-0.1-1", "train-0.1-2", "train-0.01-1", "train-0.5-9"]
    assert sw.tasks()[3].run == "python t.py --lr 0.5"
    assert sw.tasks()[0].env["SWEEP_LR"] == "0.1"
    bad = Sweep(name="x", task={"name": "same", "run": "{{ nope }}"}, matrix={"a": [1]})
    with pytest.raises(TaskError, match="placeholder"):
        bad.tasks()


# -- launches on the local provider (new broker processes) --------------------------------------


def test_launch_on_local_end_to_end(proj: Path) -> None:
    task = write_task(proj, secrets=["MY_SECRET"])
    r = broker("launch", str(task), "--results", str(proj / "results"), env={"MY_SECRET": "hunter22"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    # One line per stage, the log streamed, the secret's value nowhere.
    for stage in ("plan:", "rent:", "push:", "run:", "job: succeeded", "pull:", "terminate:", "done:"):
        assert stage in out, out
    assert "  | task=hello rank=0 nodes=1" in out
    assert "secret-length=8" in out and "hunter22" not in out + r.stderr
    res = proj / "results" / "hello"
    assert (res / "out" / "answer.txt").read_text() == "42\n"
    assert "secret-length=8" in (res / "job.log").read_text()
    record = json.loads((res / "launch.json").read_text())
    assert record["state"] == "succeeded" and record["exit_code"] == 0
    # Only the final folder: the temp pull dir was renamed away.
    assert [p.name for p in (proj / "results").iterdir()] == ["hello"]
    [entry] = journal_entries()
    assert not entry.is_open and entry.status == "terminated" and entry.tag == "hello"
    # The local workspace copy is removed with the box.
    assert list((proj / "home" / ".bifrost" / "workspaces").iterdir()) == []


def test_exit_code_is_the_jobs_and_outputs_still_come_back(proj: Path) -> None:
    task = write_task(proj, env={"EXIT_WITH": 7})
    r = broker("launch", str(task), "--results", str(proj / "results"), "--json")
    assert r.returncode == 7, r.stderr
    data = json.loads(r.stdout)
    assert data["state"] == "failed" and data["exit_code"] == 7
    assert (proj / "results" / "hello" / "out" / "answer.txt").exists()
    [entry] = journal_entries()
    assert not entry.is_open
    rec = LaunchStore.default(os.environ["BROKER_STATE_DIR"]).latest("hello")
    assert rec is not None and rec.state == "failed" and rec.exit_code == 7


def test_dry_run_rents_nothing(proj: Path) -> None:
    task = write_task(proj)
    r = broker("launch", str(task), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["offers"][0]["provider"] == "local" and plan["push_files"] == 1
    assert journal_entries() == []


def test_setup_runs_once_per_box_and_missing_secret_rents_nothing(proj: Path) -> None:
    task = write_task(proj, setup="echo ran >> $HOME/setup-count", secrets=["NOT_SET_ANYWHERE"])
    r = broker("launch", str(task))
    assert r.returncode == 2
    assert "NOT_SET_ANYWHERE" in r.stderr and journal_entries() == []
    task = write_task(proj, setup="echo ran >> $HOME/setup-count")
    assert broker("launch", str(task), "--results", str(proj / "r")).returncode == 0
    assert (proj / "home" / "setup-count").read_text() == "ran\n"


def test_detach_then_attach_from_a_new_process(proj: Path) -> None:
    flag = proj / "go"
    task = write_task(proj, run=f"while [ ! -f {flag} ]; do sleep 0.1; done; bash job.sh")
    r = broker("launch", str(task), "--detach")
    assert r.returncode == 0, r.stderr
    assert "broker launch --attach hello" in r.stdout
    [entry] = journal_entries()
    assert entry.is_open  # the box outlives the launching process, as asked
    rec = LaunchStore.default(os.environ["BROKER_STATE_DIR"]).latest("hello")
    assert rec is not None and rec.state == "detached" and rec.job_ids
    # `instances list` says what the box is doing.
    listed = broker("instances", "list", "--json")
    [row] = json.loads(listed.stdout)
    assert row["launch"] == {"task": "hello", "sweep": None, "state": "detached", "job": rec.job_ids[0]}
    table = broker("instances", "list")
    assert "hello: detached" in table.stdout
    flag.touch()
    r = broker("launch", "--attach", "hello", "--results", str(proj / "results"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (proj / "results" / "hello" / "out" / "answer.txt").exists()
    assert not journal_entries()[0].is_open
    r = broker("launch", "--attach", "hello")
    assert r.returncode == 2 and "already ended (succeeded)" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_mid_run_stops_the_job_and_terminates_the_box(proj: Path, sig: signal.Signals) -> None:
    marker = proj / "home" / "job-pid"
    task = write_task(proj, run=f"echo $$ > {marker}; echo started; sleep 60; echo never")
    proc = subprocess.Popen(
        [*BROKER, "launch", str(task)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "| started" in line:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, out + err
    assert "interrupted" in err and "Traceback" not in err
    [entry] = journal_entries()
    assert not entry.is_open and entry.status == "terminated"
    pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the job's process survived the interrupted launch")
    rec = LaunchStore.default(os.environ["BROKER_STATE_DIR"]).latest("hello")
    assert rec is not None and rec.state == "cancelled"


def test_sweep_on_local_with_status_and_leak_check(proj: Path) -> None:
    spec = proj / "sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "loc",
        "task": {"name": "t-{{ n }}", "resources": {"providers": ["local"]}, "workdir": "proj",
                 "run": "EXIT_WITH=0; [ {{ n }} != 3 ] || EXIT_WITH=3; export EXIT_WITH; bash job.sh",
                 "outputs": ["out"]},
        "matrix": {"n": [1, 2, 3]},
    }))
    r = broker("sweep", str(spec), "--results", str(proj / "res"), "--max-parallel", "2", "--json")
    assert r.returncode == 1, r.stderr
    result = json.loads(r.stdout)
    states = {row["task"]: row["state"] for row in result["rows"]}
    assert states == {"t-1": "succeeded", "t-2": "succeeded", "t-3": "failed"}
    assert result["leaked"] == []
    st = broker("sweep", "--status", "loc", "--json")
    assert st.returncode == 0
    assert {row["task"]: row["exit_code"] for row in json.loads(st.stdout)["rows"]} == {
        "t-1": 0, "t-2": 0, "t-3": 3}
    assert all(not e.is_open and e.sweep == "loc" for e in journal_entries())


def test_launch_from_python_with_gpuclient(proj: Path) -> None:
    from broker import GPUClient

    events: list[tuple[str, str]] = []
    lines: list[str] = []
    task = Task(name="pyapi", workdir=str(proj / "proj"), run="bash job.sh", outputs=["out:."],
                resources={"providers": ["local"]})
    with GPUClient(providers=["local"]) as c:
        result = c.launch(task, results_dir=str(proj / "r"), on_event=lambda s, d: events.append((s, d)),
                          on_log=lines.append)
    assert result.exit_code == 0 and result.state == "succeeded"
    assert (proj / "r" / "pyapi" / "answer.txt").read_text() == "42\n"  # "out:." = contents
    assert [s for s, _ in events][:1] == ["plan"] and ("terminate" in [s for s, _ in events])
    assert "task=pyapi rank=0 nodes=1" in lines


def test_a_sweep_of_multi_node_tasks_on_local(proj: Path) -> None:
    spec = proj / "mn-sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "mn",
        "task": {"name": "mn-{{ n }}", "nodes": 2, "resources": {"providers": ["local"]},
                 "workdir": "proj", "run": "bash job.sh", "outputs": ["out"], "outputs_from": "all"},
        "matrix": {"n": [1, 2]},
    }))
    r = broker("sweep", str(spec), "--results", str(proj / "res"), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [row["state"] for row in rows] == ["succeeded", "succeeded"]
    for n in (1, 2):
        for rank in (0, 1):
            assert (proj / "res" / f"mn-{n}" / f"node-{rank}" / "out" / "answer.txt").exists()
        log = (proj / "res" / f"mn-{n}" / "job-node-1.log").read_text()
        assert f"task=mn-{n} rank=1 nodes=2" in log
    entries = journal_entries()
    assert len(entries) == 4 and all(not e.is_open and e.sweep == "mn" for e in entries)
