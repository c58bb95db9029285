"""`fsbench data prepare | check | export-splits` and `run --splits`, against a local HTTP server.

Nothing here touches the internet: the source table is pointed at an `http.server` on 127.0.0.1
that serves generated archives (with HTTP Range support) and emulates Google Drive's confirm page.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from datagen import make_aircraft, make_coop_dataset

from fsbench.cli import main
from fsbench.data import load_dataset
from fsbench.dataprep import sources
from fsbench.dataprep.download import drive_confirm_url
from fsbench.dataprep.extract import extract
from fsbench.dataprep.sources import DatasetSource, Download
from fsbench.errors import DataError
from fsbench.results import iter_results

CONFIRM_PAGE = """<html><body><p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="{base}/download" method="get">
<input type="submit" value="Download anyway"/><input type="hidden" name="id" value="{id}">
<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">
<input type="hidden" name="uuid" value="1234-abcd"></form></body></html>"""


class Handler(BaseHTTPRequestHandler):
    """Static files at /files/<name>, Drive's /uc (direct or via the confirm page) and /download."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        srv = self.server
        srv.log.append((url.path, query.get("id"), self.headers.get("Range")))
        if url.path == "/uc" and query.get("id") in srv.drive:
            body, confirm = srv.drive[query["id"]]
            if confirm:
                return self._reply(200, CONFIRM_PAGE.format(base=srv.base, id=query["id"]).encode(), "text/html")
            return self._send(body)
        if url.path == "/download" and query.get("confirm") == "t" and query.get("uuid") == "1234-abcd":
            return self._send(srv.drive[query["id"]][0])
        if url.path in srv.files:
            return self._send(srv.files[url.path])
        self._reply(404, b"not found", "text/plain")

    def _send(self, body: bytes) -> None:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if not match:
            return self._reply(200, body, "application/octet-stream", attachment=True)
        start = int(match.group(1))
        if start >= len(body):
            return self._reply(416, b"", "text/plain", extra={"Content-Range": f"bytes */{len(body)}"})
        self._reply(206, body[start:], "application/octet-stream", attachment=True,
                    extra={"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})

    def _reply(self, code: int, body: bytes, ctype: str, attachment: bool = False, extra: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if attachment:
            self.send_header("Content-Disposition", 'attachment; filename="f"')
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.drive, srv.log = {}, {}, []
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(sources, "DRIVE_URL", f"{srv.base}/uc")
    yield srv
    srv.shutdown()
    srv.server_close()


def pack(src: Path, members: Path, kind: str) -> bytes:
    """A zip or tar.gz of everything under `members`, named relative to `src`."""
    buf = io.BytesIO()
    files = sorted(p for p in members.rglob("*") if p.is_file())
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for p in files:
                zf.write(p, p.relative_to(src).as_posix())
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for p in files:
                tf.add(p, p.relative_to(src).as_posix())
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def serve_dataset(srv, name: str, src: Path) -> tuple[DatasetSource, bytes]:
    """Generate dataset `name` under `src`, serve it as the real sources lay it out, and return
    the source row pointing at the server (and the main archive's bytes)."""
    split_file = {"eurosat": "split_zhou_EuroSAT.json", "dtd": "split_zhou_DescribableTextures.json",
                  "caltech101": "split_zhou_Caltech101.json"}.get(name)
    if name == "eurosat":
        folder = make_coop_dataset(src, "eurosat")
        archive = pack(folder, folder / "2750", "zip")
        main = Download("EuroSAT.zip", url=f"{srv.base}/files/EuroSAT.zip", md5=md5(archive), save_to="eurosat",
                        extract=True)
    elif name == "dtd":
        folder = make_coop_dataset(src, "dtd")
        archive = pack(src, folder / "images", "tar.gz")
        main = Download("dtd-r1.0.1.tar.gz", url=f"{srv.base}/files/dtd-r1.0.1.tar.gz", md5=md5(archive),
                        extract=True)
    elif name == "caltech101":
        folder = make_coop_dataset(src, "caltech101")
        (src / "zip" / "caltech-101").mkdir(parents=True)
        inner = pack(folder, folder / "101_ObjectCategories", "tar.gz")
        (src / "zip" / "caltech-101" / "101_ObjectCategories.tar.gz").write_bytes(inner)
        archive = pack(src / "zip", src / "zip", "zip")
        main = Download("caltech-101.zip", url=f"{srv.base}/files/caltech-101.zip", md5=md5(archive), extract=True,
                        inner=("caltech-101/101_ObjectCategories.tar.gz",))
    else:
        make_aircraft(src, "fgvc-aircraft-2013b/data")
        (src / "fgvc-aircraft-2013b" / "README.html").write_text("readme")
        archive = pack(src, src / "fgvc-aircraft-2013b", "tar.gz")
        main = Download("fgvc-aircraft-2013b.tar.gz", url=f"{srv.base}/files/fgvc-aircraft-2013b.tar.gz",
                        extract=True)
    srv.files[f"/files/{main.filename}"] = archive
    downloads = [main]
    if split_file:
        srv.drive[f"{name}-split"] = ((folder / split_file).read_bytes(), name == "dtd")  # dtd: confirm page
        downloads.append(Download(split_file, drive_id=f"{name}-split", save_to=folder.name))
    expected = (6, 6, 6) if name == "fgvc_aircraft" else (9, 3, 6)
    moves = (("fgvc-aircraft-2013b/data", "fgvc_aircraft"),) if name == "fgvc_aircraft" else ()
    return DatasetSource(name, tuple(downloads), expected=expected, classes=3, moves=moves), archive


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    return err


@pytest.mark.parametrize("name", ["eurosat", "dtd", "caltech101", "fgvc_aircraft"])
def test_prepare_downloads_verifies_extracts_and_reads(server, monkeypatch, tmp_path: Path, name: str) -> None:
    row, _ = serve_dataset(server, name, tmp_path / "src")
    monkeypatch.setitem(sources.SOURCES, name, row)
    root = tmp_path / "data"
    assert main(["data", "prepare", name, "--root", str(root)]) == 0
    ds = load_dataset(name, root)
    assert (len(ds.train), len(ds.val), len(ds.test)) == row.expected
    assert all((ds.image_root / it.path).is_file() for it in ds.train + ds.val + ds.test)
    downloads = root / ".downloads"
    assert sorted(p.name for p in downloads.iterdir()) == [f"{row.downloads[0].filename}.done"]  # archive deleted
    assert not list(root.rglob("*.part")) and not list(root.rglob(".fsbench-extract-*"))
    if name == "fgvc_aircraft":
        assert not (root / "fgvc-aircraft-2013b").exists()  # CoOp: keep only data/, renamed
    if name == "dtd":
        assert ("/download", "dtd-split", None) in server.log  # went through Drive's confirm page
    requests = len(server.log)
    assert main(["data", "prepare", name, "--root", str(root)]) == 0  # done before: nothing fetched
    assert len(server.log) == requests


def test_resume_after_partial_download(server, monkeypatch, tmp_path: Path) -> None:
    row, archive = serve_dataset(server, "eurosat", tmp_path / "src")
    monkeypatch.setitem(sources.SOURCES, "eurosat", row)
    root = tmp_path / "data"
    half = len(archive) // 2
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "EuroSAT.zip.part").write_bytes(archive[:half])
    assert main(["data", "prepare", "eurosat", "--root", str(root)]) == 0
    assert ("/files/EuroSAT.zip", None, f"bytes={half}-") in server.log
    assert len(load_dataset("eurosat", root).train) == 9


def test_checksum_mismatch_is_one_line_and_leaves_nothing_complete(server, monkeypatch, tmp_path: Path,
                                                                   capsys) -> None:
    row, _ = serve_dataset(server, "eurosat", tmp_path / "src")
    bad = Download("EuroSAT.zip", url=row.downloads[0].url, md5="0" * 32, save_to="eurosat", extract=True)
    monkeypatch.setitem(sources.SOURCES, "eurosat", DatasetSource("eurosat", (bad,), (9, 3, 6), 3))
    root = tmp_path / "data"
    assert main(["data", "prepare", "eurosat", "--root", str(root)]) == 3
    err = one_line_error(capsys)
    assert "EuroSAT.zip: md5 mismatch" in err and "deleted" in err
    assert not list((root / ".downloads").iterdir())  # no .part, no archive, no .done marker
    assert not (root / "eurosat").exists()


def test_bad_split_file_is_not_kept(server, monkeypatch, tmp_path: Path, capsys) -> None:
    server.drive["broken"] = (b'{"train": [', False)
    row = DatasetSource("eurosat", (Download("split_zhou_EuroSAT.json", drive_id="broken", save_to="eurosat"),),
                        (9, 3, 6), 3)
    monkeypatch.setitem(sources.SOURCES, "eurosat", row)
    assert main(["data", "prepare", "eurosat", "--root", str(tmp_path)]) == 3
    assert "not readable as JSON" in one_line_error(capsys)
    assert not list((tmp_path / "eurosat").iterdir())


def test_manual_step_is_printed(server, monkeypatch, tmp_path: Path, capsys) -> None:
    """Stanford Cars: the split file is fetched, the images need the printed manual step."""
    folder = make_coop_dataset(tmp_path / "src", "stanford_cars")
    server.drive["cars"] = ((folder / "split_zhou_StanfordCars.json").read_bytes(), False)
    row = sources.SOURCES["stanford_cars"]
    split = Download(row.downloads[0].filename, drive_id="cars", save_to="stanford_cars")
    monkeypatch.setitem(sources.SOURCES, "stanford_cars", DatasetSource(
        "stanford_cars", (split,), row.expected, row.classes, manual=row.manual))
    root = tmp_path / "data"
    assert main(["data", "prepare", "stanford_cars", "--root", str(root)]) == 3
    out = capsys.readouterr()
    assert "manual step for stanford_cars" in out.out and "issue 61" in out.out
    assert "stanford_cars is not complete yet" in out.err and "18 listed files are missing" in out.out
    assert (root / "stanford_cars" / "split_zhou_StanfordCars.json").is_file()


def test_prepare_unknown_name_suggests(capsys) -> None:
    assert main(["data", "prepare", "eurosatt"]) == 2
    assert "did you mean 'eurosat'" in one_line_error(capsys)


def test_drive_confirm_page_variants(tmp_path: Path) -> None:
    page = CONFIRM_PAGE.format(base="https://drive.usercontent.google.com", id="X&amp;Y")
    assert drive_confirm_url(page, "https://drive.google.com/uc", "X", tmp_path) == (
        "https://drive.usercontent.google.com/download?id=X%26Y&export=download&confirm=t&uuid=1234-abcd")
    legacy = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=AbC&amp;id=X">Download</a>'
    assert drive_confirm_url(legacy, "https://drive.google.com/uc?id=X", "X", tmp_path) == (
        "https://drive.google.com/uc?export=download&confirm=AbC&id=X")
    with pytest.raises(DataError, match="Too many users have viewed"):
        drive_confirm_url('<p class="uc-error-subcaption">Too many users have viewed or downloaded this file.</p>',
                          "https://drive.google.com/uc", "X", tmp_path)


def test_unsafe_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="outside the destination"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot extract"):
        extract(tmp_path / "junk.zip", tmp_path / "out")


def test_check_reports_layout_counts_missing_and_unreadable(monkeypatch, tmp_path: Path, capsys) -> None:
    folder = make_coop_dataset(tmp_path, "caltech101", clip_lora_folder=True)
    assert main(["data", "check", "caltech101", "--root", str(tmp_path)]) == 3  # 9/3/6 is not the standard split
    out = capsys.readouterr()
    assert "Caltech101/ (CLIP-LoRA)" in out.out and "differ from the standard 4,128/1,649/2,465" in out.out
    assert "fsbench data prepare caltech101" in out.out and "1 of 1 datasets need attention" in out.err
    monkeypatch.setitem(sources.SOURCES, "caltech101", DatasetSource("caltech101", (), (9, 3, 6), 3))
    assert main(["data", "check", "caltech101", "--root", str(tmp_path)]) == 0
    images = folder / "101_ObjectCategories"
    (images / "beta" / "test_0.jpg").unlink()
    (images / "gamma" / "train_1.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    assert main(["data", "check", "caltech101", "--root", str(tmp_path)]) == 3
    assert "1 listed files are missing (first: beta/test_0.jpg)" in capsys.readouterr().out
    assert main(["data", "check", "caltech101", "--root", str(tmp_path), "--verify-images"]) == 3
    out = capsys.readouterr().out
    assert "1 files are unreadable (first: gamma/train_1.jpg)" in out and "--skip-bad-images" in out


def test_check_absent_dataset_names_the_fix(tmp_path: Path, capsys) -> None:
    assert main(["data", "check", "imagenet", "eurosat", "--root", str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert "absent" in out and "fsbench data prepare imagenet" in out and "manual step" in out


# --- export-splits / run --splits -------------------------------------------------------------

RUN = ["run", "-m", "zero_shot,linear_probe", "-b", "test-tiny", "-d", "synthetic", "--shots", "2",
       "--device", "cpu", "--workers", "0", "--set", "linear_probe.max_iter=30",
       "--set", "linear_probe.weight_decays=[0.01]"]


def results_by_method(results: Path) -> dict[str, object]:
    return {r.method: r for r in iter_results(results)}


def test_exported_splits_reproduce_in_a_fresh_cache(monkeypatch, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (tmp_path / "A").mkdir()
    monkeypatch.chdir(tmp_path / "A")  # lab A: cache in ./.fsbench_cache
    assert main([*RUN, "--seed", "7", "--data-root", str(data), "--results", "res"]) == 0
    out = tmp_path / "splits.json"
    assert main(["data", "export-splits", "-d", "synthetic", "-k", "2", "-s", "7", "--root", str(data),
                 "--out", str(out)]) == 0
    lab_a = results_by_method(tmp_path / "A" / "res")
    # lab B, fresh cache: import seed 7's files under seed 1, so the run can only match lab A through the file
    doc = json.loads(out.read_text())
    doc["splits"][0]["seed"] = 1
    out.write_text(json.dumps(doc))
    (tmp_path / "B").mkdir()
    monkeypatch.chdir(tmp_path / "B")
    assert main([*RUN, "--seed", "1", "--data-root", str(data), "--results", "res", "--splits", str(out)]) == 0
    lab_b = results_by_method(tmp_path / "B" / "res")
    for method in ("zero_shot", "linear_probe"):
        assert lab_b[method].split_checksum == lab_a[method].split_checksum == doc["splits"][0]["checksum"]
        assert lab_b[method].top1 == lab_a[method].top1
    # imported splits never replace (or create) the local draw of (dataset, K, seed)
    assert not (tmp_path / "B" / ".fsbench_cache/splits/synthetic/shots2_seed1.json").exists()


def test_imported_split_with_unknown_file_is_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "splits.json"
    assert main(["data", "export-splits", "-d", "synthetic", "-k", "1", "-s", "1", "--root", "data",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    doc["splits"][0]["train"][0][0] = "red_square/not_here.png"
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    args = ["run", "-m", "zero_shot", "-b", "test-tiny", "-d", "synthetic", "--shots", "1", "--seed", "1",
            "--device", "cpu", "--workers", "0", "--data-root", "data", "--splits", str(out)]
    assert main(args) == 3
    err = one_line_error(capsys)
    assert "not_here.png" in err and "not in synthetic's train/val lists" in err
    out.write_text('{"format": "something else"}')
    assert main(args) == 3
    assert "not a splits file" in one_line_error(capsys)

