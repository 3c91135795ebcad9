"""The ``ssh`` provider against a real sshd: probing, leases, terminate stopping our jobs."""

from __future__ import annotations

import calendar
import contextlib
import json
import logging
import multiprocessing
import os
import pwd
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bifrost import Host
from bifrost.testing import SSHServer, ensure_user, free_port
from bifrost.testing.sshd import keygen
from broker.client import GPUClient
from broker.config import load_settings
from broker.errors import AuthError, ConfigError, NoCapacityError, NotFoundError, StaleOfferError
from broker.providers.base import get_provider_class
from broker.providers.ssh import (
    EXPECTED_FORM,
    SSHProbeError,
    SSHProvider,
    build_offer,
    parse_host,
    parse_hosts,
    parse_probe,
)
from broker.query import as_query
from broker.types import CreateRequest, GPUOffer, Instance, InstanceStatus, Manufacturer, StockLevel

ALL = as_query(None)


def _wait_for(cond: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met before the deadline")


@pytest.fixture(scope="module")
def box(bifrost_home: Path) -> Iterator[SSHServer]:
    """A machine of our own: sshd run by a dedicated user, with a fresh $HOME for this run.

    terminate kills every running job started in the login's ~/.bifrost/jobs during the lease;
    a private user and HOME keep those jobs this run's own, even while another pytest run of
    this module (another session) works on the same machine.
    """
    run_as = ensure_user("broker-ssh-test") if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix="broker-ssh-box-"))
    if run_as is not None:
        pw = pwd.getpwnam(run_as)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    # SetEnv overrides the HOME sshd takes from passwd (sftp still starts in the passwd home).
    try:
        with SSHServer(run_as=run_as, extra_config=f"SetEnv HOME={home}") as server:
            server.home = home  # type: ignore[attr-defined]
            yield server
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def remote(box: SSHServer) -> Iterator[Host]:
    h = Host(box.target, identity_file=box.client_key)
    yield h
    h.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def provider(box: SSHServer, state_dir: Path) -> SSHProvider:
    return SSHProvider([box.target], state_dir, identity_file=box.client_key)


def _request(offer: GPUOffer, name: str = "broker-test") -> CreateRequest:
    return CreateRequest(offer=offer, name=name)


# -- configuration -----------------------------------------------------------------------------
def test_registered_and_configured_by_ssh_hosts() -> None:
    cls = get_provider_class("ssh")
    assert cls is SSHProvider
    assert cls.display_name == "Your SSH hosts"
    assert cls.capabilities.requires_api_key is False
    assert not cls.is_configured(load_settings())
    assert cls.is_configured(load_settings(ssh_hosts=["me@box:22"]))


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("gpu-box", "the user is missing"),
        ("me@gpu-box:99999", ""),  # the reason is bifrost's (parse_target) wording
        ("me@bad host", "spaces"),
        ("ssh -p 22 me@gpu-box", "spaces"),
        ("local", "use the `local` provider"),
        ("me@gpu box!:22", "spaces"),
        ("me@gpu!box:22", ""),
    ],
)
def test_bad_entry_is_a_clear_config_error(entry: str, why: str) -> None:
    settings = load_settings(ssh_hosts=[entry])
    with pytest.raises(ConfigError) as ei:
        SSHProvider.from_settings(settings)
    msg = str(ei.value)
    assert repr(entry) in msg and why in msg and EXPECTED_FORM in msg


def test_duplicate_host_is_refused_and_forms_parse() -> None:
    with pytest.raises(
        ConfigError, match=r"127\.0\.0\.1:2222 is already listed as 'a@127.0.0.1:2222'"
    ):
        parse_hosts(["a@127.0.0.1:2222", "b@127.0.0.1:2222"])
    h = parse_host("ubuntu@[::1]:2200")
    assert (h.endpoint.host, h.endpoint.port, h.endpoint.user) == ("::1", 2200, "ubuntu")
    assert h.offer_id == "ubuntu@[::1]:2200"
    assert parse_host("ubuntu@gpu-box.lan").endpoint.port == 22


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # JSON list: pydantic-settings JSON-decodes list fields from the environment first.
    monkeypatch.setenv("BROKER_SSH_HOSTS", json.dumps(["a@10.0.0.1:22", "b@10.0.0.2:2222"]))
    monkeypatch.setenv("SSH_KEY_PATH", str(tmp_path / "key"))
    p = SSHProvider.from_settings(load_settings())
    assert [h.offer_id for h in p.hosts] == ["a@10.0.0.1:22", "b@10.0.0.2:2222"]
    assert p.identity_file == tmp_path / "key"


def test_default_provider_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Like `local`: joins the default set when no cloud is configured, stays out (name it to
    # search it) when one is, so $0/h boxes never top a cloud search unasked.
    monkeypatch.delenv("BROKER_SSH_HOSTS", raising=False)
    assert GPUClient().provider_names() == ["local"]
    monkeypatch.setenv("BROKER_SSH_HOSTS", json.dumps(["me@10.0.0.1:22"]))
    assert GPUClient().provider_names() == ["local", "ssh"]
    monkeypatch.setenv("RUNPOD_API_KEY", "rp-test")
    assert GPUClient().provider_names() == ["runpod"]
    assert GPUClient(providers=["runpod", "ssh"]).provider_names() == ["runpod", "ssh"]


# -- probe output parsing (recorded nvidia-smi output) -------------------------------------------
H100_PROBE = (
    """\
BROKER_HOSTNAME gpu-node-7
BROKER_NPROC 208
BROKER_MEMKB 2113663412
BROKER_DISKKB 3519123456
BROKER_GPU_RC 0
"""
    + "".join("BROKER_GPU NVIDIA H100 80GB HBM3, 81559, 550.54.15\n" for _ in range(8))
    + "BROKER_CUDA 12.4\n"
)


def test_parse_recorded_h100_node() -> None:
    facts = parse_probe(H100_PROBE)
    assert facts.hostname == "gpu-node-7" and facts.vcpus == 208
    assert facts.ram_gb == pytest.approx(2015.8, abs=0.1)
    assert facts.disk_gb == pytest.approx(3603.6, abs=0.1)
    offer = build_offer(parse_host("root@10.1.2.3:22"), facts)
    assert offer.gpu_type == "H100 SXM 80GB" and offer.gpu_known
    assert offer.gpu_provider_name == "NVIDIA H100 80GB HBM3"
    assert (offer.gpu_count, offer.vram_gb, offer.total_vram_gb) == (8, 80.0, 640.0)
    assert offer.manufacturer is Manufacturer.NVIDIA
    assert (offer.cuda_version, offer.driver_version) == ("12.4", "550.54.15")
    assert offer.compute_capability == "9.0" and offer.price_per_hour == 0.0
    assert offer.offer_id == "root@10.1.2.3:22" and offer.region == "ssh"
    assert offer.datacenter == "gpu-node-7" and offer.source == "ssh:nvidia-smi"


def test_leased_host_says_it_is_leased() -> None:
    from datetime import UTC, datetime

    holder = Instance(
        provider="ssh",
        instance_id="ssh-0123456789ab",
        name="broker-abc",
        status=InstanceStatus.RUNNING,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    offer = build_offer(parse_host("root@10.1.2.3:22"), parse_probe(H100_PROBE), leased_by=holder)
    assert offer.stock is StockLevel.NONE
    note = offer.provider_data["unavailable"]
    assert note.startswith("leased by ssh-0123456789ab (broker-abc) since 2026-01-02")
    assert "broker instances terminate broker-abc" in note
    free = build_offer(parse_host("root@10.1.2.3:22"), parse_probe(H100_PROBE))
    assert "unavailable" not in free.provider_data


def test_parse_mixed_gpus_is_not_passed_off_as_one_kind() -> None:
    text = (
        "BROKER_GPU_RC 0\nBROKER_GPU NVIDIA GeForce RTX 4090, 24564, 560.35.03\n"
        "BROKER_GPU NVIDIA GeForce RTX 3090, 24576, 560.35.03\n"
        "BROKER_GPU NVIDIA GeForce RTX 4090, 24564, 560.35.03\n"
    )
    offer = build_offer(parse_host("me@desk:22"), parse_probe(text))
    assert offer.gpu_type == "2x RTX 4090 24GB + 1x RTX 3090 24GB"
    assert offer.gpu_count == 3 and offer.vram_gb == 24.0 and offer.compute_capability is None
    assert offer.driver_version == "560.35.03" and offer.cuda_version is None
    assert offer.vcpus is None and offer.ram_gb is None  # fields the probe did not get stay empty


def test_parse_gpu_edge_cases() -> None:
    no_devices = "BROKER_GPU_RC 6\nBROKER_GPU No devices were found\n"
    assert parse_probe(no_devices).gpus == [] and parse_probe(no_devices).gpu_error is None
    broken = (
        "BROKER_GPU_RC 18\nBROKER_GPU Failed to initialize NVML: Driver/library version mismatch\n"
    )
    err = parse_probe(broken).gpu_error
    assert err is not None and "exit 18" in err and "version mismatch" in err
    absent = parse_probe("BROKER_NPROC 4\nBROKER_GPU_RC absent\n")
    assert absent.gpus == [] and absent.gpu_error is None and absent.vcpus == 4
    na = parse_probe("BROKER_GPU_RC 0\nBROKER_GPU NVIDIA A100-SXM4-40GB, [N/A], 535.1\n")
    assert na.gpus[0].memory_mib is None
    offer = build_offer(parse_host("me@desk:22"), na)
    assert offer.gpu_type == "A100 SXM 40GB" and offer.vram_gb == 40.0


# -- probing a real host --------------------------------------------------------------------------
def _mem_gb() -> float:
    with open("/proc/meminfo") as f:
        kb = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
    return kb / 1024 / 1024


def test_probe_real_host_gives_cpu_only_offer(provider: SSHProvider, box: SSHServer) -> None:
    [offer] = provider.search(ALL)
    assert offer.provider == "ssh" and offer.offer_id == box.target
    assert (offer.gpu_type, offer.gpu_count, offer.vram_gb) == ("CPU only", 0, None)
    assert offer.manufacturer is Manufacturer.NONE and offer.source == "ssh:cpu"
    assert offer.vcpus == os.cpu_count()  # the "remote" is this machine
    assert offer.ram_gb == pytest.approx(_mem_gb(), abs=0.2)
    assert offer.disk_gb is not None and offer.disk_gb > 0
    assert offer.price_per_hour == 0.0 and offer.region == "ssh"
    assert offer.stock is StockLevel.HIGH and offer.datacenter == socket.gethostname()
    assert provider.last_probe_errors == {}


FAKE_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu=*)
    for i in 1 2; do echo 'NVIDIA GeForce RTX 4090, 24564, 560.35.03'; done ;;
  *)
    echo '| NVIDIA-SMI 560.35.03       Driver Version: 560.35.03      CUDA Version: 12.6     |' ;;
esac
"""

BROKEN_SMI = """#!/bin/sh
echo 'Failed to initialize NVML: Driver/library version mismatch'
exit 18
"""


def _install(remote: Host, name: str, text: str) -> str:
    path = remote.exec('printf %s "$HOME"').stdout + f"/fake-gpu/{name}"
    remote.exec(f"mkdir -p ~/fake-gpu && cat > {path} && chmod +x {path}", stdin=text)
    return path


def test_fake_nvidia_smi_on_the_remote_gives_a_gpu_offer(
    box: SSHServer, remote: Host, state_dir: Path
) -> None:
    smi = _install(remote, "nvidia-smi", FAKE_SMI)
    p = SSHProvider([box.target], state_dir, identity_file=box.client_key, nvidia_smi=smi)
    [offer] = p.search(ALL)
    assert (offer.gpu_type, offer.gpu_count, offer.vram_gb) == ("RTX 4090 24GB", 2, 24.0)
    assert offer.manufacturer is Manufacturer.NVIDIA and offer.gpu_known
    assert (offer.cuda_version, offer.driver_version) == ("12.6", "560.35.03")
    assert offer.source == "ssh:nvidia-smi"


def test_broken_nvidia_smi_is_a_host_error_not_a_cpu_box(
    box: SSHServer, remote: Host, state_dir: Path
) -> None:
    smi = _install(remote, "broken-smi", BROKEN_SMI)
    p = SSHProvider([box.target], state_dir, identity_file=box.client_key, nvidia_smi=smi)
    with pytest.raises(SSHProbeError, match="version mismatch") as ei:
        p.search(ALL)
    assert list(ei.value.host_errors) == [box.target]


def test_search_through_gpuclient(monkeypatch: pytest.MonkeyPatch, box: SSHServer) -> None:
    monkeypatch.setenv("BROKER_SSH_HOSTS", json.dumps([box.target]))
    monkeypatch.setenv("SSH_KEY_PATH", str(box.client_key))
    with GPUClient(providers=["ssh"]) as c:
        res = c.search()
        assert [o.offer_id for o in res] == [box.target]
        assert [(r.provider, r.status) for r in res.reports] == [("ssh", "ok")]
        assert len(c.search("gpus>=1")) == 0  # CPU-only box filtered out locally


# -- unreachable hosts -----------------------------------------------------------------------------
def test_unreachable_host_is_left_out_recorded_and_logged(
    box: SSHServer, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"root@127.0.0.1:{free_port()}"
    p = SSHProvider([dead, box.target], state_dir, identity_file=box.client_key)
    with caplog.at_level(logging.WARNING, logger="broker.providers.ssh"):
        offers = p.search(ALL)
    assert [o.offer_id for o in offers] == [box.target]
    assert list(p.last_probe_errors) == [dead]
    assert "could not connect" in p.last_probe_errors[dead].message
    assert any(dead in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    # The next good search clears the record.
    p.hosts = p.hosts[1:]
    p.search(ALL)
    assert p.last_probe_errors == {}


def test_all_hosts_unreachable_raises_with_every_reason(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> None:
    dead = [f"root@127.0.0.1:{free_port()}", f"root@127.0.0.2:{free_port('127.0.0.2')}"]
    p = SSHProvider(dead, state_dir)
    with pytest.raises(SSHProbeError) as ei:
        p.search(ALL)
    assert sorted(ei.value.host_errors) == sorted(dead)
    assert all(d in str(ei.value) for d in dead)
    # Through the client it is the provider's error report, not an empty success.
    monkeypatch.setenv("BROKER_SSH_HOSTS", json.dumps(dead))
    res = GPUClient(providers=["ssh"]).search()
    assert res.all_failed and res.reports[0].error
    assert res.reports[0].error["type"] == "SSHProbeError"


def test_silent_host_is_cut_off_at_the_deadline(box: SSHServer, state_dir: Path) -> None:
    # Accepts TCP, never says a word: the probe gives up on it without holding up the others.
    with socket.create_server(("127.0.0.1", 0)) as mute:
        silent = f"root@127.0.0.1:{mute.getsockname()[1]}"
        p = SSHProvider(
            [silent, box.target],
            state_dir,
            identity_file=box.client_key,
            connect_timeout=1.0,
            connect_retries=1,
            probe_deadline=0.8,
        )
        t0 = time.monotonic()
        offers = p.search(ALL)
        assert time.monotonic() - t0 < 1.5
        # The probe still waiting on the mute host is a daemon thread: it cannot keep the
        # process alive after the search (a ThreadPoolExecutor's workers are joined at exit).
        stragglers = [t for t in threading.enumerate() if t.name.startswith("broker-ssh-probe")]
        assert stragglers and all(t.daemon for t in stragglers)
    assert [o.offer_id for o in offers] == [box.target]
    assert "no answer within 0.8s" in p.last_probe_errors[silent].message


def test_deadline_follows_the_client_search_timeout() -> None:
    p = SSHProvider.from_settings(load_settings(ssh_hosts=["me@10.0.0.1"], search_timeout_s=4))
    assert p.probe_deadline == 3.0 and p.connect_timeout == 1.0 and p.probe_timeout == 2.0
    p = SSHProvider.from_settings(load_settings(ssh_hosts=["me@10.0.0.1"]))
    assert (p.probe_deadline, p.connect_timeout, p.probe_timeout) == (15.0, 5.0, 10.0)


def test_wrong_key_is_an_auth_error(box: SSHServer, state_dir: Path, tmp_path: Path) -> None:
    keygen(tmp_path / "stranger")
    p = SSHProvider([box.target], state_dir, identity_file=tmp_path / "stranger")
    with pytest.raises(AuthError, match="refused the key"):
        p.search(ALL)
    assert isinstance(p.last_probe_errors[box.target], AuthError)


# -- leases ----------------------------------------------------------------------------------------
def test_create_leases_and_second_create_gets_no_capacity(
    provider: SSHProvider, box: SSHServer
) -> None:
    [offer] = provider.search(ALL)
    inst = provider.create(_request(offer, "broker-one"))
    assert re.fullmatch(r"ssh-[0-9a-f]{12}", inst.instance_id)
    assert inst.status is InstanceStatus.RUNNING and inst.name == "broker-one"
    assert inst.ssh is not None and inst.ssh.target == box.target
    assert (inst.ssh.user, inst.ssh.port) == (box.user, box.port)
    assert inst.price_per_hour == 0.0

    with pytest.raises(NoCapacityError, match=f"already leased by {inst.instance_id}"):
        provider.create(_request(offer, "broker-two"))

    # A leased host is still listed, visibly busy.
    [busy] = provider.search(ALL)
    assert busy.stock is StockLevel.NONE
    assert busy.provider_data["leased_by"]["instance_id"] == inst.instance_id
    assert provider.get(inst.instance_id).name == "broker-one"
    assert [i.instance_id for i in provider.list_instances()] == [inst.instance_id]
    found = provider.find_by_name("broker-one")
    assert found is not None and found.instance_id == inst.instance_id
    assert provider.find_by_name("nope") is None

    # Another broker process (another provider object on the same state dir) sees the lease.
    other = SSHProvider([box.target], provider.store.root.parent, identity_file=box.client_key)
    with pytest.raises(NoCapacityError):
        other.create(_request(offer, "broker-three"))
    provider.terminate(inst.instance_id)
    again = other.create(_request(offer, "broker-three"))
    assert again.instance_id != inst.instance_id
    other.terminate(again.instance_id)


def test_unknown_ids_and_offers(provider: SSHProvider) -> None:
    with pytest.raises(NotFoundError):
        provider.get("ssh-000000000000")
    with pytest.raises(NotFoundError):
        provider.get("../../etc/passwd")
    with pytest.raises(NotFoundError):
        provider.terminate("ssh-000000000000")
    assert provider.list_instances() == []
    foreign = build_offer(parse_host("me@elsewhere:22"), parse_probe(""))
    with pytest.raises(StaleOfferError, match="not one of the configured ssh_hosts"):
        provider.create(_request(foreign))


def _race_create(state_dir: str, target: str, offer_json: str, barrier: Any, out: Any) -> None:
    p = SSHProvider([target], Path(state_dir))
    offer = GPUOffer.model_validate_json(offer_json)
    barrier.wait()
    try:
        out.put(("ok", p.create(_request(offer, f"race-{os.getpid()}")).instance_id))
    except NoCapacityError:
        out.put(("no-capacity", ""))


def test_two_processes_racing_get_exactly_one_lease(provider: SSHProvider, state_dir: Path) -> None:
    [offer] = provider.search(ALL)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    args = (str(state_dir), offer.offer_id, offer.model_dump_json(), barrier, out)
    procs = [ctx.Process(target=_race_create, args=args) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert [r[0] for r in results] == ["no-capacity", "ok"]
    [active] = provider.list_instances()
    assert active.instance_id == results[1][1]
    provider.terminate(active.instance_id)


def test_threads_racing_get_exactly_one_lease(provider: SSHProvider, box: SSHServer) -> None:
    [offer] = provider.search(ALL)
    barrier = threading.Barrier(8)

    def attempt(i: int) -> str:
        p = SSHProvider([box.target], provider.store.root.parent)
        barrier.wait()
        try:
            return p.create(_request(offer, f"thread-{i}")).instance_id
        except NoCapacityError:
            return ""

    with ThreadPoolExecutor(8) as pool:
        won = [r for r in pool.map(attempt, range(8)) if r]
    assert len(won) == 1
    assert [i.instance_id for i in provider.list_instances()] == won
    provider.terminate(won[0])


# -- terminate -------------------------------------------------------------------------------------
def test_terminate_releases_and_kills_jobs_started_during_the_lease(
    provider: SSHProvider, remote: Host, box: SSHServer
) -> None:
    before = remote.run("sleep 300", name="not-ours")
    started = before.status().started_at
    assert started is not None
    # bifrost stamps jobs to the second: let the clock leave that second before leasing.
    epoch = calendar.timegm(time.strptime(started, "%Y-%m-%dT%H:%M:%SZ"))
    _wait_for(lambda: time.time() >= epoch + 1.05)
    try:
        [offer] = provider.search(ALL)
        inst = provider.create(_request(offer, "broker-jobs"))
        ours = remote.run("sleep 300", name="ours")
        assert ours.status().state == "running"
        # Jobs live in this run's private HOME (see the box fixture), not the shared account's.
        assert remote.exec('printf %s "$HOME"').stdout == str(box.home)  # type: ignore[attr-defined]

        provider.terminate(inst.instance_id)

        assert ours.status().state == "cancelled"
        assert before.status().state == "running"  # started before the lease: not ours
        done = provider.get(inst.instance_id)
        assert done.status is InstanceStatus.TERMINATED
        assert done.extra["jobs_stopped"] == [ours.id] and done.extra["jobs_stop_error"] is None
        provider.terminate(inst.instance_id)  # idempotent
        assert provider.get(inst.instance_id).status is InstanceStatus.TERMINATED
        [free] = provider.search(ALL)
        assert free.stock is StockLevel.HIGH
    finally:
        before.kill(grace=1)


class _Forwarder:
    """A TCP port that forwards to sshd only while switched on (a box that comes and goes)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.server: socket.socket | None = None

    def on(self) -> None:
        srv = socket.create_server(("127.0.0.1", self.port))
        self.server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def off(self) -> None:
        if self.server is not None:
            # shutdown() first: close() alone leaves a socket that a thread is accept()ing on
            # still listening on Linux.
            with contextlib.suppress(OSError):
                self.server.shutdown(socket.SHUT_RDWR)
            self.server.close()
            self.server = None

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_terminate_unreachable_host_releases_records_and_retries(
    box: SSHServer, remote: Host, state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fwd = _Forwarder(box.port)
    target = f"{box.user}@127.0.0.1:{fwd.port}"
    p = SSHProvider([target], state_dir, identity_file=box.client_key)
    job = None
    fwd.on()
    try:
        [offer] = p.search(ALL)
        fwd.off()
        inst = p.create(_request(offer, "broker-gone"))
        job = remote.run("sleep 300", name="orphan")  # the box itself is up, its route is not

        with caplog.at_level(logging.WARNING, logger="broker.providers.ssh"):
            p.terminate(inst.instance_id)  # does not raise: the lease must not stay booked

        rec = p.get(inst.instance_id)
        assert rec.status is InstanceStatus.TERMINATED and rec.extra["jobs_stopped"] == []
        assert "could not connect" in rec.extra["jobs_stop_error"]
        assert any("could not be stopped" in r.getMessage() for r in caplog.records)
        assert job.status().state == "running"
        assert p.list_instances()[0].status is InstanceStatus.TERMINATED
        nxt = p.create(_request(offer, "broker-next"))  # the host is free again
        p.terminate(nxt.instance_id)

        fwd.on()
        p.terminate(inst.instance_id)  # the retry reaches the box and stops the orphan
        rec = p.get(inst.instance_id)
        assert rec.extra["jobs_stopped"] == [job.id] and rec.extra["jobs_stop_error"] is None
        assert job.status().state == "cancelled"
    finally:
        fwd.off()
        if job is not None:
            job.kill(grace=1)


def test_hosts_are_probed_concurrently(
    sshd_many: list[SSHServer], state_dir: Path, tmp_path: Path
) -> None:
    srv = sshd_many[0]  # ten "hosts" 127.0.0.2 … 127.0.0.11 behind one client key
    # Each probe takes >= 1 s on the remote (nvidia-smi is called twice and sleeps 0.5 s each
    # time), so one host after another would take >= 10 s. The "remote" shares our filesystem.
    slow = tmp_path / "slow-smi"
    slow.write_text("#!/bin/sh\nsleep 0.5\necho 'No devices were found'\nexit 6\n")
    slow.chmod(0o755)
    p = SSHProvider(srv.targets(), state_dir, identity_file=srv.client_key, nvidia_smi=str(slow))
    t0 = time.monotonic()
    offers = p.search(ALL)
    elapsed = time.monotonic() - t0
    assert sorted(o.offer_id for o in offers) == sorted(srv.targets())
    assert all(o.gpu_count == 0 for o in offers) and p.last_probe_errors == {}
    assert elapsed < 7.0, elapsed  # well below the >= 10 s of probing one host at a time


# -- through the lifecycle -------------------------------------------------------------------------
def test_lifecycle_on_own_machine_keeps_its_host_key_pinned(
    monkeypatch: pytest.MonkeyPatch, box: SSHServer
) -> None:
    from bifrost import KnownHosts

    monkeypatch.setenv("BROKER_SSH_HOSTS", json.dumps([box.target]))
    monkeypatch.setenv("SSH_KEY_PATH", str(box.client_key))
    with GPUClient(providers=["ssh"]) as c:
        with c.create(None, ttl="1h") as inst:  # ready: TCP, login, CPU probe
            assert inst.ssh is not None and inst.ssh.target == box.target
            assert inst.host().exec("echo hi").stdout.strip() == "hi"
        entry = c.journal.get(inst.name or "")
        assert entry is not None and entry.status == "terminated"
    # Unlike a fresh cloud box at a reused address, your own machine's key stays trusted, so a
    # changed key later is reported instead of silently re-learned.
    assert KnownHosts().lookup(inst.ssh.host, inst.ssh.port)
