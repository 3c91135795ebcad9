from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
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
        ["exec", "local", "--env", "NOEQUALS", "true"],
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
                "echo from-cli; exit 5",
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


def test_gpus_without_processes_calls_nvidia_smi_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readiness probes ask for the GPU list only: one nvidia-smi call, not two."""
    calls = tmp_path / "calls"
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(
        "#!/bin/sh\n"
        f'echo "$1" >> {calls}\n'
        'case "$1" in\n'
        "  --query-gpu=*) echo '0, GPU-aaa, NVIDIA H100 80GB HBM3, 1200, 81559, 97' ;;\n"
        "  --query-compute-apps=*) echo 'GPU-aaa, 4242, python, 1200' ;;\n"
        "esac\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    with Host("local") as box:
        full = box.gpus()
        assert [p.pid for p in full.gpus[0].processes] == [4242]
        assert len(calls.read_text().splitlines()) == 2
        calls.unlink()
        light = box.gpus(processes=False)
    assert light.available
    assert [(g.name, g.memory_total_mib) for g in light.gpus] == [("NVIDIA H100 80GB HBM3", 81559)]
    assert light.gpus[0].processes == []
    assert calls.read_text().split() == [
        "--query-gpu=index,uuid,name,memory.used,memory.total,utilization.gpu"
    ]


def test_a_hung_nvidia_smi_is_no_gpu_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nvidia-smi hangs on a wedged driver: gpus(timeout=...) reports no usable GPU, says why,
    and leaves nothing running."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f"#!/bin/sh\necho $$ > {tmp_path / 'pid'}\nexec sleep 600\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    with Host("local") as box:
        report = box.gpus(processes=False, timeout=0.5)
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            box.gpus(timeout=0)
    assert not report.available
    assert report.gpus == []
    assert report.message == "nvidia-smi did not answer within 0.5s"
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the kill lands asynchronously
    assert not Path(f"/proc/{pid}").exists()


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
        ["exec", "--bogus", "local", "true"],
        ["exec", "local"],
        ["run", "-w", "local"],
        ["exec", "ssh -F /tmp/cfg root@h", "true"],
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


# -- argv rule (issue 17 item 4) and option parsing stopping at the command (issue 19.3) --------
def test_several_words_are_an_exact_argv(
    sshd: SSHServer, capsys: pytest.CaptureFixture[str]
) -> None:
    key = str(sshd.client_key)
    assert main(["exec", "-i", key, sshd.target, "--", "printf", r"[%s]\n", "a b", "$HOME"]) == 0
    assert capsys.readouterr().out == "[a b]\n[$HOME]\n"
    assert main(["exec", "-i", key, sshd.target, "--", "sh", "-c", "echo one; exit 3"]) == 3
    assert capsys.readouterr().out == "one\n"
    # One word stays a shell command line, as typed.
    assert main(["exec", "-i", key, sshd.target, "echo a | tr a b"]) == 0
    assert capsys.readouterr().out == "b\n"


def test_option_parsing_stops_at_the_command(
    sshd: SSHServer, capsys: pytest.CaptureFixture[str]
) -> None:
    key = str(sshd.client_key)
    assert main(["exec", sshd.target, "-i", key, "ls", "-ld", "/"]) == 0
    assert capsys.readouterr().out.startswith("d")
    # -w x after the command's first word belongs to the command, not to `run -w`.
    assert main(["run", sshd.target, "-i", key, "--name", "argv", "--cwd", "/tmp",
                 "sh", "-c", 'echo "$@"; exit 4', "sh", "-w", "x"]) == 0  # fmt: skip
    job_id = capsys.readouterr().out.strip()
    assert main(["wait", job_id]) == 4  # target *and key* remembered from `run`
    capsys.readouterr()
    assert main(["logs", "--json", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["log"] == "-w x\n"
    # `--` still works, and options may come before TARGET
    assert main(["run", "-i", key, "-f", sshd.target, "--", "python3", "-c", "print(1)"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["1"]


def test_logs_follow_ends_on_a_lost_job_with_nonzero_exit(
    sshd: SSHServer, capsys: pytest.CaptureFixture[str]
) -> None:
    h = Host(sshd.target, identity_file=sshd.client_key)
    key = str(sshd.client_key)
    assert main(["run", "-i", key, sshd.target, "sleep 300"]) == 0
    job_id = capsys.readouterr().out.strip()
    h.exec(f"echo another-boot > ~/.bifrost/jobs/{job_id}/boot_id")
    try:
        r = _cli("logs", "-f", "-i", key, sshd.target, job_id, timeout=60)
        assert r.returncode == 255 and "lost" in r.stderr, r.stderr
    finally:
        h.exec(f"kill -KILL -- -$(cat ~/.bifrost/jobs/{job_id}/pid)", warn=True)
        h.close()


def test_json_on_kill_pull_upload_and_plain_tables(
    sshd: SSHServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = str(sshd.client_key)
    long_name = "a-rather-long-job-name-that-a-narrow-table-would-cut-" * 2
    assert main(["run", "-i", key, "--name", long_name, sshd.target, "sleep 300"]) == 0
    job_id = capsys.readouterr().out.strip()
    # Not a terminal: one line per job, nothing cut or wrapped, so grep finds the whole id.
    assert main(["jobs", "-i", key, sshd.target]) == 0
    listing = capsys.readouterr().out
    line = [ln for ln in listing.splitlines() if job_id in ln]
    assert len(line) == 1 and "running" in line[0] and "sleep 300" in line[0], listing
    assert "\x1b[" not in listing
    assert main(["kill", "--json", "--grace", "1", job_id]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "job": job_id, "target": sshd.target, "result": "cancelled"
    }  # fmt: skip
    (tmp_path / "up.txt").write_text("up\n")
    assert main(["upload", "--json", "-i", key, sshd.target, str(tmp_path / "up.txt"),
                 "~/cli-json-up.txt"]) == 0  # fmt: skip
    up = json.loads(capsys.readouterr().out)
    assert up["remote"].endswith("/cli-json-up.txt")
    assert main(["pull", "--json", "-i", key, sshd.target, "~/cli-json-up.txt",
                 str(tmp_path / "down.txt")]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["dest"] == str(tmp_path / "down.txt")
    assert (tmp_path / "down.txt").read_text() == "up\n"
    assert main(["pull", "--json", "-i", key, sshd.target, "--job", job_id, str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["dest"] == str(tmp_path / job_id)


def test_version_help_and_completion(tmp_path: Path) -> None:
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("bifrost ")
    for args in (["-h"], ["exec", "-h"], ["run", "--help"], ["logs", "-h"]):
        r = _cli(*args)
        assert r.returncode == 0 and "usage: bifrost" in r.stdout, args
        assert "<bool>" not in r.stdout and "<str>" not in r.stdout
    script = tmp_path / "c.bash"
    script.write_text(_cli("completion", "bash").stdout)
    probe = (
        f"source {script}; COMP_WORDS=(bifrost ex); COMP_CWORD=1; _bifrost; "
        'echo "${COMPREPLY[@]}"; COMP_WORDS=(bifrost logs --fo); COMP_CWORD=2; _bifrost; '
        'echo "${COMPREPLY[@]}"'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["exec", "--follow"]
    zsh = tmp_path / "c.zsh"
    zsh.write_text(_cli("completion", "zsh").stdout)
    r2 = subprocess.run(["zsh", "-c", f"source {zsh} && echo ok"], capture_output=True, text=True)
    assert r2.stdout.strip() == "ok", r2.stderr
    fish = _cli("completion", "fish").stdout
    assert "-n '__fish_seen_subcommand_from logs' -l follow" in fish


def test_ssh_key_path_is_honoured_and_remembered(
    sshd: SSHServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("BIFROST_IDENTITY_FILE", raising=False)
    monkeypatch.setenv("SSH_KEY_PATH", str(sshd.client_key))  # broker's setting
    assert main(["exec", sshd.target, "echo", "via-broker-key"]) == 0
    assert main(["run", sshd.target, "echo job-output"]) == 0
    job_id = capsys.readouterr().out.splitlines()[-1]
    monkeypatch.delenv("SSH_KEY_PATH")
    assert main(["wait", job_id]) == 0  # the index remembers the key, not only the host
    capsys.readouterr()
    assert main(["logs", job_id]) == 0
    assert capsys.readouterr().out == "job-output\n"
    monkeypatch.setenv("SSH_KEY_PATH", "/no/such/key")
    assert main(["exec", sshd.target, "true"]) == 2
    assert "SSH_KEY_PATH=/no/such/key: no such key file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "target", "command", "opts"),
    [
        (["exec", "root@a:22,root@b:22", "nvidia-smi", "-L"], "root@a:22,root@b:22",
         ["nvidia-smi", "-L"], {}),
        (["run", "h", "python", "train.py", "-w", "x"], "h", ["python", "train.py", "-w", "x"],
         {"workspace": None}),
        (["run", "h", "-w", "proj", "python", "train.py", "-w", "x"], "h",
         ["python", "train.py", "-w", "x"], {"workspace": "proj"}),
        (["run", "-f", "h", "--", "-w"], "h", ["-w"], {"follow": True}),
        (["exec", "-e", "A=1", "h", "--json", "ls", "--json"], "h", ["ls", "--json"],
         {"json": True, "env": ["A=1"]}),
        (["exec", "--timeout=5", "h", "--", "x"], "h", ["x"], {"timeout": 5.0}),
    ],
)  # fmt: skip
def test_option_parsing_stops_at_the_first_command_word(
    argv: list[str], target: str, command: list[str], opts: dict[str, object]
) -> None:
    from bifrost.cli import _parse, build_parser, split_command

    ns = _parse(argv)
    assert (ns.target, ns.command) == (target, command)
    for k, v in opts.items():
        assert getattr(ns, k) == v
    # exec's fast parse and argparse agree
    if argv[0] == "exec":
        sub = build_parser("exec")._subparsers._group_actions[0].choices["exec"]  # type: ignore[union-attr]
        at = split_command(sub, argv[1:], 1)
        full = sub.parse_intermixed_args(argv[1:][:at])
        rest = argv[1:][at:]
        full.command = rest[1:] if rest[:1] == ["--"] else rest
        assert vars(full) | {"func": None} == vars(ns) | {"func": None}


def test_exec_streams_output_larger_than_it_keeps(sshd: SSHServer) -> None:
    """`bifrost exec` (direct, no holder) streams output without also keeping it: its memory
    stays far below the output's size (--json, which prints it, is what keeps output)."""
    import threading

    size = 256 * 1024 * 1024
    env = {**os.environ, "BIFROST_HOLD": "0"}
    p = subprocess.Popen(
        [sys.executable, "-m", "bifrost.cli", "exec", "-i", str(sshd.client_key), sshd.target,
         f"head -c {size} /dev/zero"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    got = [0]

    def drain() -> None:
        assert p.stdout is not None
        while chunk := p.stdout.read(1 << 20):
            got[0] += len(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    peak_mib = 0.0
    while p.poll() is None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):  # the process's peak resident memory so far
                    peak_mib = max(peak_mib, int(line.split()[1]) / 1024)
        time.sleep(0.05)
    reader.join(timeout=60)
    assert p.returncode == 0, p.stderr.read() if p.stderr else ""
    assert got[0] == size
    assert 0 < peak_mib < 160, f"bifrost exec peaked at {peak_mib:.0f} MiB for {size >> 20} MiB"
