"""Shared CLI plumbing: logging to console and ``experiment_log.txt``, clean error exits."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path


def setup_logging(output: Path, verbose: bool = False) -> logging.Logger:
    """Log to stdout and append the same lines to ``output/experiment_log.txt``."""
    output.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("bh_routing")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logfile = logging.FileHandler(output / "experiment_log.txt", encoding="utf-8")
    logfile.setFormatter(fmt)
    logger.addHandler(console)
    logger.addHandler(logfile)
    logger.propagate = False
    return logger


def run_cli(body: Callable[[], int]) -> int:
    """Run ``body``; turn expected failures into one-line errors and exit codes, never
    tracebacks."""
    try:
        return body()
    except KeyboardInterrupt:
        print(
            "interrupted; finished experiments are saved, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, PermissionError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch: out of memory, device errors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = (
            " (try --device cpu, --max-tokens 20 or --no-fp16)" if "memory" in msg.lower() else ""
        )
        print(f"error: {msg}{hint}", file=sys.stderr)
        return 1
