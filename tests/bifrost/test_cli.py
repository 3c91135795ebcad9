from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bifrost import Host
from bifrost.cli import main
from bifrost.testing import SSHServer


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bifrost.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "root@h:abc", "true"],
        ["exec", "root@h;rm -rf ~", "true"],
        ["logs", "never-started-job"],
        ["exec", "local", "true", "--env", "NOEQUALS"],
        ["status", "local", "../etc"],
    ],
)
def test_bad_input_is_one_line_no_traceback(args: list[str]) -> None:
    r = _cli(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_exec_mirrors_exit_code(sshd: SSHServer) -> None:
    r = _cli("exec", "-i", str(sshd.client_key), sshd.target, "echo hi; echo e >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "hi\n", "e\n")
    r = _cli("exec", "--json", "-i", str(sshd.client_key), sshd.target, "echo hi")
    assert r.returncode == 0 and json.loads(r.stdout)["stdout"] == "hi\n"


def test_run_logs_wait_jobs_flow(sshd: SSHServer, capsys: pytest.CaptureFixture[str]) -> None:
    key = str(sshd.client_key)
    assert (
        main(
            [
                "run",
                "-i",
                key,
                "--name",
                "cli job",
                sshd.target,
                "--",
                "echo",
                "from-cli;",
                "exit",
                "5",
            ]
        )
        == 0
    )
    job_id = capsys.readouterr().out.strip()
    assert main(["wait", "-i", key, job_id]) == 5  # target remembered from `run`
    capsys.readouterr()
    assert main(["logs", "-i", key, job_id]) == 0
    assert capsys.readouterr().out == "from-cli\n"
    assert main(["logs", "-f", "--tail", "1", "-i", key, sshd.target, job_id]) == 5
    assert capsys.readouterr().out == "from-cli\n"
    assert main(["status", "--json", "-i", key, job_id]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "failed"
    assert main(["jobs", "--json", "-i", key, sshd.target]) == 0
    assert job_id in [j["id"] for j in json.loads(capsys.readouterr().out)]
    assert main(["kill", "-i", key, job_id]) == 0
    assert "finished" in capsys.readouterr().out


def test_push_pull_upload_gpus(
    sshd: SSHServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    workspace: Callable[[Host, str], str],
) -> None:
    key = str(sshd.client_key)
    name = workspace(Host(sshd.target, identity_file=sshd.client_key), "cliproj")
    proj = tmp_path / "cliproj"
    proj.mkdir()
    (proj / "a.txt").write_text("a\n")
    assert main(["push", "--json", "--name", name, "-i", key, sshd.target, str(proj)]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 1
    assert main(["upload", "-i", key, sshd.target, str(proj / "a.txt"), "~/cli-up/a.txt"]) == 0
    assert main(["pull", "-i", key, sshd.target, "~/cli-up/a.txt", str(tmp_path / "b.txt")]) == 0
    assert (tmp_path / "b.txt").read_text() == "a\n"
    capsys.readouterr()
    assert main(["gpus", "--json", "-i", key, sshd.target]) == 0
    report = json.loads(capsys.readouterr().out)[0]
    assert report["available"] is False and "nvidia-smi" in report["message"]


def test_nvidia_smi_parsing() -> None:
    from bifrost.gpus import parse_nvidia_smi

    text = (
        "0, GPU-aaa, NVIDIA H100 80GB HBM3, 1234, 81559, 97\n"
        "1, GPU-bbb, NVIDIA H100 80GB HBM3, 0, 81559, 0\n"
        "BIFROST_APPS\nGPU-aaa, 4242, python, 1200\n"
    )
    r = parse_nvidia_smi("h", text)
    assert r.available and len(r.gpus) == 2
    assert r.gpus[0].memory_used_mib == 1234 and r.gpus[0].utilization_pct == 97
    assert r.gpus[0].processes[0].pid == 4242 and not r.gpus[1].processes


@pytest.mark.parametrize(
    "args",
    [
        ["exec", "--timeout", "-1", "local", "true"],
        ["exec", "--timeout", "nan", "local", "true"],
        ["exec", "local", ""],
        ["run", "local", "--", ""],
        ["run", "local", "--", "  "],
        ["wait", "--timeout", "-5", "local", "some-job"],
        ["logs", "--tail=-3", "local", "some-job"],
        ["exec", "-i", "/no/such/key", "root@127.0.0.1:1", "true"],
        ["exec", "user@host:²", "true"],
        ["forget", "::1:2222:zz"],
    ],
)
def test_more_bad_input_is_exit_2(args: list[str]) -> None:
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_missing_key_file_is_not_retried(tmp_path: Path) -> None:
    from bifrost import AuthError

    t = Host("root@127.0.0.1:1", identity_file=tmp_path / "nope", retries=4)
    with pytest.raises(AuthError, match="does not exist") as info:
        t.connect()
    assert info.value.attempts == 0


def test_api_rejects_bad_timeout_and_empty_job() -> None:
    h = Host("local")
    for bad in (-1.0, float("nan"), 0.0):
        with pytest.raises(ValueError, match="timeout"):
            h.exec("true", timeout=bad)
    with pytest.raises(ValueError, match="empty"):
        h.run("   ")
