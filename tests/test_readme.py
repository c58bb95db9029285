"""The README's promises hold: its example method runs as a plugin, its commands exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fsbench.cli import main

README = Path(__file__).parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```", text, re.S)
    assert match, f"README block {marker} missing"
    return match.group(1)


def test_example_method_runs_as_a_plugin(tmp_path, monkeypatch, synthetic_root):
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(_block("example-method"))
    assert len(_block("example-method").strip().splitlines()) <= 40
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--plugin", str(plugin), "--method", "nearest_mean", "--backbone", "test-tiny",
               "--dataset", "synthetic", "--shots", "4", "--seed", "1", "--workers", "0",
               "--data-root", str(synthetic_root)])
    assert rc == 0
    result = json.loads((tmp_path / "results/runs/test-tiny/synthetic/nearest_mean/shots4_seed1.json").read_text())
    assert result["status"] == "ok" and result["config"] == {"temperature": 0.01}


def test_setup_commands_install_and_run_what_they_say():
    demo, test = _block("demo-command"), _block("test-command")
    assert 'pip install -e ".[dev]"' in demo and demo.strip().endswith("fsbench demo")
    assert test.strip().endswith("pytest -q")
    ci = (README.parent / ".ci/run").read_text()
    assert "test-command" in ci
