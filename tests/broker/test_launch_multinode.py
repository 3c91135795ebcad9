"""Multi-node tasks: N boxes as one torchrun job, all or nothing, on `local` and the simulator.

A real 2-node `torchrun` (gloo, CPU) all-reduces each rank's value; rank 0 writes the sum, which
is checked after the pull, with each node's environment as documented. Failure paths: a node that
never becomes ready (nothing runs, every box terminated) and a node whose job exits 3 mid-run
(the other is stopped, the launch names the node, nothing leaks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from broker.journal import Journal
from broker.testing import RunPodSimulator

pytest.importorskip("torch", reason="the multi-node job runs torch.distributed (experiments extra)")

VENV_BIN = str(Path(sys.executable).parent)
BROKER = [str(Path(VENV_BIN) / "broker")]

ALLREDUCE = '''
import json, os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
names = ["BROKER_NODE_RANK", "BROKER_NUM_NODES", "BROKER_NODE_IPS", "BROKER_GPUS_PER_NODE",
         "BROKER_MASTER_ADDR", "BROKER_MASTER_PORT", "MASTER_ADDR", "MASTER_PORT", "NNODES",
         "NODE_RANK", "WORLD_SIZE", "RANK"]
os.makedirs("out", exist_ok=True)
with open(f"out/env-{rank}.json", "w") as f:
    json.dump({n: os.environ.get(n) for n in names}, f)
if rank == 0:
    with open("out/sum.json", "w") as f:
        json.dump({"sum": value.item(), "world": world}, f)
dist.destroy_process_group()
'''


def project(tmp: Path) -> Path:
    p = tmp / "proj"
    p.mkdir(exist_ok=True)
    (p / "allreduce.py").write_text(ALLREDUCE)
    return p


def broker(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy(), stdin=subprocess.DEVNULL)


def entries() -> list:
    return Journal.default(Path(os.environ["BROKER_STATE_DIR"])).all_entries()


def torchrun_task(tmp: Path, name: str, **resources: object) -> Path:
    task = tmp / f"{name}.yaml"
    task.write_text(yaml.safe_dump({
        "name": name, "nodes": 2, "engine": "torchrun", "nproc_per_node": 1,
        "resources": resources, "workdir": "proj", "run": "allreduce.py",
        # The job's torchrun and torch are the test's own (nothing is synced onto the boxes).
        "env": {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"},
        "outputs": ["out"], "outputs_from": "all",
    }))
    return task


def check_allreduce(res: Path) -> None:
    assert json.loads((res / "node-0" / "out" / "sum.json").read_text()) == {"sum": 3.0, "world": 2}
    for rank in (0, 1):
        env = json.loads((res / f"node-{rank}" / "out" / f"env-{rank}.json").read_text())
        assert env["BROKER_NODE_RANK"] == env["NODE_RANK"] == env["RANK"] == str(rank)
        assert env["BROKER_NUM_NODES"] == env["NNODES"] == "2" and env["WORLD_SIZE"] == "2"
        assert env["BROKER_NODE_IPS"] == "127.0.0.1\n127.0.0.1"
        assert env["BROKER_MASTER_ADDR"] == env["MASTER_ADDR"] == "127.0.0.1"
        assert env["BROKER_MASTER_PORT"] == env["MASTER_PORT"] and int(env["MASTER_PORT"]) > 0
    assert (res / "job-node-0.log").exists() and (res / "job-node-1.log").exists()


def test_two_node_torchrun_on_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    project(tmp_path)
    task = torchrun_task(tmp_path, "ddp", providers=["local"])
    r = broker("launch", str(task), "--results", str(tmp_path / "res"))
    assert r.returncode == 0, r.stdout + r.stderr
    check_allreduce(tmp_path / "res" / "ddp")
    assert "node 0 rented" in r.stdout and "node 1 rented" in r.stdout
    assert len(entries()) == 2 and all(not e.is_open for e in entries())


pytestmark_sim = pytest.mark.skipif(
    os.geteuid() != 0, reason="simulated pods log in as root only when the tests run as root"
)


@pytest.fixture
def sim_env(env: RunPodSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> RunPodSimulator:
    monkeypatch.chdir(tmp_path)
    project(tmp_path)
    return env


def live(sim: RunPodSimulator) -> list[str]:
    return [p.id for p in sim.pods(include_terminated=False)]


@pytestmark_sim
def test_two_node_torchrun_on_the_simulator(sim_env: RunPodSimulator, tmp_path: Path) -> None:
    name = f"ddp-{os.getpid()}"
    task = torchrun_task(tmp_path, name, query="gpu~A100 !spot", gpus=1, ttl="1h")
    r = broker("launch", str(task), "-y", "--results", str(tmp_path / "res"))
    assert r.returncode == 0, r.stdout + r.stderr
    check_allreduce(tmp_path / "res" / name)
    assert "[node 0]" in r.stdout or (tmp_path / "res" / name / "job-node-0.log").exists()
    pods = sim_env.pods(include_terminated=True)
    assert len(pods) == 2 and live(sim_env) == []


@pytestmark_sim
def test_a_node_that_never_becomes_ready_fails_the_launch_and_leaks_nothing(sim_env: RunPodSimulator, tmp_path: Path) -> None:
    sim_env.ssh_never_up(n=1, mode="refuse")
    task = tmp_path / "t.yaml"
    task.write_text(yaml.safe_dump({
        "name": f"never-{os.getpid()}", "nodes": 2, "workdir": "proj", "run": "touch ran-here",
        "retries": 0,
        "resources": {"query": "gpu~A100 !spot", "gpus": 1, "ready_timeout": 6, "n_offers": 1},
    }))
    r = broker("launch", str(task), "-y", "--json")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "did not come up" in r.stderr and "node" in r.stderr
    assert "run:" not in r.stderr  # no job started anywhere
    assert live(sim_env) == []
    assert all(not e.is_open for e in entries()) and len(entries()) >= 2


@pytestmark_sim
def test_a_node_whose_job_fails_stops_the_others_and_names_the_node(sim_env: RunPodSimulator, tmp_path: Path) -> None:
    task = tmp_path / "t.yaml"
    task.write_text(yaml.safe_dump({
        "name": f"fail1-{os.getpid()}", "nodes": 2, "workdir": "proj",
        "run": 'if [ "$BROKER_NODE_RANK" = 1 ]; then sleep 0.5; exit 3; fi; echo waiting; sleep 120',
        "resources": {"query": "gpu~A100 !spot", "gpus": 1, "ttl": "1h"},
    }))
    r = broker("launch", str(task), "-y", "--json", "--results", str(tmp_path / "res"))
    assert r.returncode == 3, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["failed_node"] == 1 and "node 1" in data["error"]
    assert "node 1's job" in r.stderr
    assert live(sim_env) == []
    assert all(not e.is_open for e in entries())
    # Node 0's job was stopped, not left to sleep out its 120 s.
    log0 = (tmp_path / "res" / f"fail1-{os.getpid()}" / "job-node-0.log").read_text()
    assert "waiting" in log0


@pytestmark_sim
def test_two_node_torchrun_on_own_hosts_through_the_ssh_provider(
    sshd_many: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    srv = sshd_many[0]  # "hosts" 127.0.0.2 … behind one sshd and one client key
    monkeypatch.setenv("BROKER_SSH_HOSTS", json.dumps(srv.targets()[:2]))
    monkeypatch.setenv("SSH_KEY_PATH", str(srv.client_key))
    monkeypatch.setenv("BROKER_PROVIDERS", "ssh")
    monkeypatch.chdir(tmp_path)
    project(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    name = f"own-{os.getpid()}"
    task = torchrun_task(tmp_path, name)
    data = yaml.safe_load(task.read_text())
    data["env"]["MASTER_PORT"] = str(port)
    task.write_text(yaml.safe_dump(data))
    r = broker("launch", str(task), "--results", str(tmp_path / "res"))
    assert r.returncode == 0, r.stdout + r.stderr
    res = tmp_path / "res" / name
    assert json.loads((res / "node-0" / "out" / "sum.json").read_text()) == {"sum": 3.0, "world": 2}
    env1 = json.loads((res / "node-1" / "out" / "env-1.json").read_text())
    ips = env1["BROKER_NODE_IPS"].split("\n")
    assert sorted(ips) == ["127.0.0.2", "127.0.0.3"] and env1["MASTER_ADDR"] == ips[0]
    assert env1["MASTER_PORT"] == str(port)
    # Both nodes may reach for the same first host; the loser's attempt is journaled too.
    assert len(entries()) >= 2 and all(not e.is_open for e in entries())
    for rank in (0, 1):
        shutil.rmtree(Path.home() / ".bifrost" / "workspaces" / f"{name}-node{rank}", ignore_errors=True)
