"""A slow provider: the search returns, and ``broker search`` exits, at the search timeout.

A real HTTP server on 127.0.0.1 answers after a long pause (like a provider under load); the
adapter is RunPod pointed at it with ``RUNPOD_API_URL``. Before the fix the worker thread kept the
process alive for the provider's whole answer time plus retries on a closed client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import SecretStr

from broker import GPUClient, load_settings
from broker.http import DeadlineExceededError, HttpClient, deadline
from broker.providers.runpod import RunPodProvider

ROOT = Path(__file__).resolve().parents[2]
PAUSE_S = 8.0


@dataclass
class SlowServer:
    """Answers every request with ``{}`` after ``pause`` seconds (or when released)."""

    pause: float
    release: threading.Event = field(default_factory=threading.Event)
    arrivals: list[float] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def slow_server() -> Iterator[SlowServer]:
    state = SlowServer(PAUSE_S)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.arrivals.append(time.monotonic())
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.release.wait(state.pause)
            body = json.dumps({"data": {"gpuTypes": []}}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up: exactly what the tests want

        do_GET = do_POST

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield state
    finally:
        state.release.set()  # no handler outlives the test
        server.shutdown()
        server.server_close()


def test_deadline_cuts_a_slow_request_and_its_retries(slow_server: SlowServer) -> None:
    sleeps: list[float] = []
    http = HttpClient("slow", slow_server.url, SecretStr("k"), sleep=sleeps.append)
    t0 = time.monotonic()
    with deadline(t0 + 0.5), pytest.raises(DeadlineExceededError, match="search timeout"):
        http.post("/graphql", {"query": "{}"})
    assert time.monotonic() - t0 < 1.5
    assert len(slow_server.arrivals) == 1  # not retried past the deadline
    assert sleeps == []
    http.close()
    with pytest.raises(DeadlineExceededError, match="closed"):
        http.post("/graphql", {})  # a straggler's retry after close() never reaches the server
    assert len(slow_server.arrivals) == 1


def test_client_search_reports_timeout_and_closes_the_client(slow_server: SlowServer) -> None:
    settings = load_settings()
    settings.runpod_api_key = SecretStr("k")
    settings.runpod_api_url = slow_server.url
    c = GPUClient(settings, providers=["runpod"], search_timeout_s=0.5)
    t0 = time.monotonic()
    res = c.search("gpus=1")
    assert time.monotonic() - t0 < 1.2
    (report,) = res.reports
    assert report.status == "timeout"
    assert report.error is not None and "no answer within 0.5s" in report.error["message"]
    assert "runpod" not in c._providers  # closed and dropped: the next search builds a fresh one
    # The worker stops on its own at the deadline (its request's timeout was cut to it).
    deadline_at = time.monotonic() + 2
    while time.monotonic() < deadline_at and any(
        t.name == "broker-search-runpod" for t in threading.enumerate()
    ):
        time.sleep(0.05)
    assert not any(t.name == "broker-search-runpod" for t in threading.enumerate())


def test_explicit_provider_instance_is_not_closed(slow_server: SlowServer) -> None:
    rp = RunPodProvider(SecretStr("k"), base_url=slow_server.url)
    res = GPUClient(load_settings(), providers=[rp], search_timeout_s=0.3).search()
    assert res.reports[0].status == "timeout"
    assert not rp._http._closed  # the caller's object stays usable


def test_broker_search_process_exits_at_the_timeout(
    slow_server: SlowServer, tmp_path: Path
) -> None:
    """The issue's reproduction: BROKER_SEARCH_TIMEOUT=1, a provider answering after 8 s."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            "BROKER_SEARCH_TIMEOUT": "1",
            "BROKER_PROVIDERS": "runpod",
            "RUNPOD_API_KEY": "test-key",
            "RUNPOD_API_URL": slow_server.url,
            "BROKER_CONFIG": str(tmp_path / "config.toml"),
            "BROKER_STATE_DIR": str(tmp_path / "state"),
            "BROKER_ENV_FILE": str(tmp_path / "no.env"),
        }
    )
    exe = Path(sys.executable).parent / "broker"
    proc = subprocess.Popen(
        [str(exe), "search", "gpus=1", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=PAUSE_S + 20)
    finally:
        if proc.poll() is None:
            proc.kill()
    exited = time.monotonic()
    assert slow_server.arrivals, err
    # From the moment the provider was asked until the process is gone: timeout + 0.5 s.
    assert exited - slow_server.arrivals[0] <= 1.5, (exited - slow_server.arrivals[0], err)
    assert len(slow_server.arrivals) == 1  # nothing retried after the search gave up
    reports = json.loads(out)["providers"]
    assert [(r["provider"], r["status"]) for r in reports] == [("runpod", "timeout")]
