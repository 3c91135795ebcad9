"""pull / upload of files and trees, with the remote ``~`` resolved for whoever logs in."""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import secrets
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm  # type: ignore[import-untyped]

from bifrost.errors import TransferError
from bifrost.exec import capture, nul_join, nul_split
from bifrost.transport.base import Progress, Transport

if TYPE_CHECKING:
    from bifrost.jobs import Job
    from bifrost.session import Session

PROGRESS_MIN_BYTES = 8 << 20


def resolve_remote(path: str, home: str) -> str:
    """``~``/``~/x``/relative → absolute under the remote home (never assumes /root)."""
    if path.startswith("~") and not (path == "~" or path.startswith("~/")):
        raise TransferError(
            f"unsupported remote path {path!r}: use ~/..., a relative or absolute path"
        )
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    if not path.startswith("/"):
        return posixpath.join(home, path)
    return path


async def _remote_size(t: Transport, path: str) -> tuple[str, int]:
    """(kind, total bytes) of an absolute remote path in one round trip; kind is ``dir``,
    ``file``, ``none`` or ``denied`` (it, or a directory on the way, is not readable)."""
    q = shlex.quote(path)
    parent = shlex.quote(posixpath.dirname(path.rstrip("/")) or "/")
    cmd = (
        f"if [ -d {q} ]; then echo dir; elif [ -e {q} ]; "
        f"then if [ -r {q} ]; then echo file; else echo denied; fi; "
        # `[ -e ]` is also false when a directory on the way cannot be searched (/root as a
        # normal user): say "permission denied" then, not "does not exist".
        f"elif [ -d {parent} ] && ! [ -x {parent} ]; then echo denied; "
        f"elif ! [ -d {parent} ] && LC_ALL=C stat {parent} 2>&1 | grep -q 'Permission denied'; "
        "then echo denied; "
        "else echo none; fi; "
        f"du -sb {q} 2>/dev/null | cut -f1 || echo 0"
    )
    lines = (await capture(t, cmd)).stdout.split()
    kind = lines[0] if lines else "none"
    size = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else 0
    return kind, size


def _part_name(dest: Path) -> Path:
    """A private temp name next to ``dest`` (same filesystem, so the final rename is atomic)."""
    return dest.with_name(f".{dest.name}.bifrost-part-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _merge_into(src: Path, dst: Path) -> None:
    """Move the downloaded ``src`` onto ``dst``: an atomic rename when ``dst`` does not exist or
    both are files; directories are merged entry by entry (what is there and not in ``src``
    stays), like ``copytree(dirs_exist_ok=True)`` on the local target."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
        return
    src_dir = src.is_dir() and not src.is_symlink()
    dst_dir = dst.is_dir() and not dst.is_symlink()
    if src_dir and dst_dir:
        for child in sorted(src.iterdir()):
            _merge_into(child, dst / child.name)
        src.rmdir()
    elif not src_dir and not dst_dir:
        os.replace(src, dst)
    else:
        what = "a directory" if src_dir else "a file"
        raise TransferError(
            f"cannot write {what} over {dst}: it is {'a directory' if dst_dir else 'a file'} "
            "here; move it away and pull again"
        )


@contextmanager
def _as_transfer_error(what: str) -> Iterator[None]:
    """Any failure inside becomes a TransferError ``"<what>: <cause>"`` (ours pass through)."""
    try:
        yield
    except TransferError:
        raise
    except Exception as exc:
        raise TransferError(f"{what}: {exc}") from exc


@contextmanager
def _bar(total: int, label: str, enabled: bool) -> Iterator[Progress | None]:
    if not enabled or total < PROGRESS_MIN_BYTES:
        yield None
        return
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False) as bar:
        yield bar.update


async def apull(host: Session, remote: str, local: Path, *, progress: bool = False) -> Path:
    """Download ``remote`` (file or tree). Like ``scp -r``: into ``local`` if it is an existing
    directory, else as ``local``. Returns the local path written.

    Data lands under a temp name next to the destination and is renamed into place, so an
    interrupted pull never leaves a partial file under the final name; pulling a tree again
    merges it into the existing copy (no ``tree/tree`` nesting)."""
    t = await host.atransport()
    src = resolve_remote(remote, await t.home())
    kind, size = await _remote_size(t, src)
    if kind == "denied":
        raise TransferError(
            f"cannot read {remote!r} on {host.name} (resolved to {src}): permission denied "
            f"for {t.target.user}"
        )
    if kind == "none":
        raise TransferError(f"{remote!r} does not exist on {host.name} (resolved to {src})")
    dest = local / posixpath.basename(src.rstrip("/")) if local.is_dir() else local
    dest.parent.mkdir(parents=True, exist_ok=True)
    await _get_atomic(t, host.name, src, dest, size, progress)
    return dest


async def _get_atomic(
    t: Transport, host_name: str, src: str, dest: Path, size: int, progress: bool
) -> None:
    part = _part_name(dest)
    try:
        with (
            _bar(size, f"pull {posixpath.basename(src)}", progress) as cb,
            _as_transfer_error(f"pull of {src} from {host_name} failed"),
        ):
            await t.get(src, part, progress=cb)
        await asyncio.to_thread(_merge_into, part, dest)
    finally:
        if part.exists() or part.is_symlink():
            await asyncio.to_thread(_remove, part)


async def aupload(host: Session, local: Path, remote: str, *, progress: bool = False) -> str:
    """Upload ``local`` (file or tree); into ``remote`` if it is an existing remote directory,
    else as ``remote``. Parent directories are created. Returns the absolute remote path.

    Uploading a tree again merges it into the existing remote copy (files overwritten, no
    ``tree/tree`` nesting), like the local target's ``copytree(dirs_exist_ok=True)``."""
    if not local.exists():
        raise TransferError(f"cannot upload {local}: no such file or directory")
    t = await host.atransport()
    dst = resolve_remote(remote, await t.home())
    kind, _ = await _remote_size(t, dst)
    if kind == "dir":
        dst = posixpath.join(dst, local.name)
        kind, _ = await _remote_size(t, dst)
    if kind == "denied":
        raise TransferError(f"cannot upload to {dst} on {host.name}: permission denied")
    await t.run(f"mkdir -p {shlex.quote(posixpath.dirname(dst) or '/')}")
    total = (
        sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        if local.is_dir()
        else local.stat().st_size
    )
    with (
        _bar(total, f"upload {local.name}", progress) as cb,
        _as_transfer_error(f"upload of {local} to {host.name} failed"),
    ):
        if local.is_dir() and kind == "dir":
            await _put_merge(t, local, dst, cb)
        elif local.is_dir() and kind != "none":
            raise TransferError(
                f"cannot upload directory {local} to {dst} on {host.name}: it is a file there"
            )
        else:
            await t.put(local, dst, progress=cb)
    return dst


async def _put_merge(t: Transport, local: Path, dst: str, cb: Progress | None) -> None:
    """Upload the tree ``local`` into the existing remote directory ``dst``, file by file:
    asyncssh would copy the whole tree *into* it (``dst/tree``) because it exists."""
    dirs: list[str] = []
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(local):
        rel = os.path.relpath(dirpath, local)
        prefix = "" if rel == "." else rel + "/"
        dirs += [prefix + d for d in sorted(dirnames)]
        files += [prefix + f for f in sorted(filenames)]
    q = shlex.quote(dst)

    # A directory there where we have a file would make SFTP copy the file *into* it.
    check = 'for f; do if [ -d "$f" ] && ! [ -L "$f" ]; then printf \'%s\\n\' "$f"; fi; done'
    made = await capture(t, f"cd {q} && xargs -0 -r mkdir -p --", stdin=nul_join(dirs))
    if made.exit_code != 0:
        raise TransferError(f"cannot create directories under {dst}: {made.stderr.strip()}")
    clash = await capture(
        t, f"cd {q} && xargs -0 -r sh -c {shlex.quote(check)} sh", stdin=nul_join(files)
    )
    if clash.stdout.strip():
        first = clash.stdout.splitlines()[0]
        raise TransferError(f"cannot upload file {first!r} into {dst}: it is a directory there")
    for rel in files:
        await t.put(local / rel, posixpath.join(dst, rel), progress=cb)


async def apull_results(job: Job, dest: Path, *, progress: bool = False) -> Path:
    """Job dir + declared outputs → ``dest/<job id>/`` (``outputs/`` inside for the latter).

    The job dir is fetched file by file, leaving out ``env`` (it may hold secrets, which stay
    on the box: it is never copied, not even to a temp file). Pulling again overwrites in
    place."""
    st = await job.astatus()
    t = await job.host.atransport()
    home = await t.home()
    out_dir = dest / job.id
    (out_dir / "job").mkdir(parents=True, exist_ok=True)
    job_dir = f"{home}/.bifrost/jobs/{job.id}"
    listing = await capture(
        t,
        f"cd {shlex.quote(job_dir)} && for f in *; do "
        '[ -f "$f" ] && [ ! -L "$f" ] && [ "$f" != env ] && printf \'%s\\0\' "$f"; done; true',
    )
    if listing.exit_code != 0:
        raise TransferError(f"cannot list {job_dir} on {job.host.name}")
    names = nul_split(listing.stdout.encode("utf-8", "surrogateescape"))
    for name in names:
        if name == "env" or "/" in name:  # belt and braces: the listing already left env out
            continue
        await _get_atomic(
            t, job.host.name, posixpath.join(job_dir, name), out_dir / "job" / name, 0, False
        )
    stale = out_dir / "job" / "env"
    if stale.exists():
        stale.unlink()  # left by an older bifrost that copied it
    cwd = resolve_remote(str(st.meta.get("cwd") or "~"), home)
    for rel in st.meta.get("outputs") or []:
        src = rel if rel.startswith(("/", "~")) else posixpath.join(cwd, rel)
        target = out_dir / "outputs"
        target.mkdir(exist_ok=True)
        await apull(job.host, src, target, progress=progress)
    return out_dir
