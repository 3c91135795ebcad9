"""push: the local project → ``~/.bifrost/workspaces/<name>`` (git semantics, deletions, uv env)."""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bifrost.errors import CommandError, TransferError
from bifrost.exec import capture, nul_join, nul_split
from bifrost.transport.base import Transport

if TYPE_CHECKING:
    from bifrost.session import Session

__all__ = ["PushResult", "list_files"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
DEFAULT_IGNORES = (".git/", "__pycache__/", "*.pyc", ".venv/", ".mypy_cache/", ".pytest_cache/")


@dataclass(frozen=True)
class PushResult:
    """What a push did. ``method`` is ``rsync`` or ``tar``; ``bootstrapped`` is ``synced``,
    ``skipped`` (env stamp unchanged) or None (no bootstrap asked; asking without a uv.lock is
    an error); ``uv_installed`` says the bootstrap had to install uv first."""

    target: str
    workspace: str
    files: int
    deleted: int
    method: str
    git_sha: str | None
    dirty: bool | None
    bootstrapped: str | None
    duration: float
    uv_installed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        return asdict(self)


def check_workspace_name(name: str) -> str:
    """Workspace names become remote path components: keep them boring."""
    if not _NAME.match(name):
        raise TransferError(
            f"invalid workspace name {name!r}: use letters, digits, '.', '_', '-' (max 100)"
        )
    return name


def workspace_path(name: str) -> str:
    """Remote workspace path, relative to the remote home."""
    return f"~/.bifrost/workspaces/{name}"


def venv_path(name: str) -> str:
    """Remote venv of a workspace: outside the synced tree, so a sync never clobbers it."""
    return f"~/.bifrost/venvs/{name}"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, check=False)


def _is_git(root: Path) -> bool:
    r = _git(root, "rev-parse", "--is-inside-work-tree")
    return r.returncode == 0 and r.stdout.strip() == b"true"


def _read_ignore(root: Path) -> list[str]:
    return list(DEFAULT_IGNORES) + _read_bifrostignore(root)


@functools.lru_cache(maxsize=256)
def _glob_re(pat: str) -> re.Pattern[str]:
    """A gitignore glob as a regex over a relative path: ``*``, ``?`` and ``[...]`` never cross
    ``/`` (fnmatch's ``*`` does: ``a/*.md`` would match ``a/b/deep.md``); ``**/`` matches any
    number of directories, a trailing ``/**`` everything inside."""
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif (
            c == "["
            and (end := pat.find("]", i + (2 if pat[i + 1 : i + 2] in ("!", "^") else 1))) > 0
        ):
            body = pat[i + 1 : end]
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _ignored(rel: str, is_dir: bool, patterns: Sequence[str]) -> bool:
    """gitignore semantics: last matching pattern wins, ``!`` negates, ``/`` suffix = dirs only,
    a pattern with a ``/`` inside is anchored at the root (``*`` not crossing ``/``, ``**``
    crossing it), others match the name at any depth."""
    verdict = False
    name = rel.rsplit("/", 1)[-1]
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        dir_only = pat.endswith("/")
        pat = pat.rstrip("/")
        if dir_only and not is_dir:
            continue
        anchored = "/" in pat
        pat = pat.lstrip("/")
        hit = _glob_re(pat).match(rel) is not None if anchored else fnmatch.fnmatchcase(name, pat)
        if hit:
            verdict = not neg
    return verdict


def _read_bifrostignore(root: Path) -> list[str]:
    try:
        text = (root / ".bifrostignore").read_text()
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _excluded(rel: str, patterns: Sequence[str]) -> bool:
    """A file is excluded when it, or any directory above it, is ignored (as in git, a file
    under an excluded directory cannot be re-included)."""
    parts = rel.split("/")
    for i in range(1, len(parts)):
        if _ignored("/".join(parts[:i]), True, patterns):
            return True
    return _ignored(rel, False, patterns)


def submodules(root: str | Path) -> list[str]:
    """Paths of the git submodules (gitlinks) of the work tree at ``root``, sorted."""
    root = Path(root)
    if not _is_git(root):
        return []
    r = _git(root, "ls-files", "--stage", "-z")
    out = []
    for entry in nul_split(r.stdout):
        meta, _, path = entry.partition("\t")
        if meta.startswith("160000 "):
            out.append(path)
    return sorted(out)


def list_files(root: str | Path, *, with_submodules: bool = False) -> list[str]:
    """Files to push, relative to ``root``, sorted.

    In a git work tree: ``git ls-files --cached --others --exclude-standard -z`` (exact git
    ignore semantics; uncommitted and untracked-but-not-ignored files included; files deleted
    but not yet committed left out), minus what a ``.bifrostignore`` at the root excludes.
    Elsewhere: a walk honouring ``.bifrostignore``. A git submodule is a directory git lists as
    one entry: with ``with_submodules`` its own files are listed (recursively), otherwise it is
    left out (``push`` refuses such a project unless asked to push submodules).
    """
    root = Path(root)
    if _is_git(root):
        r = _git(root, "ls-files", "--cached", "--others", "--exclude-standard", "-z")
        if r.returncode != 0:
            raise TransferError(f"git ls-files failed in {root}: {r.stderr.decode().strip()}")
        names = set(nul_split(r.stdout))
        files = {n for n in names if (root / n).is_file() or (root / n).is_symlink()}
        if with_submodules:
            for sub in submodules(root):
                if not (root / sub / ".git").exists():
                    raise TransferError(
                        f"git submodule {sub!r} in {root} is not checked out: run "
                        "`git submodule update --init --recursive` first"
                    )
                files |= {f"{sub}/{f}" for f in list_files(root / sub, with_submodules=True)}
        patterns = _read_bifrostignore(root)
        return sorted(f for f in files if not (patterns and _excluded(f, patterns)))
    patterns = _read_ignore(root)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not _ignored(rel_dir + d, True, patterns))
        out += [rel_dir + f for f in filenames if not _ignored(rel_dir + f, False, patterns)]
    return sorted(out)


def _git_state(root: Path) -> tuple[str | None, bool | None]:
    if not _is_git(root):
        return None, None
    sha = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain")
    return (sha.stdout.decode().strip() or None) if sha.returncode == 0 else None, bool(
        dirty.stdout.strip()
    )


async def _tar_stream(root: Path, files: list[str]) -> AsyncIterator[bytes]:
    proc = await asyncio.create_subprocess_exec(
        "tar", "--null", "-T", "-", "-cf", "-",
        cwd=str(root), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    assert proc.stdout is not None

    async def feed() -> None:
        assert proc.stdin is not None
        proc.stdin.write(nul_join(files))
        await proc.stdin.drain()
        proc.stdin.close()

    feeder = asyncio.create_task(feed())
    while chunk := await proc.stdout.read(1 << 16):
        yield chunk
    await feeder
    if await proc.wait() != 0:
        err = (await proc.stderr.read()).decode() if proc.stderr else ""
        raise TransferError(f"local tar failed: {err.strip()}")


# rsync's remote shell when pushing over SSH: instead of a new `ssh` (a full handshake, the
# largest part of an incremental push), rsync's stream rides a channel of the connection this
# process already has, through a private Unix socket served by `bifrost.holder`'s request
# handler. rsync runs it as `python -S rsh.py SOCKET HOST rsync --server ...`.
_RSH = """\
import json, os, socket, struct, sys, threading
args = sys.argv[3:]
if args[:1] == ["-l"]:
    args = args[2:]
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"op": "run", "command": " ".join(args)}).encode() + b"\\n")
H = struct.Struct(">cI")
def up():
    while True:
        d = os.read(0, 65536)
        s.sendall(H.pack(b"i", len(d)) + d)
        if not d:
            return
threading.Thread(target=up, daemon=True).start()
f = s.makefile("rb")
def out(fd, d):
    while d:
        d = d[os.write(fd, d):]
while True:
    h = f.read(5)
    if len(h) < 5:
        sys.exit(255)
    k, n = H.unpack(h)
    d = f.read(n)
    if k == b"o":
        out(1, d)
    elif k == b"e":
        out(2, d)
    elif k == b"x":
        sys.exit(json.loads(d).get("rc", 255))
"""


async def _rsync(
    t: Transport, root: Path, files: list[str], dest_abs: str, shell: tuple[list[str], str]
) -> None:
    ssh_args, prefix = shell
    # rsync's quick check compares whole seconds by default, so an edit that keeps a file's size
    # within the second of the last push would be skipped; -1 compares nanoseconds too.
    cmd = ["rsync", "-a", "--modify-window=-1", "--files-from=-", "--from0"]
    if ssh_args:
        cmd += ["-z", "-e", " ".join(shlex.quote(a) for a in ssh_args)]
    cmd += [str(root) + "/", prefix + dest_abs + "/"]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate(nul_join(files))
    if proc.returncode != 0:
        raise TransferError(f"rsync to {t.target.display} failed: {err.decode().strip()}")


async def _rsync_tunneled(
    host: Session, t: Transport, root: Path, files: list[str], dest_abs: str
) -> None:
    """rsync with its remote shell tunnelled over ``host``'s open connection (see _RSH)."""
    import sys
    import tempfile

    from bifrost.holder import _Holder

    tmp = Path(tempfile.mkdtemp(prefix="bifrost-rsh-"))  # 0700: only we reach the socket
    try:
        (tmp / "rsh.py").write_text(_RSH)
        sock = tmp / "s"
        server = await asyncio.start_unix_server(_Holder(host, sock, 0).handle, str(sock))
        try:
            rsh = [sys.executable, "-S", str(tmp / "rsh.py"), str(sock)]
            await _rsync(t, root, files, dest_abs, (rsh, "bifrost:"))
        finally:
            server.close()
            await server.wait_closed()
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


def _env_stamp(root: Path, extras: Sequence[str]) -> str | None:
    lock = root / "uv.lock"
    if not lock.is_file():
        return None
    h = hashlib.sha256(lock.read_bytes())
    for name in (".python-version", "pyproject.toml"):
        p = root / name
        if p.is_file():
            h.update(p.read_bytes())
    h.update(",".join(sorted(extras)).encode())
    return h.hexdigest()[:32]


# Astral's installer into ~/.local/bin (which every bifrost command puts first on PATH),
# without touching the user's shell rc files. Needs the network; runs only when uv is absent.
UV_INSTALLER = (
    "if command -v curl >/dev/null 2>&1; then curl -LsSf https://astral.sh/uv/install.sh; "
    "elif command -v wget >/dev/null 2>&1; then wget -qO- https://astral.sh/uv/install.sh; "
    'else echo "bifrost: neither curl nor wget to install uv with" >&2; exit 5; fi | '
    'env UV_INSTALL_DIR="$HOME/.local/bin" INSTALLER_NO_MODIFY_PATH=1 sh'
)


def bootstrap_script(
    name: str, stamp: str, extras: Sequence[str], *, install_uv: bool, installer: str | None = None
) -> str:
    """The remote script behind ``push(bootstrap=True)``: print ``skipped`` when the env stamp
    (lock, python pin, pyproject, extras) and the venv are unchanged; otherwise make sure uv is
    there (installing it with ``installer`` when ``install_uv``, printing ``uv=installed``), run
    ``uv sync --locked`` into ``~/.bifrost/venvs/<name>`` and print ``synced``."""
    check_workspace_name(name)
    venv = '"$HOME/.bifrost/venvs/' + name + '"'
    stamp_file = f'"$HOME/.bifrost/state/{name}/env_stamp"'
    extra_args = " ".join(f"--extra {shlex.quote(x)}" for x in extras)
    if install_uv:
        get_uv = (
            "if ! command -v uv >/dev/null 2>&1; then "
            f"{{ {installer or UV_INSTALLER}; }} >&2 || exit 5; hash -r; "
            "command -v uv >/dev/null 2>&1 || { echo 'bifrost: uv install failed' >&2; exit 5; }; "
            "echo uv=installed; fi; "
        )
    else:
        get_uv = "command -v uv >/dev/null 2>&1 || { echo 'bifrost: uv not found' >&2; exit 5; }; "
    return "".join(
        [
            'export PATH="$HOME/.local/bin:$PATH"; ',
            f'if [ "$(cat {stamp_file} 2>/dev/null)" = {stamp} ] && [ -d {venv} ]; ',
            "then echo skipped; exit 0; fi; ",
            get_uv,
            f'cd "$HOME/.bifrost/workspaces/{name}" && ',
            f"UV_PROJECT_ENVIRONMENT={venv} uv sync --locked {extra_args} >&2 && ",
            f"echo {stamp} > {stamp_file} && echo synced",
        ]
    )


async def _bootstrap(
    t: Transport, name: str, stamp: str, extras: Sequence[str], *, install_uv: bool
) -> tuple[str, bool]:
    """Run :func:`bootstrap_script`; returns (``synced``/``skipped``, uv was installed)."""
    script = bootstrap_script(name, stamp, extras, install_uv=install_uv)
    try:
        lines = (await capture(t, script, check=True)).stdout.split()
    except CommandError as exc:
        detail = exc.result.stderr.strip().splitlines()[-5:]
        raise TransferError(
            f"environment bootstrap on {t.target.display} failed (exit {exc.result.exit_code}): "
            + " | ".join(detail)
        ) from None
    return (lines[-1] if lines else "unknown"), "uv=installed" in lines


def _git_listing(root: Path, with_submodules: bool) -> tuple[list[str], list[str]]:
    """(files to push, submodules left out): a project with submodules is refused unless they
    are pushed, since leaving their contents out would look like a successful push."""
    subs = [] if with_submodules else submodules(root)
    return list_files(root, with_submodules=with_submodules), subs


async def apush(
    host: Session,
    root: Path,
    *,
    name: str | None = None,
    bootstrap: bool = False,
    extras: Sequence[str] = (),
    progress: bool = False,
    submodules: bool = False,
    force: bool = False,
) -> PushResult:
    """Coroutine behind :meth:`bifrost.Host.push`.

    rsync ``--files-from`` when both ends have rsync (tar over SSH otherwise); files removed
    locally since the last push are removed remotely (manifest diff), and so are directories
    that became empty that way; git sha and dirty flag are recorded in the manifest
    (``~/.bifrost/state/<name>/manifest.json``). A project with git submodules is refused
    unless ``submodules=True`` (their files are then pushed too). A workspace last pushed from
    another local directory (two projects with the same directory name) is refused unless
    ``force=True``: the push would delete the other project's files. With ``bootstrap`` and a
    uv.lock, uv is installed if absent and ``uv sync --locked`` runs into
    ``~/.bifrost/venvs/<name>``, skipped when lock, python pin and extras are unchanged.
    """
    started = time.monotonic()
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise TransferError(f"cannot push {root}: not a directory")
    name = check_workspace_name(name or re.sub(r"[^A-Za-z0-9._-]+", "-", root.name).strip(".-"))
    if extras and not bootstrap:
        raise TransferError("extras only apply to the environment bootstrap: add bootstrap=True")
    if bootstrap and not (root / "uv.lock").is_file():
        raise TransferError(
            f"cannot bootstrap: no uv.lock in {root} (run `uv lock` there, or push without it)"
        )
    t = await host.atransport()
    state = f'"$HOME/.bifrost/state/{name}"'
    # The local listing and the remote probe run concurrently: neither needs the other.
    probe_cmd = (
        f'mkdir -p "$HOME/.bifrost/workspaces/{name}" {state} && echo "$HOME" && '
        "{ command -v rsync >/dev/null 2>&1 && echo rsync=yes || echo rsync=no; }; "
        f"cat {state}/manifest.json 2>/dev/null || true"
    )
    (files, left_out), (sha, dirty), probe_result = await asyncio.gather(
        asyncio.to_thread(_git_listing, root, submodules),
        asyncio.to_thread(_git_state, root),
        capture(t, probe_cmd, check=True),
    )
    if left_out:
        raise TransferError(
            f"{root} has git submodules ({', '.join(left_out)}) whose files would not be "
            "pushed: push them too with submodules=True (CLI: --submodules)"
        )
    home, _, rest = probe_result.stdout.partition("\n")
    first, _, old_manifest = rest.partition("\n")
    ws_abs = f"{home}/.bifrost/workspaces/{name}"
    try:
        old = json.loads(old_manifest) if old_manifest.strip() else {}
        old_files = set(old["files"]) if old else set()
    except (ValueError, KeyError, TypeError):
        old, old_files = {}, set()
    origin = {"root": str(root), "host": socket.gethostname()}
    old_origin = {k: old.get(k) for k in origin} if isinstance(old, dict) else {}
    if (
        not force
        and old_files
        and old_origin.get("root")
        and (old_origin["root"], old_origin.get("host") or origin["host"])
        != (origin["root"], origin["host"])
    ):
        where = str(old_origin["root"]) + (
            f" on {old_origin['host']}" if old_origin.get("host") not in (None, origin["host"])
            else ""
        )  # fmt: skip
        raise TransferError(
            f"workspace {name!r} on {host.name} holds another project, pushed from {where}: "
            "pushing would delete its files. Pick another name (name=..., CLI --name), or "
            "force=True (CLI --force) to replace it"
        )
    deleted = sorted(old_files - set(files))
    safe_deleted = [p for p in deleted if _safe_rel(p)]
    # Stale paths go BEFORE the transfer, so a path that changed type can be written: a file
    # that became a directory (`foo` → `foo/child`) is in `deleted`; a directory that became a
    # file (`d/x` → `d`) is a new file some old entry lived under. `rm -rf` of exactly those
    # relative paths, inside the workspace: nothing else is ever removed.
    old_dirs = _parents(old_files)
    retyped = [f for f in files if f in old_dirs and _safe_rel(f)]
    stale = sorted(set(safe_deleted) | set(retyped))
    if stale:
        # Directories the deletions emptied go too (deepest first; `rmdir` only removes empty
        # ones, so whatever a job wrote there stays).
        emptied = sorted(_parents(safe_deleted) - _parents(files), key=lambda d: -d.count("/"))
        listing = nul_join([*(f"F/{p}" for p in stale), *(f"D/{d}" for d in emptied)])
        await capture(t, _prune_command(name), stdin=listing, check=True)
    shell = t.rsync_shell()
    use_rsync = first.strip() == "rsync=yes" and shell is not None and _has_local("rsync")
    if use_rsync and shell is not None and not shell[0]:
        await _rsync(t, root, files, ws_abs, shell)  # local target: no remote shell at all
        method = "rsync"
    elif use_rsync:
        await _rsync_tunneled(host, t, root, files, ws_abs)
        method = "rsync"
    else:
        cmd = f'tar -xf - -C "$HOME/.bifrost/workspaces/{name}"'
        r = await capture(t, cmd, stdin=_tar_stream(root, files))
        if r.exit_code != 0:
            raise TransferError(f"tar upload to {host.name} failed: {r.stderr.strip()}")
        method = "tar"
    manifest = json.dumps(
        {"files": files, "git_sha": sha, "dirty": dirty, "pushed_at": time.time(), **origin}
    )
    await capture(
        t,
        # $$: a temp name of this shell's own, so two pushes sharing a home never collide.
        f"cat > {state}/manifest.json.tmp.$$ && mv -f {state}/manifest.json.tmp.$$ "
        f"{state}/manifest.json",
        stdin=manifest.encode(),
        check=True,
    )
    boot: str | None = None
    uv_installed = False
    stamp = _env_stamp(root, extras)
    if bootstrap and stamp is not None:
        # Never install uv on `local`: that is the user's own machine and environment.
        boot, uv_installed = await _bootstrap(
            t, name, stamp, extras, install_uv=not t.target.is_local
        )
    return PushResult(
        target=host.name,
        workspace=workspace_path(name),
        files=len(files),
        deleted=len(safe_deleted),
        method=method,
        git_sha=sha,
        dirty=dirty,
        bootstrapped=boot,
        duration=time.monotonic() - started,
        uv_installed=uv_installed,
    )


def _parents(paths: Iterable[str]) -> set[str]:
    """Every directory above the given relative paths."""
    out: set[str] = set()
    for p in paths:
        parts = p.split("/")[:-1]
        out |= {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out


def _prune_command(name: str) -> str:
    """Remove ``F/<path>`` entries (files or trees) and then the ``D/<dir>`` entries that are
    empty, read NUL-separated from stdin, inside the workspace: one ``rm`` and one ``rmdir``."""
    script = (
        'cd "$HOME/.bifrost/workspaces/$0" || exit 1; f=(); d=(); '
        "while IFS= read -r -d '' p; do case $p in "
        'F/*) f+=("${p#F/}");; D/*) d+=("${p#D/}");; esac; done; '
        '[ ${#f[@]} -eq 0 ] || rm -rf -- "${f[@]}" || exit 1; '
        '[ ${#d[@]} -eq 0 ] || rmdir -- "${d[@]}" 2>/dev/null; true'
    )
    return f"bash --norc --noprofile -c {shlex.quote(script)} {shlex.quote(name)}"


def _safe_rel(path: str) -> bool:
    """A manifest entry that is safe to remove: relative, no ``..``/``.``/empty component."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _has_local(prog: str) -> bool:
    from shutil import which

    return which(prog) is not None
