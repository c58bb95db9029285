"""The planner of issue 19: protocols from the entry-point group `fsbench.protocols`, validation sized by
the protocol, the episode's validation images in a result's identity, and planning without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EP_MODULE = '''
from fsbench.protocols import FewShot, register_protocol


@register_protocol("ep_fewshot")
class EntryPointFewShot(FewShot):
    """The few-shot protocol under another name, installed through an entry point."""

    summary = "few-shot, from an installed package's entry point"
    title = "Entry-point few-shot"

    def folder(self, source):
        return self.name
'''


def _fsbench(args: list[str], cwd: Path, pythonpath: list[Path] = ()) -> subprocess.CompletedProcess:
    """`python -m fsbench ARGS` in a fresh interpreter (registries and entry points as a user's shell has them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250",
           "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, ROOT]))}
    return subprocess.run([sys.executable, "-m", "fsbench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _installed_package(root: Path) -> Path:
    """A package installed as pip would: its module and a `.dist-info` declaring the entry point."""
    site = root / "site"
    (site / "ep_protocols.py").parent.mkdir(parents=True)
    (site / "ep_protocols.py").write_text(EP_MODULE)
    info = site / "ep_protocols-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-protocols\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fsbench.protocols]\nep_fewshot = ep_protocols\n")
    return site


def test_protocols_load_from_the_entry_point_group(tmp_path, synthetic_root):
    site = _installed_package(tmp_path)
    listed = _fsbench(["ls", "protocols"], tmp_path, [site])
    assert listed.returncode == 0, listed.stderr
    assert "ep_fewshot" in listed.stdout and "Entry-point few-shot" in listed.stdout
    plan = _fsbench(["sweep", "--methods", "zero_shot", "--protocols", "ep_fewshot", "--backbones", "test-tiny",
                     "--datasets", "synthetic", "--shots", "1", "--seeds", "1", "--data-root", str(synthetic_root),
                     "--results", str(tmp_path / "results"), "--dry-run"], tmp_path, [site])
    assert plan.returncode == 0, plan.stderr
    assert "1 runs to do" in plan.stdout
    absent = _fsbench(["ls", "protocols"], tmp_path)  # not installed: not listed
    assert absent.returncode == 0 and "ep_fewshot" not in absent.stdout
