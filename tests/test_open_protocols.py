"""Protocols as plug-ins (issue 19): each one file under tests/plugins/, no edit to fsbench.

- `carved`: validation carved out of the K train shots (episode `val_split="train"`);
- `online_toy`: unlabelled test images shown to a test-time method one at a time, in the protocol's order,
  with a fresh copy of the method for each evaluation set;
- a recording method proves what it was shown under each, and that it never sees test inputs through an
  online hook under an inductive protocol.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fsbench.cli import main

PLUGINS = Path(__file__).parent / "plugins"


@pytest.fixture
def workdir(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSBENCH_RECORDER_LOG", str(tmp_path / "recorder.jsonl"))
    return tmp_path


def _run(root: Path, method: str, protocol: str, shots: int = 4, *extra: str, seed: int = 1) -> int:
    plugins = [a for p in ("protocol_carved.py", "protocol_online_toy.py", "recording_method.py")
               for a in ("--plugin", str(PLUGINS / p))]
    return main(["run", *plugins, "--method", method, "--protocol", protocol, "--backbone", "test-tiny",
                 "--dataset", "synthetic", "--shots", str(shots), "--seed", str(seed), "--workers", "0",
                 "--device", "cpu", "--data-root", str(root), *extra])


def _events(workdir: Path) -> list[dict]:
    path = workdir / "recorder.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_carved_validation_comes_out_of_the_drawn_shots(workdir, synthetic_root):
    assert _run(synthetic_root, "test_time_recorder", "fewshot") == 0
    fewshot_fit = _events(workdir)[0]
    (workdir / "recorder.jsonl").unlink()
    assert _run(synthetic_root, "test_time_recorder", "carved") == 0
    fit = _events(workdir)[0]
    assert fit["event"] == "fit" and fit["train_split"] == fit["val_split"] == "train"
    assert fewshot_fit["val_split"] == "val"
    assert not set(fit["train"]) & set(fit["val"])
    assert sorted(fit["train"] + fit["val"]) == sorted(fewshot_fit["train"])  # the same K shots, split in two
    assert set(Counter(fit["val_labels"]).values()) == {2} and set(Counter(fit["train_labels"]).values()) == {2}
    path = workdir / "results/runs/test-tiny/synthetic/test_time_recorder/carved/shots4_seed1.json"
    result = json.loads(path.read_text())
    assert result["status"] == "ok" and result["protocol"] == "carved" and result["top1"] is not None


def test_a_method_that_selects_on_validation_runs_on_carved_validation(workdir, synthetic_root):
    assert _run(synthetic_root, "linear_probe", "carved") == 0
    result = json.loads((workdir / "results/runs/test-tiny/synthetic/linear_probe/carved/shots4_seed1.json")
                        .read_text())
    assert result["status"] == "ok"


def test_online_protocol_shows_test_inputs_one_at_a_time_and_resets_between_sets(workdir, synthetic_root):
    assert _run(synthetic_root, "test_time_recorder", "online_toy", 2) == 0
    events = _events(workdir)
    assert events[0]["event"] == "fit"
    online = [e for e in events if e["event"] == "online"]
    assert not [e for e in events if e["event"] == "logits"]  # every test input went through the online hook
    assert {e["n"] for e in online} == {1} and len(online) == 100  # synthetic's whole test split, one at a time
    # one fresh copy per evaluation set (50 + 50 images): the second starts from nothing, no adaptation leaked
    assert [e["seen_before"] for e in online] == list(range(50)) + list(range(50))
    result = json.loads((workdir / "results/runs/test-tiny/synthetic/test_time_recorder/online_toy/shots2_seed1.json")
                        .read_text())
    assert result["extra"]["unlabelled_test_data"] == "online"
    assert set(result["metrics"]) >= {"first", "second", "top1"}
    assert result["top1"] == pytest.approx((result["metrics"]["first"] + result["metrics"]["second"]) / 2)


def test_inductive_protocols_never_call_the_online_hook(workdir, synthetic_root):
    for protocol in ("fewshot", "base2new"):
        assert _run(synthetic_root, "test_time_recorder", protocol, 2) == 0
    events = _events(workdir)
    assert not [e for e in events if e["event"] == "online"]
    assert [e for e in events if e["event"] == "logits"]


def test_online_order_is_the_protocols_and_part_of_the_identity(workdir, synthetic_root):
    assert _run(synthetic_root, "test_time_recorder", "online_toy", 2) == 0
    first = [e["x"] for e in _events(workdir) if e["event"] == "online"]
    (workdir / "recorder.jsonl").unlink()
    assert _run(synthetic_root, "test_time_recorder", "online_toy", 2, "--results", "other", seed=2) == 0
    second = [e["x"] for e in _events(workdir) if e["event"] == "online"]
    assert sorted(first) == sorted(second) and first != second  # same images, another seeded order
    ids = [json.loads(p.read_text())["identity"] for p in (
        workdir / "results/runs/test-tiny/synthetic/test_time_recorder/online_toy/shots2_seed1.json",
        workdir / "other/test-tiny/synthetic/test_time_recorder/online_toy/shots2_seed2.json")]
    assert ids[0]["eval:synthetic/first"] != ids[1]["eval:synthetic/first"]


def test_a_plain_method_scores_inductively_under_an_online_protocol(workdir, synthetic_root):
    assert _run(synthetic_root, "zero_shot", "online_toy", 1) == 0
    result = json.loads((workdir / "results/runs/test-tiny/synthetic/zero_shot/online_toy/shots1_seed1.json")
                        .read_text())
    assert result["status"] == "ok" and "unlabelled_test_data" not in result["extra"]


def test_carved_and_online_results_reach_the_report_and_ls(workdir, synthetic_root, capsys):
    assert _run(synthetic_root, "zero_shot", "carved", 2) == 0
    assert _run(synthetic_root, "test_time_recorder", "online_toy", 2) == 0
    plugins = [a for p in ("protocol_carved.py", "protocol_online_toy.py") for a in ("--plugin", str(PLUGINS / p))]
    capsys.readouterr()
    formats = "md,csv,tex,html"
    assert main(["report", *plugins, "--results", "results/runs", "--out", "report", "--format", formats]) == 0
    page = (workdir / "report/report.html").read_text()
    assert "<h3>carved</h3>" in page and "<h3>online_toy</h3>" in page  # a leaderboard each on the results page
    md, tex = (workdir / "report/report.md").read_text(), (workdir / "report/tables.tex").read_text()
    carved = json.loads((workdir / "results/runs/test-tiny/synthetic/zero_shot/carved/shots2_seed1.json").read_text())
    online = json.loads((workdir / "results/runs/test-tiny/synthetic/test_time_recorder/online_toy/shots2_seed1.json")
                        .read_text())
    assert "## carved" in md and "## online_toy" in md  # each protocol its own section, no per-protocol code
    assert f"| Zero-shot CLIP | {carved['top1']:.2f} (1) |" in md
    first, second = online["metrics"]["first"], online["metrics"]["second"]
    assert f"| synthetic | test_time_recorder | {first:.2f} (1) | {second:.2f} (1) | {online['top1']:.2f} (1) |" in md
    for name, result in (("carved", carved), ("online_toy", online)):
        rows = [line for line in (workdir / f"report/{name}.csv").read_text().splitlines() if "synthetic" in line]
        assert any(f"{result['top1']:.4f}"[:-1] in line for line in rows), (name, rows)
    assert "test-tiny, 2 shots" in tex
    assert main(["ls", "protocols", *plugins]) == 0
    out = capsys.readouterr().out
    assert "carved" in out and "online_toy" in out
