"""Which code produced a result: the project's git commit, whatever the working directory.

Every result JSON of the experiments carries ``git_commit``. It is read from the repository this
package lives in, not from the process's working directory (a run started from ``/tmp`` or from
another checkout must still name the code it ran). Outside a git checkout (a copied workspace
without ``.git``) ``EXPERIMENTS_GIT_COMMIT`` can supply it (deploy scripts may set it); else None.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

#: The repository root: experiments/common/provenance.py -> parents[2].
REPO_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """Short commit hash of ``repo`` (default: this project), or None when it cannot be told."""
    env = os.environ.get("EXPERIMENTS_GIT_COMMIT", "").strip()
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return env or None
    if out.returncode != 0 or not out.stdout.strip():
        return env or None
    return out.stdout.strip()
