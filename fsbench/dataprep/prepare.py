"""`fsbench data prepare`: fetch, verify and unpack one dataset into the standard layout.

Archives are downloaded to `<root>/.downloads/`, extracted, and deleted; a `<archive>.done`
marker written after a complete extraction makes a second run skip them. Plain files (split
json, classnames.txt) land directly under their final name, and only once verified.
"""

from __future__ import annotations

import difflib
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from fsbench.data.coop import read_split_file
from fsbench.dataprep.download import OnBytes, fetch
from fsbench.dataprep.extract import extract
from fsbench.dataprep.sources import SOURCES, DatasetSource, Download
from fsbench.errors import UnknownNameError
from fsbench.io import atomic_write

DOWNLOADS = ".downloads"
# progress(filename) -> a byte-progress callback for that file
Progress = Callable[[str], OnBytes]
NOT_DOWNLOADED = {"synthetic": "it is generated on first use", "imagefolder": "it is your own image folder"}


@dataclass
class Prepared:
    """What `prepare` did: files fetched, files already there, files without a published
    checksum, and the manual steps left (empty when there are none)."""

    name: str
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    manual: str = ""


def find_source(name: str, table: Mapping[str, DatasetSource] | None = None) -> DatasetSource:
    """The table row for `name` (registry aliases accepted); did-you-mean on unknown names."""
    from fsbench.dataprep.check import canonical_name

    table = SOURCES if table is None else table
    key = name if name in table else canonical_name(name)
    if key in table:
        return table[key]
    if key in NOT_DOWNLOADED:
        raise UnknownNameError(f"{key} has nothing to download: {NOT_DOWNLOADED[key]}")
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownNameError(f"no download source for {name!r}; {hint}known: {', '.join(table)}")


def prepare(name: str, root: str | Path, *, table: Mapping[str, DatasetSource] | None = None,
            progress: Progress | None = None, force: bool = False, keep_archives: bool = False) -> Prepared:
    """Download, verify and extract dataset `name` under the data root `root`."""
    src = find_source(name, table)
    root = Path(root).expanduser()
    report = Prepared(src.name, manual=src.manual.format(root=root))
    for dl in src.downloads:
        on_bytes = progress(dl.filename) if progress else None
        done = _archive(dl, root, on_bytes, force, keep_archives) if dl.extract else _file(dl, root, on_bytes, force)
        (report.fetched if done else report.skipped).append(dl.filename)
        if dl.checksum() is None:
            report.unverified.append(dl.filename)
    for frm, to in src.moves:
        _move(root, frm, to)
    return report


def _file(dl: Download, root: Path, on_bytes: OnBytes | None, force: bool) -> bool:
    """Fetch a plain file into place; False when it is already there."""
    dest = root / dl.save_to / dl.filename
    if dest.is_file() and not force:
        return False
    check = (lambda part: read_split_file(part, dl.filename)) if dl.filename.endswith(".json") else None
    fetch(dl, dest, on_bytes, validate=check)
    return True


def _archive(dl: Download, root: Path, on_bytes: OnBytes | None, force: bool, keep: bool) -> bool:
    """Fetch and extract an archive (and the archives inside it); False when done before."""
    marker = root / DOWNLOADS / f"{dl.filename}.done"
    if marker.is_file() and not force:
        return False
    archive = root / DOWNLOADS / dl.filename
    if force or not archive.is_file():
        fetch(dl, archive, on_bytes)
    extract(archive, root / dl.save_to)
    for inner in dl.inner:
        path = root / inner
        extract(path, path.parent)
        path.unlink()
    atomic_write(marker, lambda tmp: tmp.write_text(f"{dl.resolved_url()}\n"))
    if not keep:
        archive.unlink()
    return True


def _move(root: Path, frm: str, to: str) -> None:
    """Rename `frm` to `to` under `root`, then drop the archive folder `frm` came from."""
    src, dst = root / frm, root / to
    if src.exists():
        if dst.exists():
            shutil.rmtree(dst)
        src.rename(dst)
    top = PurePosixPath(frm).parts[0]
    if top != PurePosixPath(to).parts[0]:
        shutil.rmtree(root / top, ignore_errors=True)
