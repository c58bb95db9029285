"""Atomic file writes: a crash or kill -9 at any moment leaves the old file or the new one."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsbench.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, then rename it over `path`.

    The file gets the user's normal permissions (0644 under the usual umask; mkstemp alone gives
    0600, which hid results from colleagues sharing a results folder). A full disk or other write
    failure raises `OSError` and leaves the old file in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


STALE_TEMP_SECONDS = 600  # an atomic write lasts milliseconds; older temp files were left by a killed writer


def remove_stale_temp(folder: str | Path, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Delete temp files (`.<name>.<random>.tmp`) older than `older_than` seconds under `folder`."""
    cutoff = time.time() - older_than
    root = Path(folder)
    stale = [p for p in root.rglob(".*.tmp") if p.is_file() and p.stat().st_mtime < cutoff] if root.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def ensure_writable(folder: str, flag: str) -> None:
    """Fail before any work when `folder` cannot take new files (a file in the way, no permission).

    Creates nothing: a missing folder is checked through its nearest existing parent, and made
    when the first file is written into it."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, not a folder; remove it or choose another folder with {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fsbench-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write to {folder} ({exc.strerror or exc}); fix its permissions or "
                          f"choose another folder with {flag}") from None
