"""Local-target commands start with an empty signal mask (as sshd's children do).

bifrost's event-loop thread blocks SIGINT/SIGTERM/SIGHUP so they reach the main thread; a child
spawned from it inherited that mask, so `logs -f`/`Job.follow` on `local` never ended (its
follower `tail` ignored the TERM that stops it) and `kill` could not TERM a local job.
"""

from __future__ import annotations

import pytest

from bifrost import Host


@pytest.fixture
def local(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with Host("local") as h:
        yield h


def test_local_command_has_an_empty_signal_mask(local: Host) -> None:
    r = local.exec("grep SigBlk /proc/self/status")
    assert r.stdout.split()[1] == "0000000000000000"


@pytest.mark.timeout(60)
def test_follow_of_a_local_job_ends_with_the_job(local: Host) -> None:
    lines: list[str] = []
    job = local.run("echo one; sleep 0.5; echo two")
    status = job.follow(lines.append)
    assert status.state == "succeeded" and lines == ["one", "two"]


@pytest.mark.timeout(60)
def test_kill_terms_a_local_job(local: Host) -> None:
    job = local.run("trap 'echo got-term; exit 9' TERM; sleep 30 & wait")
    while not local.exec(f"cat ~/.bifrost/jobs/{job.id}/pid 2>/dev/null", warn=True).stdout:
        pass  # the wrapper writes its pid first thing
    assert job.kill(grace=20) == "cancelled"
    assert "got-term" in job.logs()
