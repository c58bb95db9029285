"""Issue 21's CI command: one `fsbench sweep --protocols test_time,transductive,ood` with the test-time,
transductive and zero-shot methods on test-tiny + synthetic (plus the four generated OOD sets), then
`fsbench report`: each track's table comes from protocol metadata, the test-time figure of top-1 against
cost per test image is written, and `X+transclip` is paired with `X` by seed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from datagen import OOD_LAYOUTS, make_ood_sets

from fsbench.cli import main
from fsbench.data import load_dataset

METHODS = ("zero_shot", "tda", "tpt", "zero", "transclip", "linear_probe", "linear_probe+transclip")
PROTOCOLS = ("test_time", "transductive", "ood")


def test_one_sweep_runs_the_three_tracks_and_the_report_shows_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./bench.toml: built-in defaults
    root = tmp_path / "data"
    load_dataset("synthetic", root)
    make_ood_sets(root, per_class=2)
    small = ["--set", "tpt.views=3", "--set", "zero.views=3", "--set", "runtime.workers=0"]  # defaults: 63 + 1
    code = main(["sweep", "--protocols", ",".join(PROTOCOLS), "--methods", ",".join(METHODS), "--backbones",
                 "test-tiny", "--datasets", "synthetic", "--shots", "1", "--seeds", "1", "--data-root", str(root),
                 "--device", "cpu", *small])
    failed = [json.loads(p.read_text()) for p in Path("results").rglob("*.json")]
    assert code == 0, [(r.get("method"), r.get("protocol"), r.get("error")) for r in failed if r.get("error")]
    stored = [json.loads(p.read_text()) for p in Path("results/runs").rglob("*.json")]
    assert all(r["status"] == "ok" for r in stored)
    by = {(r["protocol"], r["method"], r["dataset"]): r for r in stored}
    for method in METHODS:  # every method under every track: one result each, one per OOD set under ood
        assert ("test_time", method, "synthetic") in by and ("transductive", method, "synthetic") in by
        assert all(("ood", method, d) in by for d in ("synthetic", *OOD_LAYOUTS))
    used = {(p, m): by[(p, m, "synthetic")]["extra"].get("unlabelled_test_data") for p in PROTOCOLS for m in METHODS}
    assert {m for (p, m), mode in used.items() if mode == "online"} == {"tda", "tpt", "zero"}
    assert {p for (p, m), mode in used.items() if mode} == {"test_time", "transductive"}  # never under ood
    assert {m for (p, m), mode in used.items() if mode == "transductive"} == {"transclip", "linear_probe+transclip"}
    assert all(by[("test_time", m, "synthetic")]["metrics"]["ms_per_image"] > 0 for m in METHODS)

    assert main(["report", "--results", "results/runs", "--out", "report", "--format", "md,csv,tex,png"]) == 0
    md = Path("report/report.md").read_text()
    for section in ("## Test-time adaptation", "## Transductive", "## OOD detection", "## Transductive gain"):
        assert section in md, section
    assert Path("report/test_time_top1_vs_ms_per_image_test-tiny.png").stat().st_size > 0
    pairs = pd.read_csv("report/transductive_pairs.csv")  # X+transclip paired with X of the same episode
    assert list(pairs["method"]) == ["linear_probe+transclip"] and list(pairs["base_protocol"]) == ["transductive"]
    alone = by[("transductive", "linear_probe", "synthetic")]["top1"]
    assert pairs["gain"].iloc[0] == by[("transductive", "linear_probe+transclip", "synthetic")]["top1"] - alone
