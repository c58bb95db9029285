"""Versions recorded in every result: fsbench, torch, open_clip and the git commit."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.cache
def git_commit() -> str | None:
    """The commit of the fsbench checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.cache
def versions() -> dict[str, str | None]:
    import open_clip
    import torch

    import fsbench

    return {"fsbench": fsbench.__version__, "torch": torch.__version__,
            "open_clip": open_clip.__version__, "git": git_commit()}
