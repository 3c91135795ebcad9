from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from bifrost import Target, TargetError, parse_target


@pytest.mark.parametrize(
    ("text", "user", "host", "port"),
    [
        ("root@1.2.3.4:22022", "root", "1.2.3.4", 22022),
        ("root@1.2.3.4", "root", "1.2.3.4", 22),
        ("ssh -p 2222 ubuntu@box.example.com", "ubuntu", "box.example.com", 2222),
        ("ssh ubuntu@box -p 2222", "ubuntu", "box", 2222),
        ("ssh -o Port=7 -l me h", "me", "h", 7),
        ("[::1]:2222", getpass.getuser(), "::1", 2222),
        ("me@[2001:db8::1]:22", "me", "2001:db8::1", 22),
        ("ssh://a@b:3", "a", "b", 3),
        ("  root@h:1  ", "root", "h", 1),
    ],
)
def test_forms(text: str, user: str, host: str, port: int, tmp_path: Path) -> None:
    t = parse_target(text, ssh_config=tmp_path / "none")
    assert (t.user, t.host, t.port) == (user, host, port)
    assert not t.is_local


def test_local() -> None:
    assert parse_target("local").is_local
    assert str(parse_target("local")) == "local"


def test_identity_from_ssh_command(tmp_path: Path) -> None:
    t = parse_target("ssh -i ~/k.pem -p 5 root@h", ssh_config=tmp_path / "none")
    assert t.identity_files[0].endswith("/k.pem") and not t.identity_files[0].startswith("~")


def test_roundtrip_str() -> None:
    assert str(parse_target("u@[::1]:2")) == "u@[::1]:2"
    assert parse_target(str(parse_target("u@h:9"))) == parse_target("u@h:9")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("root@h:abc", "port 'abc'"),
        ("root@h:0", "port '0'"),
        ("root@h:70000", "port '70000'"),
        ("", "empty"),
        ("root@h; rm -rf ~", "spaces"),
        ("ro ot@h", "spaces"),
        ("[::1", "no matching"),
        ("[nothex::zz]:2", "IPv6"),
        ("bad$(x)@h", "user"),
        ("u@h$(id)", "host"),
        ("ssh -p", "needs a value"),
        ("ssh -p 22", "no user@host"),
        ("ssh u@h uptime", "remote command"),
    ],
)
def test_bad_input_is_one_clear_line(text: str, fragment: str) -> None:
    with pytest.raises(TargetError) as info:
        parse_target(text)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg
    assert "expected user@host" in msg


def test_ssh_config_alias_and_proxyjump(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text(
        "Host gpu\n  HostName 10.0.0.5\n  User ubuntu\n  Port 2200\n  IdentityFile ~/.ssh/gpu\n"
        "  ProxyJump bastion\n\n"
        "Host bastion\n  HostName 1.2.3.4\n  User jump\n\n"
        "Host *\n  User fallback\n"
    )
    t = parse_target("gpu", ssh_config=cfg)
    assert (t.user, t.host, t.port, t.alias) == ("ubuntu", "10.0.0.5", 2200, "gpu")
    assert t.identity_files[0].endswith(".ssh/gpu")
    assert len(t.proxy_jump) == 1
    jump = t.proxy_jump[0]
    assert (jump.user, jump.host, jump.port) == ("jump", "1.2.3.4", 22)
    assert t.display == "gpu"
    # explicit values win over the config; Host * supplies defaults
    assert parse_target("root@gpu:1", ssh_config=cfg).user == "root"
    assert parse_target("other", ssh_config=cfg).user == "fallback"


def test_proxyjump_loop_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text("Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n")
    with pytest.raises(TargetError, match="ProxyJump"):
        parse_target("a", ssh_config=cfg)


def test_target_passthrough() -> None:
    t = Target(host="h", user="u", port=1)
    assert parse_target(t) is t


def test_ssh_config_include_and_case_insensitive_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".ssh" / "conf.d").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (home / ".ssh" / "conf.d" / "10-gpu.conf").write_text(
        "Host GPUBox\n  HostName 10.0.0.9\n  Port 2201\n  User ml\n"
    )
    (home / ".ssh" / "conf.d" / "20-other.conf").write_text("Host other\n  HostName 10.0.0.10\n")
    cfg = home / ".ssh" / "config"
    cfg.write_text("Include conf.d/*.conf\n\nHost *\n  User fallback\n")
    t = parse_target("gpubox", ssh_config=cfg)
    assert (t.host, t.port, t.user, t.alias) == ("10.0.0.9", 2201, "ml", "gpubox")
    assert parse_target("OTHER", ssh_config=cfg).host == "10.0.0.10"
    assert parse_target("OTHER", ssh_config=cfg).user == "fallback"
    # an Include inside a non-matching Host block contributes nothing
    cfg.write_text("Host nomatch\n  Include conf.d/*.conf\n")
    assert parse_target("gpubox", ssh_config=cfg).host == "gpubox"


@pytest.mark.parametrize(
    ("text", "user", "host", "port"),
    [
        ("ssh -tp 2222 u@h", "u", "h", 2222),
        ("ssh -4Ap2200 u@h", "u", "h", 2200),
        ("ssh -At -l me -p 7 h", "me", "h", 7),
        ("u@[fe80::1%eth0]:22", "u", "fe80::1%eth0", 22),
    ],
)
def test_bundled_flags_and_zones(
    text: str, user: str, host: str, port: int, tmp_path: Path
) -> None:
    t = parse_target(text, ssh_config=tmp_path / "none")
    assert (t.user, t.host, t.port) == (user, host, port)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("user@host:²", "port '²'"), ("u@[fe80::1%e;x]:22", "zone")],
)
def test_more_bad_targets(text: str, fragment: str) -> None:
    with pytest.raises(TargetError, match="expected user@host") as info:
        parse_target(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "ssh -F /tmp/other_config root@h",
        "ssh -L 8080:localhost:80 root@h",
        "ssh -S /tmp/ctl root@h",
        "ssh -o HostKeyAlias=other root@h",
        "ssh -o ProxyUseFdpass=yes root@h",
        "ssh -b 10.0.0.1 root@h",
    ],
)
def test_unsupported_ssh_options_are_refused(text: str) -> None:
    with pytest.raises(TargetError, match="not supported by bifrost"):
        parse_target(text)


def test_harmless_ssh_options_are_accepted_and_proxycommand_kept(tmp_path: Path) -> None:
    t = parse_target("ssh -o ServerAliveInterval=5 -o ProxyCommand='nc %h %p' -p 2 root@h")
    assert (t.host, t.port, t.proxy_command) == ("h", 2, "nc %h %p")
    cfg = tmp_path / "config"
    cfg.write_text("Host pc\n  HostName 10.0.0.9\n  ProxyCommand ssh -W %h:%p gw\n"
                   "Host fd\n  HostName 10.0.0.8\n  HostKeyAlias other\n")  # fmt: skip
    assert parse_target("pc", ssh_config=cfg).proxy_command == "ssh -W %h:%p gw"
    with pytest.raises(TargetError, match="hostkeyalias for host 'fd' is not supported"):
        parse_target("fd", ssh_config=cfg)
    with pytest.raises(TargetError, match="both ProxyJump and ProxyCommand"):
        parse_target("ssh -J gw -o ProxyCommand='nc %h %p' root@h")
