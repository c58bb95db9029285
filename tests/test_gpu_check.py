"""benchmarks/gpu_check.sh --smoke: every check runs (or is skipped with its reason) and writes its result.

The GPU run of the same script is what issue 16 measures; this CPU run, with tiny sizes, keeps the
script, its checks and their outputs working between GPU sessions. It installs nothing: open_clip
imports here, so the install step must be a no-op.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu_checks"))
from plan import plan  # noqa: E402

GPU_ONLY = {"pytest_gpu", "levers", "frozen_grid"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, export = tmp / "out", tmp / "export"
    env = {**os.environ, "PYTHON": sys.executable, "FSBENCH_WHEELS": str(tmp / "no-wheels")}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--smoke", "--work",
                           str(tmp / "work"), "--export", str(export)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)
    return proc, out, export


@pytest.mark.slow
def test_smoke_run_passes_and_every_check_wrote_its_result(smoke_run) -> None:
    proc, out, _ = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "nothing installed" in (out / "logs" / "install.log").read_text()
    names = [c.name for c in plan(True, out / "checks", out)]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == names
    for name in names:
        record = json.loads((out / "checks" / f"{name}.json").read_text())
        if name in GPU_ONLY and not torch.cuda.is_available():
            assert record["status"] == "skipped" and record["reason"] == "no CUDA"
        elif name == "sweep_ray" and record["status"] == "skipped":
            assert record["reason"] == "ray is not installed"
        else:
            assert record["status"] == "pass", record
            assert record["numbers"], f"{name} wrote no numbers"


@pytest.mark.slow
def test_smoke_run_numbers_and_report(smoke_run) -> None:
    _, out, export = smoke_run
    checks = {c["name"]: c for c in json.loads((out / "results.json").read_text())["checks"]}
    e2e = checks["lora_e2e"]["numbers"]
    assert e2e["identical"] and all(r["steps_recorded"] == e2e["steps"] for r in e2e["runs"])
    assert all(s > 0 for s in e2e["s_per_step"])
    crops = checks["crops"]["numbers"]["cpu"]["pipeline"]
    assert crops["smooth"]["max"] <= 0.031
    assert checks["projection"]["numbers"]["fsbench_minutes"] > 0
    assert set(checks["memory"]["numbers"]["peaks"]) == {"test-tiny"}
    machine = json.loads((out / "machine.json").read_text())
    assert machine["torch"] == torch.__version__ and machine["date"]
    report = (out / "gpu_measurements.md").read_text()
    assert report.startswith("## Smoke run") and "16-shot ImageNet test-tiny CLIP-LoRA projected: " in report
    assert sorted(p.name for p in export.iterdir()) == ["gpu_check_details.tgz", "gpu_measurements.md",
                                                         "machine.json", "results.json", "summary.txt"]


def test_unknown_option_and_missing_out_dir_are_usage_errors(tmp_path: Path) -> None:
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    for args in (["--smoke"], [str(tmp_path / "o"), "--bogus"]):
        proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "error:" in proc.stderr
