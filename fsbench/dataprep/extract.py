"""Safe, all-or-nothing extraction of tar and zip archives.

An archive is unpacked into a hidden staging folder beside its destination and each top-level
entry is then renamed into place, so an interrupted extraction never leaves a half-filled image
folder under its real name. Members that would land outside the destination (absolute paths,
"..", links pointing out) are refused.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from fsbench.errors import DataError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def extract(archive: Path, into: Path) -> list[Path]:
    """Unpack `archive` into the folder `into`; returns the top-level paths it created or replaced."""
    into.mkdir(parents=True, exist_ok=True)
    staging = into / f".fsbench-extract-{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted earlier attempt
    staging.mkdir()
    try:
        _unpack(archive, staging)
        placed = []
        for entry in sorted(staging.iterdir()):
            target = into / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            entry.rename(target)
            placed.append(target)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack(archive: Path, staging: Path) -> None:
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    _check_member(member, archive)
                zf.extractall(staging)
        elif name.endswith(TAR_SUFFIXES):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for member in members:
                    _check_tar_member(member, archive)
                tf.extractall(staging, members=members, **_tar_filter())
        else:
            raise DataError(f"{archive}: not a .zip or .tar(.gz/.bz2/.xz) archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DataError(f"cannot extract {archive} ({exc}); delete it and run the command again") from None


def _tar_filter() -> dict:
    """Python's own "data" filter where it exists (3.11.4+, 3.10.12+), as a second guard."""
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _check_member(name: str, archive: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"{archive}: refusing to extract {name!r}, which points outside the destination")


def _check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    _check_member(member.name, archive)
    if member.issym():  # relative to the link's folder
        _check_member(str(PurePosixPath(member.name).parent / member.linkname), archive)
    elif member.islnk():  # relative to the archive's root
        _check_member(member.linkname, archive)
    elif not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing to extract {member.name!r}, a device or fifo")
