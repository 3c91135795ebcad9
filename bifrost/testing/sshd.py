"""``SSHServer``: a throwaway real OpenSSH sshd on loopback, for tests (yours and ours)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

SSHD = "/usr/sbin/sshd"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (sshd cannot listen on port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_user(name: str = "bifrost-test") -> str:
    """Create a non-root login user with a home and bash (root only); returns its name."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            raise PermissionError(
                f"user {name} does not exist and only root can create it"
            ) from None
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)
    return name


def keygen(path: Path) -> str:
    """An ed25519 key pair at ``path``; returns the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bifrost-test", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return (
        (path.with_suffix(".pub") if path.suffix else Path(str(path) + ".pub")).read_text().strip()
    )


class SSHServer:
    """A real ``sshd -D`` with its own host key, client key and config.

    As root it runs as root and ``user`` (default root) logs in; with ``run_as`` it runs as that
    unprivileged user, who is then the only one who can log in. Extra ``listen`` addresses
    (127.0.0.2 ...) give many "hosts" from one process.

    >>> with SSHServer() as srv:                         # doctest: +SKIP
    ...     Host(srv.target, identity_file=srv.client_key).exec("true")
    """

    def __init__(
        self,
        *,
        run_as: str | None = None,
        listen: Sequence[str] = ("127.0.0.1",),
        port: int | None = None,
        extra_config: str = "",
        startup_timeout: float = 10.0,
    ) -> None:
        self.run_as = run_as
        self.listen = list(listen)
        self.port = port or 0
        self.extra_config = extra_config
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self.client_key = Path()
        self.host_key_line = ""
        if run_as is not None:
            self.user = run_as
        elif os.geteuid() == 0:
            self.user = "root"
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name

    @property
    def host(self) -> str:
        """The first listen address."""
        return self.listen[0]

    @property
    def target(self) -> str:
        """``user@host:port`` for the first listen address."""
        return f"{self.user}@{self.host}:{self.port}"

    def targets(self) -> list[str]:
        """``user@addr:port`` for every listen address."""
        return [f"{self.user}@{a}:{self.port}" for a in self.listen]

    def known_hosts_lines(self) -> list[str]:
        """known_hosts lines pinning this server's key for every address."""
        return [f"[{a}]:{self.port} {self.host_key_line}" for a in self.listen]

    @property
    def log(self) -> str:
        """sshd's log so far."""
        assert self.dir is not None
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> SSHServer:
        """Generate keys, write the config, start sshd and wait for its banner."""
        if not Path(SSHD).exists():
            raise FileNotFoundError(f"{SSHD} missing: apt-get install -y openssh-server")
        self.dir = Path(tempfile.mkdtemp(prefix="bifrost-sshd-"))
        os.chmod(self.dir, 0o700)
        d = self.dir
        keygen(d / "host_ed25519")
        self.host_key_line = " ".join((d / "host_ed25519.pub").read_text().split()[:2])
        client_pub = keygen(d / "client_ed25519")
        self.client_key = d / "client_ed25519"
        (d / "authorized_keys").write_text(client_pub + "\n")
        os.chmod(d / "authorized_keys", 0o600)
        if os.geteuid() == 0 and self.run_as is None:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        if self.run_as is not None and os.geteuid() == 0:
            pw = pwd.getpwnam(self.run_as)
            for p in [d, *d.iterdir()]:
                os.chown(p, pw.pw_uid, pw.pw_gid)
        last_error = ""
        for _ in range(5):  # a free port can be taken between probing and binding
            if not self.port:
                self.port = free_port(self.host)
            self._write_config()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                last_error = str(exc)
                self._kill()
                self.port = 0
        raise RuntimeError(f"sshd did not start: {last_error}")

    def _write_config(self) -> None:
        assert self.dir is not None
        d = self.dir
        listen = "\n".join(f"ListenAddress {a}" for a in self.listen)
        (d / "sshd_config").write_text(
            f"""Port {self.port}
{listen}
HostKey {d}/host_ed25519
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
AllowTcpForwarding yes
MaxSessions 50
MaxStartups 100:30:200
LogLevel VERBOSE
{self.extra_config}
"""
        )
        if self.run_as is not None and os.geteuid() == 0:
            pw = pwd.getpwnam(self.run_as)
            os.chown(d / "sshd_config", pw.pw_uid, pw.pw_gid)

    def _spawn(self) -> None:
        assert self.dir is not None
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 - lives as long as sshd
        kwargs: dict[str, object] = {}
        if self.run_as is not None and os.geteuid() == 0:
            kwargs["user"] = self.run_as
            kwargs["group"] = pwd.getpwnam(self.run_as).pw_gid
            kwargs["extra_groups"] = []
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            [SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            **kwargs,
        )
        log.close()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"no SSH banner on {self.host}:{self.port}: {self.log[-2000:]}")

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop sshd and remove its files."""
        self._kill()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
