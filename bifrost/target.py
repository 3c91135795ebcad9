"""The one parser of target strings: ``user@host:port``, ``ssh -p P user@host``, ``[::1]:2222``,
ssh-config aliases (with ProxyJump) and ``local``."""

from __future__ import annotations

import fnmatch
import getpass
import glob
import ipaddress
import os
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from bifrost.errors import TargetError

__all__ = ["Target", "parse_target"]

_USER_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*\$?$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?$")
_EXAMPLES = (
    "expected user@host[:port], ssh -p PORT user@host, [ipv6]:port, "
    "an ~/.ssh/config alias or 'local'"
)


@dataclass(frozen=True)
class Target:
    """Where commands run. Build one with :func:`parse_target`.

    ``host`` is the address actually dialled (an alias is resolved through ~/.ssh/config),
    ``alias`` the name the user typed when it came from ssh_config.
    """

    host: str = ""
    user: str = ""
    port: int = 22
    identity_files: tuple[str, ...] = ()
    proxy_jump: tuple[Target, ...] = ()
    alias: str | None = None
    is_local: bool = False
    #: OpenSSH ``ProxyCommand`` (``%h``, ``%p``, ``%r``, ``%%`` tokens unexpanded), or None.
    proxy_command: str | None = None
    explicit_user: bool = field(default=False, compare=False)
    explicit_port: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        if self.is_local:
            return "local"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @property
    def display(self) -> str:
        """Short name for prefixes and tables: the alias if any, else ``user@host:port``."""
        return self.alias or str(self)

    @property
    def known_hosts_name(self) -> str:
        """The host pattern OpenSSH writes in known_hosts: ``host`` or ``[host]:port``."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def ssh_destination(self) -> str:
        """``user@host`` as ssh/rsync expect it (IPv6 in brackets for rsync)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}"

    def with_identity(self, *files: str) -> Target:
        """A copy that authenticates with these private key files first."""
        return replace(self, identity_files=tuple(files) + self.identity_files)


LOCAL = Target(is_local=True, host="localhost", user=getpass.getuser(), port=0)


# ssh options that do not change where bifrost connects or whom it trusts: accepted and
# ignored (bifrost has its own timeouts, keepalives and host-key pinning).
_HARMLESS_OPTIONS = frozenset(
    (
        "addkeystoagent", "batchmode", "checkhostip", "compression", "connectionattempts",
        "connecttimeout", "controlmaster", "controlpath", "controlpersist", "forwardagent",
        "forwardx11", "globalknownhostsfile", "hashknownhosts", "identitiesonly", "loglevel",
        "passwordauthentication", "preferredauthentications", "pubkeyauthentication",
        "requesttty", "sendenv", "serveralivecountmax", "serveraliveinterval", "setenv",
        "stricthostkeychecking", "tcpkeepalive", "updatehostkeys", "usekeychain",
        "userknownhostsfile", "visualhostkey",
    )
)  # fmt: skip
_IGNORED_FLAGS = frozenset("Eec")  # log file, escape char, ciphers: no effect on the route
# ssh_config keys that change the route or the trust and that bifrost does not implement.
_UNSUPPORTED_CONFIG = frozenset(
    (
        "bindaddress", "bindinterface", "certificatefile", "hostkeyalias", "knownhostscommand",
        "pkcs11provider", "proxyusefdpass", "securitykeyprovider", "tunnel", "tunneldevice",
    )
)  # fmt: skip


def _unsupported(text: str, what: str) -> TargetError:
    return TargetError(
        f"invalid target {text!r}: ssh option {what} is not supported by bifrost, and "
        "connecting without it could reach another host or trust another key (supported: "
        "-p, -l, -i, -J and -o Port/User/HostName/IdentityFile/ProxyJump/ProxyCommand)"
    )


def _bad(text: str, what: str) -> TargetError:
    return TargetError(f"invalid target {text!r}: {what}; {_EXAMPLES}")


def _check_port(text: str, port: str) -> int:
    # isdigit() alone accepts '²' and other Unicode digits that int() rejects.
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise _bad(text, f"port {port!r} is not a number between 1 and 65535")
    return int(port)


def _check_host(text: str, host: str) -> str:
    if not host:
        raise _bad(text, "the host is empty")
    if ":" in host:
        try:
            addr = str(ipaddress.IPv6Address(host))  # keeps a zone (fe80::1%eth0)
        except ValueError:
            raise _bad(text, f"{host!r} is not a valid IPv6 address") from None
        zone = addr.partition("%")[2]
        if zone and not re.fullmatch(r"[A-Za-z0-9_.-]+", zone):
            raise _bad(text, f"IPv6 zone {zone!r} is not an interface name")
        return addr
    if not _HOST_RE.match(host):
        raise _bad(text, f"host {host!r} contains characters not allowed in a host name")
    return host


def _check_user(text: str, user: str) -> str:
    if not _USER_RE.match(user):
        raise _bad(text, f"user {user!r} contains characters not allowed in a user name")
    return user


def _split_dest(text: str, dest: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` or ``[user@][v6]:port`` → (user, host, port)."""
    if dest.startswith("ssh://"):
        dest = dest[len("ssh://") :].rstrip("/")
    user: str | None = None
    if "@" in dest:
        user, dest = dest.rsplit("@", 1)
        user = _check_user(text, user)
    port: int | None = None
    if dest.startswith("["):
        end = dest.find("]")
        if end < 0:
            raise _bad(text, "an opening '[' has no matching ']'")
        host, rest = dest[1:end], dest[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _bad(text, f"unexpected {rest!r} after ']'")
            port = _check_port(text, rest[1:])
        return user, _check_host(text, host), port
    if dest.count(":") == 1:
        host, p = dest.split(":")
        port = _check_port(text, p)
        return user, _check_host(text, host), port
    return user, _check_host(text, dest), None


def _parse_ssh_command(text: str) -> tuple[str, dict[str, str | list[str]]]:
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise _bad(text, f"cannot split the ssh command ({exc})") from None
    argv = argv[1:]
    opts: dict[str, str | list[str]] = {}
    dest: str | None = None
    takes_arg = set("bBcDeEFIiJlLmOopQRSWw")
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and len(arg) > 1:
            # Flags may be bundled (`-tp 2222`, `-4Ap2222`): no-argument flags up to the first
            # flag that takes one, whose value is the rest of the word or the next word.
            j = 1
            while j < len(arg) and arg[j] not in takes_arg:
                j += 1
            if j == len(arg):
                i += 1  # only flags without an argument (-A, -t, -v ...): irrelevant here
                continue
            flag = arg[j]
            if j + 1 < len(arg):
                value: str | None = arg[j + 1 :]
                i += 1
            else:
                value = argv[i + 1] if i + 1 < len(argv) else None
                i += 2
            if value is None:
                raise _bad(text, f"option -{flag} needs a value")
            if flag == "p":
                opts["port"] = value
            elif flag == "l":
                opts["user"] = value
            elif flag == "i":
                files = opts.setdefault("identity", [])
                assert isinstance(files, list)
                files.append(os.path.expanduser(value))
            elif flag == "J":
                opts["jump"] = value
            elif flag == "o":
                key, _, val = value.replace("=", " ", 1).partition(" ")
                key, val = key.lower(), val.strip()
                if key in ("port", "user", "hostname"):
                    opts[key] = val
                elif key == "proxyjump":
                    opts["jump"] = val
                elif key == "proxycommand":
                    opts["proxycommand"] = val
                elif key == "identityfile":
                    files = opts.setdefault("identity", [])
                    assert isinstance(files, list)
                    files.append(os.path.expanduser(val))
                elif key not in _HARMLESS_OPTIONS:
                    raise _unsupported(text, f"-o {key}")
            elif flag not in _IGNORED_FLAGS:
                # -F, -L/-R/-D, -S, -b, -W ...: they change where or how ssh connects, and
                # connecting without them would be a silent surprise.
                raise _unsupported(text, f"-{flag}")
            continue
        if dest is None:
            dest = arg
            i += 1
            continue
        raise _bad(
            text,
            f"unexpected {arg!r} after the destination (a remote command is not part of a target)",
        )
    if dest is None:
        raise _bad(text, "the ssh command has no user@host destination")
    return dest, opts


def default_ssh_config() -> Path:
    """The ssh_config file aliases are looked up in: ``$BIFROST_SSH_CONFIG`` or ~/.ssh/config."""
    env = os.environ.get("BIFROST_SSH_CONFIG")
    return Path(env).expanduser() if env else Path.home() / ".ssh" / "config"


def _include_paths(value: str, base: Path) -> list[Path]:
    """``Include`` arguments → files, as OpenSSH: ``~`` expanded, relative paths relative to
    ``base`` (~/.ssh for a user config), globs expanded in sorted order."""
    out: list[Path] = []
    try:
        words = shlex.split(value)
    except ValueError:
        words = value.split()
    for word in words:
        raw = os.path.expanduser(word)
        pattern = raw if os.path.isabs(raw) else str(base / raw)
        out += [Path(p) for p in sorted(glob.glob(pattern))]
    return out


def _host_matches(host: str, patterns: list[str]) -> bool:
    # OpenSSH lowercases the host name and matches patterns case-insensitively.
    name = host.lower()
    pats = [p.lower() for p in patterns]
    if any(p.startswith("!") and fnmatch.fnmatchcase(name, p[1:]) for p in pats):
        return False
    return any(not p.startswith("!") and fnmatch.fnmatchcase(name, p) for p in pats)


def _ssh_config_lookup(host: str, config_path: Path | None) -> dict[str, list[str]]:
    """First-match-wins values from ssh_config ``Host`` blocks matching ``host`` (case-
    insensitive), following ``Include`` (relative to ~/.ssh, globs allowed)."""
    path = config_path if config_path is not None else default_ssh_config()
    found: dict[str, list[str]] = {}
    base = Path.home() / ".ssh"

    def read(file: Path, active: bool, depth: int) -> None:
        if depth > 16:
            raise TargetError(f"ssh_config Include nests too deeply (a loop?) at {file}")
        try:
            lines = file.read_text().splitlines()
        except OSError:
            return
        never = not active  # an Include in a non-matching block matches nothing inside
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.replace("=", " ", 1).partition(" ")
            key, value = key.lower(), value.strip()
            if key == "host":
                active = not never and _host_matches(host, value.split())
                continue
            if key == "match":
                active = False  # Match needs ssh's full evaluation; ignore rather than guess
                continue
            if not active:
                continue
            if key == "include":
                for inc in _include_paths(value, base):
                    read(inc, active, depth + 1)
                continue
            value = value.strip('"')
            if key in _UNSUPPORTED_CONFIG and value.lower() not in ("no", "none"):
                raise TargetError(
                    f"{file}: {key} for host {host!r} is not supported by bifrost, and "
                    "connecting without it could reach another host or trust another key; "
                    "use ProxyJump/ProxyCommand, or a Host block of its own for bifrost"
                )
            if key == "identityfile":
                found.setdefault(key, []).append(value)
            elif key not in found:
                found[key] = [value]

    read(path, True, 0)  # options before the first Host line apply to every host
    return found


def parse_target(text: str | Target, *, ssh_config: Path | None = None, _depth: int = 0) -> Target:
    """Parse a target string into a :class:`Target`.

    Accepted forms: ``user@host:port``, ``user@host``, ``host``, ``ssh://user@host:port``,
    ``ssh -p PORT [-i KEY] [-J JUMP] user@host``, IPv6 ``[::1]:2222`` / ``user@[::1]:2222``,
    an alias from ``~/.ssh/config`` (HostName, User, Port, IdentityFile, ProxyJump honoured;
    ``ssh_config`` or ``$BIFROST_SSH_CONFIG`` names another file) and ``local`` (this machine,
    no SSH). Raises :class:`TargetError` with a one-line reason.
    """
    if isinstance(text, Target):
        return text
    if not isinstance(text, str):
        raise TargetError(f"a target must be a string, not {type(text).__name__}")
    raw = text.strip()
    if not raw:
        raise _bad(text, "it is empty")
    if raw == "local":
        return LOCAL
    if _depth > 8:
        raise _bad(text, "ProxyJump nests too deeply (a loop in ~/.ssh/config?)")
    opts: dict[str, str | list[str]] = {}
    if raw == "ssh" or raw.startswith(("ssh ", "ssh\t")):
        dest, opts = _parse_ssh_command(raw)
    else:
        if any(c.isspace() for c in raw):
            raise _bad(text, "it contains spaces")
        dest = raw
    user, host, port = _split_dest(text, dest)
    if "user" in opts:
        user = _check_user(text, str(opts["user"]))
    if "port" in opts:
        port = _check_port(text, str(opts["port"]))

    cfg = _ssh_config_lookup(host, ssh_config)
    alias = None
    if "hostname" in opts:
        host = _check_host(text, str(opts["hostname"]))
    elif "hostname" in cfg:
        alias = host
        host = _check_host(text, cfg["hostname"][0].replace("%h", host))
    explicit_user = user is not None
    # A port given in the text or by ssh_config (an alias names one host:port) is definite;
    # `bifrost forget HOST` without one forgets every port of HOST.
    explicit_port = port is not None or "port" in cfg or alias is not None
    if user is None:
        user = _check_user(text, cfg["user"][0]) if "user" in cfg else getpass.getuser()
    if port is None:
        port = _check_port(text, cfg["port"][0]) if "port" in cfg else 22
    identity = list(opts.get("identity", []))
    identity += [os.path.expanduser(p) for p in cfg.get("identityfile", [])]
    jump_spec = opts.get("jump") or (cfg["proxyjump"][0] if "proxyjump" in cfg else None)
    proxy = opts.get("proxycommand") or (cfg["proxycommand"][0] if "proxycommand" in cfg else None)
    if isinstance(proxy, str) and proxy.lower() == "none":
        proxy = None
    if isinstance(jump_spec, str) and jump_spec.lower() == "none":
        jump_spec = None
    if proxy and jump_spec:
        raise _bad(text, "both ProxyJump and ProxyCommand are set; keep one")
    jumps: tuple[Target, ...] = ()
    if isinstance(jump_spec, str):
        jumps = tuple(
            parse_target(j.strip(), ssh_config=ssh_config, _depth=_depth + 1)
            for j in jump_spec.split(",")
            if j.strip()
        )
    return Target(
        host=host,
        user=user,
        port=port,
        identity_files=tuple(identity),
        proxy_jump=jumps,
        alias=alias,
        proxy_command=proxy if isinstance(proxy, str) else None,
        explicit_user=explicit_user,
        explicit_port=explicit_port,
    )
