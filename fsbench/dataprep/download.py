"""Resumable HTTP downloads with checksum verification, and Google Drive's confirm step.

Bytes go to `<file>.part`; an interrupted download resumes from the `.part` file with an HTTP
Range request. Only a file whose published checksum matches is renamed to its final name, so a
file under its final name is always complete; a mismatch deletes the `.part` file.
"""

from __future__ import annotations

import hashlib
import html
import http.cookiejar
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from urllib.parse import urlencode, urljoin

from fsbench.dataprep.sources import Download
from fsbench.errors import DataError

CHUNK = 1 << 20
USER_AGENT = "fsbench-data/1 (+https://github.com/; python urllib)"
# on_bytes(done, total): progress of one file; total is None when the server does not say.
OnBytes = Callable[[int, "int | None"], None]


def download_checksum(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(dl: Download, dest: Path, on_bytes: OnBytes | None = None,
          validate: Callable[[Path], object] | None = None) -> Path:
    """Download `dl` to `dest` (resuming `dest.part`), verify its checksum (and `validate(part)`,
    which raises on bad content), and rename it into place."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    url = dl.resolved_url()
    try:
        if dl.drive_id:
            url = _drive_file_url(opener, url, dl.drive_id, dest)
        _download(opener, url, part, on_bytes)
    except (urllib.error.URLError, OSError, HTTPException) as exc:  # HTTPException: e.g. IncompleteRead
        reason = getattr(exc, "reason", None) or exc
        again = f"run the command again to resume from {part}" if part.exists() else "run the command again"
        raise DataError(f"download of {url} failed ({reason}); {again}") from None
    verify(part, dl, dest.name)
    if validate is not None:
        try:
            validate(part)
        except DataError:
            part.unlink(missing_ok=True)
            raise
    part.replace(dest)
    return dest


def verify(path: Path, dl: Download, name: str) -> None:
    """Check `path` against the published checksum; on a mismatch delete it and raise."""
    expected = dl.checksum()
    if expected is None:
        return
    algorithm, digest = expected
    actual = download_checksum(path, algorithm)
    if actual != digest.lower():
        path.unlink(missing_ok=True)
        raise DataError(f"{name}: {algorithm} mismatch (expected {digest}, got {actual}); the download was "
                        "deleted: run the command again, and if it fails again the source has changed")


def _open(opener: urllib.request.OpenerDirector, url: str, offset: int = 0) -> HTTPResponse:
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return opener.open(urllib.request.Request(url, headers=headers), timeout=60)


def _download(opener: urllib.request.OpenerDirector, url: str, part: Path, on_bytes: OnBytes | None) -> None:
    """Fill `part` with the body of `url`, resuming from its current size."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(opener, url, offset)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Range past the end: the .part is complete if its size is the file's size.
        total = re.search(r"/(\d+)", exc.headers.get("Content-Range", ""))
        if total and int(total.group(1)) == offset:
            return
        part.unlink()
        _download(opener, url, part, on_bytes)
        return
    with resp:
        resumed = offset and resp.status == 206
        length = resp.headers.get("Content-Length")
        total = (int(length) + (offset if resumed else 0)) if length else None
        done = offset if resumed else 0
        with open(part, "ab" if resumed else "wb") as fh:
            while chunk := resp.read(CHUNK):
                fh.write(chunk)
                done += len(chunk)
                if on_bytes:
                    on_bytes(done, total)
    if total is not None and done != total:
        raise OSError(f"connection closed after {done} of {total} bytes")


def _drive_file_url(opener: urllib.request.OpenerDirector, url: str, file_id: str, dest: Path) -> str:
    """The URL that serves a Drive file: `url` itself for small files, else the one behind the
    "can't scan this file for viruses" page (its download form, or the older confirm link)."""
    with _open(opener, url) as resp:
        if not resp.headers.get_content_type().startswith("text/html"):
            return url
        page = resp.read(1 << 20).decode("utf-8", "replace")
    return drive_confirm_url(page, url, file_id, dest)


def drive_confirm_url(page: str, base: str, file_id: str, dest: Path) -> str:
    """Parse Google Drive's interstitial page into the URL that downloads the file."""
    form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"', page)
    if form:
        params = {}
        for tag in re.findall(r"<input[^>]*>", page):
            name, value = re.search(r'name="([^"]*)"', tag), re.search(r'value="([^"]*)"', tag)
            if name and value and 'type="hidden"' in tag:
                params[name.group(1)] = html.unescape(value.group(1))
        return urljoin(base, html.unescape(form.group(1))) + "?" + urlencode(params)
    link = re.search(r'href="(/uc\?export=download[^"]+)"', page)
    if link:
        return urljoin(base, html.unescape(link.group(1)))
    error = re.search(r'class="uc-error-subcaption">(.*?)<', page)
    why = html.unescape(error.group(1)) if error else "its page has no download link (quota or sharing)"
    raise DataError(f"Google Drive did not serve file {file_id}: {why}; open "
                    f"https://drive.google.com/file/d/{file_id}/view in a browser and save it as {dest}")

