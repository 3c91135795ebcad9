"""broker.testing's RunPod simulator, driven through the real RunPod adapter and real sshd pods."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import SecretStr

from bifrost import Host
from bifrost.errors import AuthError as SSHAuthError
from bifrost.errors import ConnectError
from bifrost.testing.sshd import keygen
from broker.config import Settings
from broker.errors import (
    AuthError,
    NoCapacityError,
    NotFoundError,
    ProviderUnavailableError,
)
from broker.providers.runpod import RunPodProvider
from broker.query import parse
from broker.testing import CAPACITY_MESSAGE, RunPodSimulator, SimGpuType
from broker.testing.fake_nvidia_smi import run as smi
from broker.testing.runpod_sim import parse_operation
from broker.types import CreateRequest, GPUOffer, Instance, InstanceStatus

KEY = "sim-SECRET-key-0123456789"
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100 80GB PCIe"
RTX4090 = "NVIDIA GeForce RTX 4090"
IS_ROOT = os.geteuid() == 0
# The adapter reports user root for direct SSH; a non-root sshd only lets its own user in.
needs_root = pytest.mark.skipif(not IS_ROOT, reason="pods log in as root only when run as root")

T = TypeVar("T")


def wait_for(fn: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def user_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("user-key") / "id_ed25519"
    return path, keygen(path)


@pytest.fixture(scope="module")
def sim(bifrost_home: Path) -> Iterator[RunPodSimulator]:
    with RunPodSimulator(api_key=KEY) as s:
        yield s


@pytest.fixture(autouse=True)
def clean_sim(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "sim" not in request.fixturenames:
        return
    s: RunPodSimulator = request.getfixturevalue("sim")
    s.clear_faults()
    s.provision_delay = s.startup_delay = s.port_delay = 0.0
    for p in s.pods(include_terminated=False):
        s.terminate_pod(p.id)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def rp(
    sim: RunPodSimulator, user_key: tuple[Path, str], sleeps: list[float]
) -> Iterator[RunPodProvider]:
    provider = RunPodProvider(
        SecretStr(KEY), ssh_public_key=user_key[1], base_url=sim.url, sleep=sleeps.append
    )
    yield provider
    provider.close()


def pick(
    rp: RunPodProvider,
    gpu: str = H100,
    *,
    cloud: str = "secure",
    spot: bool = False,
    count: int = 1,
) -> GPUOffer:
    offers = rp.search(parse(f"gpus>={count}"))
    for o in offers:
        if o.offer_id == f"{cloud}/{gpu}" and o.spot == spot:
            return o
    raise AssertionError(f"no offer {cloud}/{gpu} spot={spot} in {[o.key for o in offers]}")


def deploy(rp: RunPodProvider, name: str, gpu: str = H100, **request: Any) -> Instance:
    return rp.create(CreateRequest(offer=pick(rp, gpu), name=name, **request))


def running(rp: RunPodProvider, pod_id: str, timeout: float = 10.0) -> Instance:
    def ready() -> Instance | None:
        inst = rp.get(pod_id)
        ok = inst.status is InstanceStatus.RUNNING and inst.ssh is not None and inst.ssh.direct
        return inst if ok else None

    return wait_for(ready, timeout, f"pod {pod_id} RUNNING with direct SSH")


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def pid_gone(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- pure parts: no server ---------------------------------------------------------------------


def test_parse_operation_reads_name_and_root_field() -> None:
    assert parse_operation("query Pods { myself { pods { id } } }") == (
        "query",
        "Pods",
        "myself",
        "myself",
    )
    assert parse_operation(
        "mutation Deploy($input: PodFindAndDeployOnDemandInput!) { podFindAndDeployOnDemand(input: $input) { id } }"
    ) == ("mutation", "Deploy", "podFindAndDeployOnDemand", "podFindAndDeployOnDemand")
    assert parse_operation('{ p: pod(input: {podId: "x"}) { id } }') == ("query", None, "p", "pod")


GPUS = {
    "driver_version": "550.127.05",
    "cuda_version": "12.4",
    "gpus": [
        {"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559}
        for i in range(2)
    ],
    "processes": [{"gpu_uuid": "GPU-1", "pid": 42, "name": "python", "used_memory_mib": 1000}],
}


def test_fake_nvidia_smi_forms() -> None:
    out, code = smi(["-L"], GPUS)
    assert code == 0
    assert out == [
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)",
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)",
    ]
    out, code = smi(["--query-gpu=index,name,memory.total", "--format=csv"], GPUS)
    assert out[0] == "index, name, memory.total [MiB]"
    assert out[1] == "0, NVIDIA H100 80GB HBM3, 81559 MiB"
    out, _ = smi(
        ["--query-gpu=count,memory.total", "--format=csv,noheader,nounits", "-i", "1"], GPUS
    )
    assert out == ["1, 81559"]
    out, _ = smi(
        [
            "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
            "--format=csv,noheader,nounits",
        ],
        GPUS,
    )
    assert out == ["GPU-1, 42, python, 1000"]
    out, code = smi(["--query-gpu=bogus", "--format=csv"], GPUS)
    assert code == 2 and "not a valid field" in out[0]
    out, code = smi(["--query-gpu=name"], GPUS)
    assert code == 2
    _, code = smi(["-L"], {**GPUS, "driver_error": True})
    assert code == 9


# -- search ------------------------------------------------------------------------------------


def test_search_returns_catalogue_prices(rp: RunPodProvider, sim: RunPodSimulator) -> None:
    # One count per query: RunPod offers 1-8 GPU configurations under one offer id.
    offers = {(o.offer_id, o.spot): o for o in rp.search(parse("gpus=1"))}
    h100 = offers[(f"secure/{H100}", False)]
    assert h100.price_per_hour == 2.99
    assert h100.gpu_type == "H100 SXM 80GB"
    assert offers[(f"secure/{H100}", True)].price_per_hour == 1.75
    assert offers[(f"community/{RTX4090}", False)].price_per_hour == 0.34
    two = {(o.offer_id, o.spot): o for o in rp.search(parse("gpus=2"))}
    assert two[(f"community/{A100}", False)].price_per_hour == pytest.approx(2 * 1.19)
    assert two[(f"community/{A100}", False)].gpu_count == 2

    sim.update_gpu_type(H100, community_stock=None)
    try:
        ids = {o.offer_id for o in rp.search(parse("gpus>=1"))}
        assert f"community/{H100}" not in ids and f"secure/{H100}" in ids
    finally:
        sim.update_gpu_type(H100, community_stock="High")


def test_custom_catalogue_and_settings(bifrost_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gt = SimGpuType(
        id="NVIDIA RTX A6000",
        display_name="RTX A6000",
        memory_gb=48,
        secure_price=None,
        community_price=0.25,
        community_spot_price=0.1,
    )
    with RunPodSimulator(api_key="test", gpu_types=[gt]) as s:
        monkeypatch.setenv("RUNPOD_API_URL", s.url)
        monkeypatch.setenv("RUNPOD_API_KEY", "test")
        rp = RunPodProvider.from_settings(Settings())
        offers = rp.search(parse("gpus=1"))
        assert sorted((o.offer_id, o.price_per_hour) for o in offers) == [
            ("community/NVIDIA RTX A6000", 0.1),
            ("community/NVIDIA RTX A6000", 0.25),
        ]


def test_wrong_key_is_auth_error_and_never_logged(sim: RunPodSimulator) -> None:
    bad = RunPodProvider(SecretStr("wrong-key-777"), base_url=sim.url, sleep=lambda s: None)
    with pytest.raises(AuthError) as info:
        bad.search(parse("gpus>=1"))
    assert info.value.status_code == 401
    assert "wrong-key-777" not in str(info.value)
    assert sim.requests[-1].status == 401
    assert "wrong-key-777" not in repr(sim.requests) and KEY not in repr(sim.requests)
    bad.close()


# -- the whole life of a pod -------------------------------------------------------------------


@needs_root
def test_create_login_and_terminate(
    rp: RunPodProvider, sim: RunPodSimulator, user_key: tuple[Path, str]
) -> None:
    offer = pick(rp, H100, count=2)
    sim.slow_start(0.3)  # long enough to see STARTING on a get
    req = CreateRequest(offer=offer, name="broker-e2e0001", env={"HF_TOKEN": "hf_SECRET_tok"})
    inst = rp.create(req)
    assert inst.status is InstanceStatus.STARTING
    assert inst.name == "broker-e2e0001"
    assert inst.price_per_hour == pytest.approx(2 * 2.99)
    assert rp.get(inst.instance_id).status is InstanceStatus.STARTING

    ready = running(rp, inst.instance_id)
    assert ready.ssh is not None
    assert (ready.ssh.host, ready.ssh.user) == ("127.0.0.1", "root")
    assert ready.gpu_count == 2 and ready.gpu_type == "H100 SXM 80GB"

    with Host(ready.ssh.target, identity_file=user_key[0]) as box:
        listed = box.exec("nvidia-smi -L").stdout.splitlines()
        assert len(listed) == 2 and all(H100 in line for line in listed)
        env = box.exec('echo "$RUNPOD_POD_ID $HF_TOKEN"').stdout.split()
        assert env == [inst.instance_id, "hf_SECRET_tok"]
        report = box.gpus()
    assert report.available
    assert [g.name for g in report.gpus] == [H100, H100]
    assert report.gpus[0].memory_total_mib == 81559

    deploy = next(r for r in sim.requests if r.operation == "podFindAndDeployOnDemand")
    env_sent = {e["key"]: e["value"] for e in deploy.variables["input"]["env"]}
    assert env_sent == {"HF_TOKEN": "***", "PUBLIC_KEY": user_key[1]}
    assert "hf_SECRET_tok" not in repr(sim.requests)

    info = sim.pod(inst.instance_id)
    rp.terminate(inst.instance_id)
    with pytest.raises(NotFoundError):
        rp.get(inst.instance_id)
    assert inst.instance_id not in {i.instance_id for i in rp.list_instances()}
    after = sim.pod(inst.instance_id)
    assert after.desired_status == "TERMINATED" and after.terminated_by == "user"
    assert not after.ssh_running and pid_gone(info.ssh_pid)
    assert info.ssh_port is not None and refused(info.ssh_port)
    rp.terminate(inst.instance_id)  # already gone: fine


@needs_root
def test_list_stop_resume(
    rp: RunPodProvider, sim: RunPodSimulator, user_key: tuple[Path, str]
) -> None:
    a = rp.create(CreateRequest(offer=pick(rp, RTX4090, cloud="community"), name="broker-list-a"))
    b = rp.create(CreateRequest(offer=pick(rp, A100), name="broker-list-b"))
    running(rp, a.instance_id)
    running(rp, b.instance_id)
    rp.terminate(a.instance_id)
    assert [i.name for i in rp.list_instances()] == ["broker-list-b"]

    first = sim.pod(b.instance_id)
    rp.stop(b.instance_id)
    assert rp.get(b.instance_id).status is InstanceStatus.STOPPED
    assert pid_gone(first.ssh_pid)
    rp.resume(b.instance_id)
    again = running(rp, b.instance_id)
    assert again.ssh is not None
    with Host(again.ssh.target, identity_file=user_key[0]) as box:
        assert box.exec("nvidia-smi -L").stdout.startswith(f"GPU 0: {A100}")
    assert sim.pod(b.instance_id).status_history == ("RUNNING", "EXITED", "RUNNING")


def test_spot_pod_and_preemption(rp: RunPodProvider, sim: RunPodSimulator) -> None:
    inst = rp.create(CreateRequest(offer=pick(rp, H100, spot=True), name="broker-spot1"))
    assert sim.operations()[-1] == "podRentInterruptable"
    assert inst.spot and inst.price_per_hour == 1.75
    running(rp, inst.instance_id)
    sim.preempt(inst.instance_id)
    assert rp.get(inst.instance_id).status is InstanceStatus.STOPPED
    assert not sim.pod(inst.instance_id).ssh_running


# -- faults ------------------------------------------------------------------------------------


def test_capacity_error(rp: RunPodProvider, sim: RunPodSimulator) -> None:
    offer = pick(rp, H100)
    before = len(sim.pods())
    sim.fail_capacity(1, gpu_type_id=H100)
    other = rp.create(CreateRequest(offer=pick(rp, A100), name="broker-cap-other"))  # unaffected
    with pytest.raises(NoCapacityError) as info:
        rp.create(CreateRequest(offer=offer, name="broker-cap1"))
    assert CAPACITY_MESSAGE in info.value.message
    assert len(sim.pods()) == before + 1
    ok = rp.create(CreateRequest(offer=offer, name="broker-cap2"))  # the fault was used up
    assert {other.name, ok.name} <= {p.name for p in sim.pods()}

    stale = pick(rp, RTX4090, cloud="community")
    sim.update_gpu_type(RTX4090, available=0)  # sold out after the search
    try:
        assert f"community/{RTX4090}" not in {o.offer_id for o in rp.search(parse("gpus>=1"))}
        with pytest.raises(NoCapacityError):
            rp.create(CreateRequest(offer=stale, name="broker-cap3"))
    finally:
        sim.update_gpu_type(RTX4090, available=None)


def test_rate_limit_is_retried(
    rp: RunPodProvider, sim: RunPodSimulator, sleeps: list[float]
) -> None:
    sim.clear_requests()
    sim.rate_limit(2)
    assert rp.search(parse("gpus>=1"))
    assert [r.status for r in sim.requests] == [429, 429, 200]
    assert len(sleeps) == 2 and all(s < 1 for s in sleeps)

    sim.rate_limit(1, operation="podFindAndDeployOnDemand")
    offer = pick(rp, H100)
    rp.create(CreateRequest(offer=offer, name="broker-429"))  # a 429 means nothing was created
    assert [p.name for p in sim.pods()].count("broker-429") == 1


def test_slow_port_publication(rp: RunPodProvider, sim: RunPodSimulator) -> None:
    sim.slow_ports(0.5)
    inst = rp.create(CreateRequest(offer=pick(rp, H100), name="broker-slowports"))

    def proxy_only() -> Instance | None:
        i = rp.get(inst.instance_id)
        return i if i.status is InstanceStatus.RUNNING else None

    first = wait_for(proxy_only, what="runtime")
    # Runtime without ports: the adapter falls back to the ssh.runpod.io proxy (not direct).
    assert first.ssh is not None and not first.ssh.direct and first.ssh.host == "ssh.runpod.io"
    assert not sim.pod(inst.instance_id).ports_published
    ready = running(rp, inst.instance_id)
    assert ready.ssh is not None and ready.ssh.direct


def test_provisioning_phase_and_crashed_sshd(rp: RunPodProvider, sim: RunPodSimulator) -> None:
    sim.provision_delay = 0.3
    inst = deploy(rp, "broker-created")
    assert inst.status is InstanceStatus.PROVISIONING and inst.provider_status == "CREATED"
    ready = running(rp, inst.instance_id)
    assert sim.pod(inst.instance_id).status_history == ("CREATED", "RUNNING")
    sim.crash_ssh(inst.instance_id)
    # The API still says RUNNING with its port; only a probe can tell.
    assert rp.get(inst.instance_id).status is InstanceStatus.RUNNING
    assert ready.ssh is not None and refused(ready.ssh.port)


def test_ssh_never_up_refused(rp: RunPodProvider, sim: RunPodSimulator) -> None:
    sim.ssh_never_up(mode="refuse")
    inst = running(rp, deploy(rp, "broker-refuse").instance_id)
    assert inst.ssh is not None and refused(inst.ssh.port)


def test_ssh_never_up_hangs(
    rp: RunPodProvider, sim: RunPodSimulator, user_key: tuple[Path, str]
) -> None:
    sim.ssh_never_up(mode="hang")
    inst = running(rp, deploy(rp, "broker-hang").instance_id)
    assert inst.ssh is not None
    with socket.create_connection(("127.0.0.1", inst.ssh.port), timeout=2) as s:
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(64)  # no SSH banner, ever
    box = Host(inst.ssh.target, identity_file=user_key[0], connect_timeout=0.5, retries=1)
    with pytest.raises(ConnectError):
        box.exec("true")


@needs_root
def test_ssh_key_not_installed(
    rp: RunPodProvider, sim: RunPodSimulator, user_key: tuple[Path, str]
) -> None:
    sim.ssh_never_up(mode="noauth")
    inst = running(rp, deploy(rp, "broker-noauth").instance_id)
    assert inst.ssh is not None
    with pytest.raises(SSHAuthError):
        Host(inst.ssh.target, identity_file=user_key[0], retries=1).exec("true")


@needs_root
def test_hidden_gpus(rp: RunPodProvider, sim: RunPodSimulator, user_key: tuple[Path, str]) -> None:
    sim.hide_gpus(visible=0)
    inst = running(rp, deploy(rp, "broker-nogpu").instance_id)
    assert inst.ssh is not None
    with Host(inst.ssh.target, identity_file=user_key[0]) as box:
        report = box.gpus()
    assert not report.available and report.gpus == []


def test_terminate_during_outage(
    rp: RunPodProvider, sim: RunPodSimulator, sleeps: list[float]
) -> None:
    inst = running(rp, deploy(rp, "broker-503").instance_id)
    sim.fail_terminate()
    with pytest.raises(ProviderUnavailableError) as info:
        rp.terminate(inst.instance_id)
    assert info.value.status_code == 503
    attempts = [r.status for r in sim.requests if r.operation == "podTerminate"]
    assert len(attempts) > 1 and set(attempts) == {503}  # retried, never got through
    assert len(sleeps) == len(attempts) - 1
    assert rp.get(inst.instance_id).status is InstanceStatus.RUNNING  # still alive and billing
    assert sim.pod(inst.instance_id).ssh_running

    sim.clear_faults()
    sim.fail_terminate(2)
    rp.terminate(inst.instance_id)  # the third attempt gets through
    assert sim.pod(inst.instance_id).desired_status == "TERMINATED"


@pytest.mark.parametrize("mode", ["drop", "504"])
def test_lost_deploy_response_found_by_name(
    rp: RunPodProvider, sim: RunPodSimulator, mode: Any
) -> None:
    sim.lose_deploy_response(mode=mode)
    sim.clear_requests()
    name = f"broker-lost-{mode}"
    inst = rp.create(CreateRequest(offer=pick(rp, H100), name=name))
    created = sim.pod_by_name(name)
    assert created is not None and inst.instance_id == created.id
    assert [p.name for p in sim.pods()].count(name) == 1  # sent exactly once
    ops = sim.operations()
    assert ops.count("podFindAndDeployOnDemand") == 1 and ops[-1] == "myself"


def test_terminate_after_expires(bifrost_home: Path, user_key: tuple[Path, str]) -> None:
    # A simulator of its own: advance() moves its clock for good.
    with RunPodSimulator() as s:
        rp = RunPodProvider(SecretStr("test"), ssh_public_key=user_key[1], base_url=s.url)
        inst = rp.create(CreateRequest(offer=pick(rp, H100), name="broker-ttl", ttl_seconds=60))
        info = s.wait_ready(inst.instance_id)
        assert info.terminate_after is not None
        left = (info.terminate_after - s.now()).total_seconds()
        assert 50 < left <= 61
        s.advance(left + 1)
        wait_for(lambda: s.pod(inst.instance_id).desired_status == "TERMINATED", what="TTL")
        assert s.pod(inst.instance_id).terminated_by == "terminateAfter"
        with pytest.raises(NotFoundError):
            rp.get(inst.instance_id)
        # The status flips first; the sshd is stopped just after, outside the simulator's lock.
        wait_for(lambda: pid_gone(info.ssh_pid), what="the pod's sshd to exit")
        rp.close()


def test_stop_kills_every_sshd(bifrost_home: Path, user_key: tuple[Path, str]) -> None:
    with RunPodSimulator() as s:
        rp = RunPodProvider(SecretStr("test"), ssh_public_key=user_key[1], base_url=s.url)
        inst = rp.create(CreateRequest(offer=pick(rp, H100), name="broker-stop-all"))
        pid = s.wait_ready(inst.instance_id).ssh_pid
        assert not pid_gone(pid)
        rp.close()
    assert pid_gone(pid)
    with pytest.raises(RuntimeError):
        _ = s.url


def test_command_line(bifrost_home: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.testing.runpod_sim", "--port", "0", "--api-key", "test"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        url = lines[0].split()[3]
        assert url.startswith("http://127.0.0.1:")
        assert (
            f"RUNPOD_API_URL={url} RUNPOD_API_KEY=test broker search --provider runpod" in lines[2]
        )
        pods = httpx.get(f"{url}/_sim/pods").json()
        assert pods["pods"] == []
        offers = RunPodProvider(SecretStr("test"), base_url=url).search(parse("gpus>=1"))
        assert offers
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    assert json.dumps(pods)


# -- issue 16.9 ------------------------------------------------------------------------------------


def test_debug_log_never_shows_the_key_in_the_url(
    sim: RunPodSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG", logger="broker.testing.runpod_sim"):
        r = httpx.post(
            f"{sim.url}/graphql?api_key={KEY}",
            json={"query": "query { myself { id } }"},
            timeout=10,
        )
        assert r.status_code == 200
        wait_for(lambda: any("http:" in m for m in caplog.messages), what="the request line")
    assert KEY not in caplog.text
    assert "api_key=***" in caplog.text


def test_answer_after_the_clients_timeout(sim: RunPodSimulator) -> None:
    sim.slow_response(0.5, operation="myself")
    before = len(sim.requests)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{sim.url}/graphql",
            json={"query": "query { myself { id } }"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=0.1,  # the client gives up before the answer
        )
    # the server acted (and logged) all the same
    wait_for(lambda: len(sim.requests) > before, what="the late answer")


def test_a_client_hanging_up_prints_no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    from broker.testing.runpod_sim import _QuietServer

    server = _QuietServer.__new__(_QuietServer)  # only handle_error is exercised
    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        server.handle_error(None, ("127.0.0.1", 1))
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        server.handle_error(None, ("127.0.0.1", 1))
    assert "Traceback" not in capfd.readouterr().err


def test_late_deploy_appears_after_the_client_gave_up(
    rp: RunPodProvider, sim: RunPodSimulator
) -> None:
    offer = next(o for o in rp.search(parse("gpu~4090 gpus=1")) if not o.spot)
    sim.late_deploy(1, mode="504", delay=None)
    with pytest.raises(ProviderUnavailableError):
        rp.create(CreateRequest(offer=offer, name="broker-late-1"))
    assert sim.pod_by_name("broker-late-1") is None and rp.find_by_name("broker-late-1") is None
    (pod_id,) = sim.release_late()
    found = rp.find_by_name("broker-late-1")
    assert found is not None and found.instance_id == pod_id
    rp.terminate(pod_id)


@needs_root
def test_shell_rc_off_sessions_see_exactly_the_pods_path(
    sim: RunPodSimulator, rp: RunPodProvider, user_key: tuple[Path, str]
) -> None:
    """shell_rc=False: the login shell reads no ~/.bashrc of this machine's user (whatever it
    puts on PATH), as on a stock image; pods created before the switch keep their setting."""
    from broker.testing.sim.catalogue import SYSTEM_PATH

    sim.shell_rc = False
    try:
        inst = deploy(rp, "broker-norc0001")
    finally:
        sim.shell_rc = True
    ready = running(rp, inst.instance_id)
    assert ready.ssh is not None
    try:
        with Host(ready.ssh.target, identity_file=user_key[0]) as box:
            # bifrost puts ~/.local/bin first (where uv lands); then only what the pod set.
            local, pod_bin, rest = box.exec('printf %s "$PATH"').stdout.split(":", 2)
            assert local == box.exec('printf %s "$HOME/.local/bin"').stdout
            assert pod_bin.endswith(f"/{inst.instance_id}/bin")
            assert rest == SYSTEM_PATH
            assert box.exec("nvidia-smi -L").stdout.count(H100) == 1
    finally:
        rp.terminate(inst.instance_id)
