from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bifrost import Host, TransferError, list_files
from bifrost import sync as sync_mod
from bifrost.testing import SSHServer


def _git_project(root: Path) -> Path:
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("*.log\n!keep.log\nbuild/\n")
    (root / "src").mkdir()
    (root / "src" / "main.py").write_text("print('hi')\n")
    (root / "src" / ".gitignore").write_text("secret.txt\n")
    (root / "src" / "secret.txt").write_text("no\n")
    (root / "keep.log").write_text("kept by negation\n")
    (root / "drop.log").write_text("ignored\n")
    (root / "build").mkdir()
    (root / "build" / "out.bin").write_text("ignored\n")
    (root / "it's $(weird) name.txt").write_text("quoted\n")
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(root),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "init",
        ],
        check=True,
    )
    (root / "untracked.py").write_text("new\n")  # untracked, not ignored: pushed
    return root


EXPECTED = [
    ".gitignore",
    "it's $(weird) name.txt",
    "keep.log",
    "src/.gitignore",
    "src/main.py",
    "untracked.py",
]


def test_list_files_has_exact_git_semantics(tmp_path: Path) -> None:
    assert list_files(_git_project(tmp_path / "p")) == EXPECTED


def test_list_files_bifrostignore(tmp_path: Path) -> None:
    (tmp_path / "d" / "data").mkdir(parents=True)
    (tmp_path / "d" / "a.py").write_text("")
    (tmp_path / "d" / "data" / "big.bin").write_text("")
    (tmp_path / "d" / "data" / "small.txt").write_text("")
    (tmp_path / "d" / "__pycache__").mkdir()
    (tmp_path / "d" / "__pycache__" / "x.pyc").write_text("")
    (tmp_path / "d" / ".bifrostignore").write_text("*.bin\n")
    assert list_files(tmp_path / "d") == [".bifrostignore", "a.py", "data/small.txt"]


def _remote_files(h: Host, name: str) -> list[str]:
    out = h.exec(f"cd ~/.bifrost/workspaces/{name} && find . -type f | sort").stdout
    return [line[2:] for line in out.splitlines()]


@pytest.mark.parametrize("method", ["rsync", "tar"])
def test_push_then_delete(
    host: Host,
    tmp_path: Path,
    method: str,
    monkeypatch: pytest.MonkeyPatch,
    workspace: Callable[[Host, str], str],
) -> None:
    if method == "tar":
        monkeypatch.setattr(sync_mod, "_has_local", lambda prog: False)
    root = _git_project(tmp_path / "proj")
    name = workspace(host, f"proj-{method}")
    res = host.push(root, name=name)
    assert res.method == method and res.files == len(EXPECTED)
    assert res.git_sha and res.dirty is True
    assert _remote_files(host, name) == EXPECTED
    (root / "untracked.py").unlink()
    (root / "src" / "main.py").write_text("print('changed')\n")
    res = host.push(root, name=name)
    assert res.deleted == 1
    assert _remote_files(host, name) == [f for f in EXPECTED if f != "untracked.py"]
    assert host.exec(f"cat ~/.bifrost/workspaces/{name}/src/main.py").stdout == "print('changed')\n"
    job = host.run("python3 src/main.py || echo nopython", workspace=name)
    assert job.wait(timeout=30).state == "succeeded"


def test_same_size_edit_within_the_same_second_is_pushed(
    host: Host, tmp_path: Path, workspace: Callable[[Host, str], str]
) -> None:
    name = workspace(host, "quick")
    root = _git_project(tmp_path / "quick")
    cfg = root / "cfg.txt"
    cfg.write_text("version = 1\n")
    host.push(root, name=name)
    # Same size, and the same whole second as the first push's copy: only the nanoseconds differ.
    st = cfg.stat()
    cfg.write_text("version = 2\n")
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    host.push(root, name=name)
    assert host.exec(f"cat ~/.bifrost/workspaces/{name}/cfg.txt").stdout == "version = 2\n"


def test_push_rejects_bad_names(host: Host, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="invalid workspace name"):
        host.push(tmp_path, name="../../etc")


def test_push_local_target(local_home: Path, tmp_path: Path) -> None:
    root = _git_project(tmp_path / "lp")
    with Host("local") as h:
        res = h.push(root, name="lp")
    assert (
        sorted(
            str(p.relative_to(local_home / ".bifrost/workspaces/lp"))
            for p in (local_home / ".bifrost/workspaces/lp").rglob("*")
            if p.is_file()
        )
        == EXPECTED
    )
    assert res.files == len(EXPECTED)


def test_pull_and_upload_trees(host: Host, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "deep.txt").write_text("deep\n")
    (src / "top; rm -rf ~.txt").write_text("top\n")
    host.exec("rm -rf ~/bifrost-upload-test")
    dest = host.upload(src, "~/bifrost-upload-test")
    assert dest == host.home() + "/bifrost-upload-test"
    pulled = host.pull("~/bifrost-upload-test", tmp_path / "back")
    assert (pulled / "a" / "b" / "deep.txt").read_text() == "deep\n"
    assert (pulled / "top; rm -rf ~.txt").read_text() == "top\n"
    (tmp_path / "into").mkdir()
    one = host.pull("bifrost-upload-test/a/b/deep.txt", tmp_path / "into")
    assert one == tmp_path / "into" / "deep.txt"
    with pytest.raises(TransferError, match="does not exist"):
        host.pull("~/no/such/file", tmp_path)
    host.exec("rm -rf ~/bifrost-upload-test")


def test_nonroot_push_and_job(
    sshd_nonroot: SSHServer, tmp_path: Path, workspace: Callable[[Host, str], str]
) -> None:
    root = _git_project(tmp_path / "nr")
    with Host(sshd_nonroot.target, identity_file=sshd_nonroot.client_key) as h:
        name = workspace(h, "nr")
        res = h.push(root, name=name)
        assert _remote_files(h, name) == EXPECTED
        job = h.run("pwd; ls", workspace=name)
        assert job.wait(timeout=30).state == "succeeded"
        first = job.logs().splitlines()[0]
        assert first == h.home() + f"/.bifrost/workspaces/{name}"
        assert res.files == len(EXPECTED)


def test_upload_and_pull_a_tree_again_merge_in_place(host: Host, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("v1\n")
    base = f"bifrost-remerge-{os.getpid()}"
    host.exec(f"rm -rf ~/{base} && mkdir -p ~/{base}/dst")
    try:
        first = host.upload(src, f"~/{base}/dst")
        assert first == f"{host.home()}/{base}/dst/tree"
        (src / "sub" / "f.txt").write_text("v2\n")
        (src / "new.txt").write_text("new\n")
        again = host.upload(src, f"~/{base}/dst")
        assert again == first
        listing = host.exec(f"cd ~/{base}/dst && find . -type f | sort").stdout.split()
        assert listing == ["./tree/new.txt", "./tree/sub/f.txt"]
        assert host.exec(f"cat ~/{base}/dst/tree/sub/f.txt").stdout == "v2\n"
        into = tmp_path / "into"
        into.mkdir()
        p1 = host.pull(f"~/{base}/dst/tree", into)
        host.exec(f"echo v3 > ~/{base}/dst/tree/sub/f.txt")
        p2 = host.pull(f"~/{base}/dst/tree", into)
        assert p1 == p2 == into / "tree"
        assert sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file()) == [
            "tree/new.txt",
            "tree/sub/f.txt",
        ]
        assert (into / "tree" / "sub" / "f.txt").read_text() == "v3\n"
        assert not [p for p in into.rglob("*") if "bifrost-part" in p.name]
    finally:
        host.exec(f"rm -rf ~/{base}")


def test_interrupted_single_file_pull_leaves_no_partial_file(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bifrost.transport import ssh as ssh_mod

    host.exec("echo complete > ~/bifrost-partial.txt")
    (tmp_path / "out.txt").write_text("old\n")

    async def broken_get(self, remote, local, *, progress=None):  # type: ignore[no-untyped-def]
        Path(local).write_bytes(b"compl")  # half of it, then the link dies
        raise OSError("connection reset")

    monkeypatch.setattr(ssh_mod.SSHTransport, "get", broken_get)
    with pytest.raises(TransferError, match="connection reset"):
        host.pull("~/bifrost-partial.txt", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    monkeypatch.undo()
    assert host.pull("~/bifrost-partial.txt", tmp_path / "out.txt") == tmp_path / "out.txt"
    assert (tmp_path / "out.txt").read_text() == "complete\n"
    host.exec("rm -f ~/bifrost-partial.txt")


def test_pull_says_permission_denied(sshd_nonroot: SSHServer, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs a login user who cannot read /root (tests run as root)")
    with Host(sshd_nonroot.target, identity_file=sshd_nonroot.client_key) as h:
        with pytest.raises(TransferError, match="permission denied"):
            h.pull("/root/.bashrc", tmp_path)
        with pytest.raises(TransferError, match="does not exist"):
            h.pull("~/no-such-file", tmp_path)


@pytest.mark.parametrize("method", ["rsync", "tar"])
def test_push_survives_file_dir_type_changes(
    host: Host,
    tmp_path: Path,
    method: str,
    monkeypatch: pytest.MonkeyPatch,
    workspace: Callable[[Host, str], str],
) -> None:
    if method == "tar":
        monkeypatch.setattr(sync_mod, "_has_local", lambda prog: False)
    root = tmp_path / "retype"
    (root / "d").mkdir(parents=True)
    (root / "foo").write_text("a file\n")
    (root / "d" / "x.txt").write_text("in a dir\n")
    (root / "keep.txt").write_text("keep\n")
    name = workspace(host, f"retype-{method}")
    host.push(root, name=name)
    # foo: file → directory; d: directory → file
    (root / "foo").unlink()
    (root / "foo").mkdir()
    (root / "foo" / "child").write_text("child\n")
    (root / "d" / "x.txt").unlink()
    (root / "d").rmdir()
    (root / "d").write_text("now a file\n")
    res = host.push(root, name=name)
    assert res.method == method
    assert _remote_files(host, name) == ["d", "foo/child", "keep.txt"]
    assert host.exec(f"cat ~/.bifrost/workspaces/{name}/d").stdout == "now a file\n"
    # and back again, then a plain push still works
    (root / "d").unlink()
    (root / "d").mkdir()
    (root / "d" / "y.txt").write_text("y\n")
    host.push(root, name=name)
    assert _remote_files(host, name) == ["d/y.txt", "foo/child", "keep.txt"]


def test_push_bootstrap_and_extra_misuse_is_an_error(
    sshd: SSHServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bifrost.cli import main

    root = tmp_path / "nolock"
    root.mkdir()
    (root / "a.py").write_text("")
    key = str(sshd.client_key)
    assert main(["push", "-i", key, "--bootstrap", sshd.target, str(root)]) == 2
    assert "uv.lock" in capsys.readouterr().err
    assert main(["push", "-i", key, "--extra", "dev", sshd.target, str(root)]) == 2
    assert "--bootstrap" in capsys.readouterr().err
    with Host(sshd.target, identity_file=sshd.client_key) as h:
        with pytest.raises(TransferError, match="uv.lock"):
            h.push(root, bootstrap=True)
        with pytest.raises(TransferError, match="bootstrap"):
            h.push(root, extras=["dev"])


def test_bifrostignore_star_does_not_cross_slash(tmp_path: Path) -> None:
    root = tmp_path / "ig"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "top.md").write_text("")
    (root / "a" / "b" / "deep.md").write_text("")
    (root / "c" / "x").mkdir(parents=True)
    (root / "c" / "x" / "y.log").write_text("")
    (root / "c" / "z.log").write_text("")
    (root / ".bifrostignore").write_text("a/*.md\nc/**/*.log\n")
    assert list_files(root) == [".bifrostignore", "a/b/deep.md"]


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t",
                    "-c", "protocol.file.allow=always", *args],
                   check=True, capture_output=True)  # fmt: skip


def test_bifrostignore_applies_inside_a_git_repo(tmp_path: Path) -> None:
    root = _git_project(tmp_path / "g")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_text("x")
    (root / "notes.md").write_text("n")
    (root / ".bifrostignore").write_text("data/\n*.md\n!keep.log\n")
    files = list_files(root)
    assert "data/big.bin" not in files and "notes.md" not in files
    assert "keep.log" in files and ".bifrostignore" in files and "src/main.py" in files


def test_submodules_are_refused_or_pushed(
    host: Host, tmp_path: Path, workspace: Callable[[Host, str], str]
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    _git(lib, "init", "-q")
    (lib / "lib.py").write_text("LIB = 1\n")
    _git(lib, "add", "-A")
    _git(lib, "commit", "-qm", "lib")
    root = _git_project(tmp_path / "withsub")
    _git(root, "submodule", "add", "-q", str(lib), "vendor/lib")
    name = workspace(host, "withsub")
    with pytest.raises(TransferError, match=r"submodules \(vendor/lib\).*submodules=True"):
        host.push(root, name=name)
    res = host.push(root, name=name, submodules=True)
    assert "vendor/lib/lib.py" in _remote_files(host, name)
    assert res.files == len(list_files(root, with_submodules=True))


def test_same_named_projects_do_not_share_a_workspace(
    host: Host, tmp_path: Path, workspace: Callable[[Host, str], str]
) -> None:
    name = workspace(host, "twin")
    first = tmp_path / "a" / "proj"
    second = tmp_path / "b" / "proj"
    for root, f in ((first, "first.txt"), (second, "second.txt")):
        root.mkdir(parents=True)
        (root / f).write_text(f)
    host.push(first, name=name)
    with pytest.raises(TransferError, match="holds another project, pushed from .*/a/proj"):
        host.push(second, name=name)
    assert _remote_files(host, name) == ["first.txt"]  # nothing deleted
    host.push(second, name=name, force=True)
    assert _remote_files(host, name) == ["second.txt"]
    host.push(second, name=name)  # its own workspace now: no complaint


def test_push_removes_directories_emptied_by_deletes_and_renames(
    host: Host, tmp_path: Path, workspace: Callable[[Host, str], str]
) -> None:
    name = workspace(host, "emptied")
    root = tmp_path / "emptied"
    (root / "old" / "deep").mkdir(parents=True)
    (root / "old" / "deep" / "a.py").write_text("a")
    (root / "keep").mkdir()
    (root / "keep" / "b.py").write_text("b")
    (root / "keep" / "gone.py").write_text("g")
    host.push(root, name=name)
    host.exec(f"mkdir -p ~/.bifrost/workspaces/{name}/keep/results && touch "
              f"~/.bifrost/workspaces/{name}/keep/results/r.txt")  # fmt: skip
    (root / "old" / "deep" / "a.py").rename(root / "new.py")  # a rename out of old/deep/
    (root / "keep" / "gone.py").unlink()
    host.push(root, name=name)
    dirs = host.exec(f"cd ~/.bifrost/workspaces/{name} && find . -type d | sort").stdout.split()
    assert dirs == [".", "./keep", "./keep/results"]  # old/ and old/deep/ went; job output stays
