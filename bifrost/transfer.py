"""pull / upload of files and trees, with the remote ``~`` resolved for whoever logs in."""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm  # type: ignore[import-untyped]

from bifrost.errors import TransferError
from bifrost.transport.base import Progress, Transport

if TYPE_CHECKING:
    from bifrost.host import Host
    from bifrost.jobs import Job

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


async def _remote_size(t: Transport, path: str) -> tuple[bool, bool, int]:
    """(exists, is_dir, total bytes) of an absolute remote path, in one round trip."""
    out: list[bytes] = []
    q = shlex.quote(path)
    cmd = (
        f"if [ -d {q} ]; then echo dir; elif [ -e {q} ]; then echo file; else echo none; fi; "
        f"du -sb {q} 2>/dev/null | cut -f1 || echo 0"
    )
    await t.run(cmd, on_stdout=out.append)
    lines = b"".join(out).decode().split()
    kind = lines[0] if lines else "none"
    size = int(lines[1]) if len(lines) > 1 and lines[1].isdigit() else 0
    return kind != "none", kind == "dir", size


@contextmanager
def _bar(total: int, label: str, enabled: bool) -> Iterator[Progress | None]:
    if not enabled or total < PROGRESS_MIN_BYTES:
        yield None
        return
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False) as bar:
        yield bar.update


async def apull(host: Host, remote: str, local: Path, *, progress: bool = False) -> Path:
    """Download ``remote`` (file or tree). Like ``scp -r``: into ``local`` if it is an existing
    directory, else as ``local``. Returns the local path written."""
    t = await host.atransport()
    src = resolve_remote(remote, await t.home())
    exists, _is_dir, size = await _remote_size(t, src)
    if not exists:
        raise TransferError(f"{remote!r} does not exist on {host.name} (resolved to {src})")
    dest = local / posixpath.basename(src.rstrip("/")) if local.is_dir() else local
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _bar(size, f"pull {posixpath.basename(src)}", progress) as cb:
        try:
            await t.get(src, dest, progress=cb)
        except (OSError, Exception) as exc:
            if isinstance(exc, TransferError):
                raise
            raise TransferError(f"pull of {src} from {host.name} failed: {exc}") from exc
    return dest


async def aupload(host: Host, local: Path, remote: str, *, progress: bool = False) -> str:
    """Upload ``local`` (file or tree); into ``remote`` if it is an existing remote directory,
    else as ``remote``. Parent directories are created. Returns the absolute remote path."""
    if not local.exists():
        raise TransferError(f"cannot upload {local}: no such file or directory")
    t = await host.atransport()
    dst = resolve_remote(remote, await t.home())
    exists, is_dir, _ = await _remote_size(t, dst)
    if exists and is_dir:
        dst = posixpath.join(dst, local.name)
    await t.run(f"mkdir -p {shlex.quote(posixpath.dirname(dst) or '/')}")
    total = (
        sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
        if local.is_dir()
        else local.stat().st_size
    )
    with _bar(total, f"upload {local.name}", progress) as cb:
        try:
            await t.put(local, dst, progress=cb)
        except Exception as exc:
            raise TransferError(f"upload of {local} to {host.name} failed: {exc}") from exc
    return dst


async def apull_results(job: Job, dest: Path, *, progress: bool = False) -> Path:
    """Job dir + declared outputs → ``dest/<job id>/`` (``outputs/`` inside for the latter)."""
    st = await job.astatus()
    t = await job.host.atransport()
    home = await t.home()
    out_dir = dest / job.id
    out_dir.mkdir(parents=True, exist_ok=True)
    job_dir = f"{home}/.bifrost/jobs/{job.id}"
    await t.get(job_dir, out_dir / "job")
    env_copy = out_dir / "job" / "env"
    if env_copy.exists():
        env_copy.unlink()  # secrets stay on the box
    cwd = resolve_remote(str(st.meta.get("cwd") or "~"), home)
    for rel in st.meta.get("outputs") or []:
        src = rel if rel.startswith(("/", "~")) else posixpath.join(cwd, rel)
        target = out_dir / "outputs"
        target.mkdir(exist_ok=True)
        await apull(job.host, src, target, progress=progress)
    return out_dir
