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


def test_example_prompt_method_runs_as_a_plugin(tmp_path, monkeypatch, synthetic_root):
    plugin = tmp_path / "my_prompt.py"
    plugin.write_text(_block("example-prompt-method"))
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--plugin", str(plugin), "--method", "anchored_coop", "--backbone", "test-tiny",
               "--dataset", "synthetic", "--shots", "1", "--seed", "1", "--workers", "0", "--device", "cpu",
               "--data-root", str(synthetic_root), "--set", "anchored_coop.epochs=2"])
    assert rc == 0
    result = json.loads((tmp_path / "results/runs/test-tiny/synthetic/anchored_coop/shots1_seed1.json").read_text())
    assert result["status"] == "ok" and result["config"]["weight"] == 4.0 and result["trainable_params"] > 0


def test_example_dataset_reads_a_coop_layout_tree(tmp_path, monkeypatch):
    from datagen import write_image

    folder = tmp_path / "data/resisc45"
    split = {}
    for name, count in (("train", 3), ("val", 1), ("test", 2)):
        split[name] = []
        for label, cls in enumerate(("airport", "beach", "dense_residential")):
            for k in range(count):
                rel = f"{cls}/{name}_{k}.jpg"
                write_image(folder / "images" / rel, label)
                split[name].append([rel, label, cls])
    (folder / "split_resisc45.json").write_text(json.dumps(split))
    plugin = tmp_path / "my_dataset.py"
    plugin.write_text(_block("example-dataset"))
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--plugin", str(plugin), "--method", "zero_shot", "--backbone", "test-tiny",
               "--dataset", "resisc45", "--shots", "2", "--seed", "1", "--workers", "0", "--device", "cpu",
               "--data-root", "data"])
    assert rc == 0
    from fsbench.data import load_dataset

    data = load_dataset("resisc45", tmp_path / "data")
    assert data.classnames == ["airport", "beach", "dense residential"]
    assert data.templates == ["satellite imagery of {}."] and len(data.test) == 6
    result = json.loads((tmp_path / "results/runs/test-tiny/resisc45/zero_shot/shots2_seed1.json").read_text())
    assert result["status"] == "ok" and result["n_test"] == 6
