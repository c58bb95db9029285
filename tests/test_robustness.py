"""Bad input never costs work or a traceback: each mistake is one line with a documented exit code
(docs/exit-codes.md), a failing run is recorded as failed, and caches are never used corrupt."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsbench.backbones import BackboneSpec, build_backbone
from fsbench.cli import main
from fsbench.data import load_dataset
from fsbench.data.synthetic import ensure_synthetic
from fsbench.features import FeatureCache
from fsbench.images import load_images
from fsbench.results import iter_results
from fsbench.splits import SplitStore, draw_split

REPO = Path(__file__).resolve().parents[1]
FAST = ["-b", "test-tiny", "-d", "synthetic", "--device", "cpu", "--workers", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    ensure_synthetic(root)
    return root


@pytest.fixture
def private_root(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic data root that a test may damage."""
    shutil.copytree(synthetic_root, tmp_path / "data")
    return tmp_path / "data"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in-process; return (exit code, stderr), asserting stderr is one line, no traceback."""
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    return code, err


@pytest.mark.parametrize(("flag", "typo", "suggestion"), [
    ("-m", "lorra", "lora"), ("-d", "eurosatt", "eurosat"), ("-b", "test-tinny", "test-tiny")])
def test_unknown_names_suggest(capsys, tmp_path: Path, flag: str, typo: str, suggestion: str) -> None:
    args = {"-m": "zero_shot", "-b": "test-tiny", "-d": "synthetic", flag: typo}
    code, err = run_cli(capsys, "run", *[x for kv in args.items() for x in kv], "--results", str(tmp_path / "r"))
    assert code == 2 and f"did you mean {suggestion!r}" in err
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.parametrize(("text", "expected"), [
    ('[runtime]\nworkers = "many"\n', ["bench.toml:2", "[runtime].workers: expected int"]),
    ("[study]\nshots = [1]\nseedz = [1]\n", ["bench.toml:3", "unknown key 'seedz'", "did you mean 'seeds'",
                                             "valid keys: methods, backbones"]),
    ("[studdy]\nshots = [1]\n", ["bench.toml:1", "unknown section [studdy]", "valid sections: study"]),
    ('[runtime]\ndevice = "gpu"\n', ["device must be auto, cpu, cuda or cuda:N"]),
    ("runtime = 3\n", ["runtime must be a table"]),
    ("[runtime\nworkers = 1\n", ["invalid TOML"]),
])
def test_bad_bench_toml(capsys, tmp_path: Path, text: str, expected: list[str]) -> None:
    (tmp_path / "bench.toml").write_text(text)
    code, err = run_cli(capsys, "run", "--config", str(tmp_path / "bench.toml"), "-m", "zero_shot", *FAST)
    assert code == 2
    for part in expected:
        assert part in err


def test_shots_larger_than_a_class(capsys, synthetic_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["run", "-m", "zero_shot", *FAST, "--shots", "17", "--data-root", str(synthetic_root),
            "--sampler", "fsbench"]  # clip_lora and coop have small-class rules of their own
    code, err = run_cli(capsys, *args)
    assert code == 3 and "has 16 images but 17 shots were asked" in err and "--allow-repeat" in err
    assert run_cli(capsys, *args, "--allow-repeat")[0] == 0  # sample with replacement (CLIP-LoRA's rule)
    split = json.loads((tmp_path / ".fsbench_cache/splits/synthetic/shots17_seed1_repeat.json").read_text())
    assert len(split["train"]) == 170 and len({tuple(x) for x in split["train"]}) <= 160


def damage(root: Path, names: list[str]) -> list[str]:
    """Overwrite synthetic images with junk; returns their paths relative to the image root."""
    images = root / "synthetic" / "images"
    for rel in names:
        (images / rel).write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return names


def test_all_unreadable_images_are_named(capsys, private_root: Path, tmp_path: Path, monkeypatch) -> None:
    """Every unreadable file the run reads is named; one it does not read (an undrawn shot) is not."""
    monkeypatch.chdir(tmp_path)
    data = load_dataset("synthetic", private_root)
    split = draw_split(data, 1, 1)
    undrawn = next(it.path for i, it in enumerate(data.train) if i not in split.train)
    bad = damage(private_root, [data.train[split.train[3]].path, data.val[split.val[1]].path, "pink_bars/test_09.png"])
    damage(private_root, [undrawn])
    args = ["run", "-m", "zero_shot", *FAST[:-4], "--workers", "1", "--seed", "1", "--shots", "1",
            "--data-root", str(private_root), "--results", "res", "--sampler", "fsbench"]  # draw_split's draw
    code, err = run_cli(capsys, *args)
    assert code == 3 and "3 unreadable images under" in err and "--skip-bad-images" in err
    assert all(b in err for b in bad) and undrawn not in err
    assert run_cli(capsys, *args, "--skip-bad-images")[0] == 0
    (result,) = iter_results(tmp_path / "res")
    assert result.status == "ok" and result.extra["skipped_images"] == 4 and result.n_test == 99


def test_image_method_names_every_bad_training_file(private_root: Path) -> None:
    data = load_dataset("synthetic", private_root)
    bad = damage(private_root, [data.train[0].path, data.train[5].path])
    with pytest.raises(Exception, match="2 unreadable images under .*: " + ", ".join(bad)):
        load_images(data.train[:8], data.image_root)


def test_nan_loss_marks_the_run_failed_with_its_step(capsys, synthetic_root: Path, tmp_path: Path) -> None:
    code, err = run_cli(capsys, "run", "-m", "lora", *FAST, "--shots", "1", "--data-root", str(synthetic_root),
                        "--results", str(tmp_path), "--set", "lora.lr=1e30", "--set", "lora.iters_per_shot=3")
    assert code == 5 and "1 of 1 runs failed" in err and "non-finite loss" in err
    (result,) = iter_results(tmp_path)
    assert result.status == "failed" and "step" in result.error and result.top1 is None


def test_out_of_memory_marks_the_run_failed_with_advice(capsys, synthetic_root: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    from fsbench.methods.zero_shot import ZeroShot

    def fit(self, train, val):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ZeroShot, "fit", fit)
    code, err = run_cli(capsys, "run", "-m", "zero_shot", *FAST, "--shots", "1",
                        "--data-root", str(synthetic_root), "--results", str(tmp_path))
    assert code == 5 and "out of memory" in err
    (result,) = iter_results(tmp_path)
    assert result.status == "failed" and "batch" in result.error


def test_results_path_that_is_a_file_fails_before_work(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("results.txt").write_text("not a folder")
    code, err = run_cli(capsys, "run", "-m", "zero_shot", *FAST, "--shots", "1", "--data-root", "data",
                        "--results", "results.txt")
    assert code == 2 and "results.txt is a file, not a folder" in err and "--results" in err
    sweep = ["sweep", "--methods", "zero_shot", "--backbones", "test-tiny", "--datasets", "synthetic",
             "--device", "cpu", "--seeds", "1"]
    for args in (["run", "-m", "zero_shot", *FAST], sweep):  # --save-adapter at a file: the same one-line error
        code, err = run_cli(capsys, *args, "--shots", "1", "--data-root", "data", "--save-adapter", "results.txt")
        assert code == 2 and "results.txt is a file, not a folder" in err and "--save-adapter" in err, err
    assert not Path("data").exists() and not Path("results").exists()  # failed before any work
    assert not Path("data").exists() and not Path(".fsbench_cache").exists()  # nothing was started


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_read_only_results_folder_fails_before_work(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("ro").mkdir(mode=0o500)
    code, err = run_cli(capsys, "run", "-m", "zero_shot", *FAST, "--shots", "1", "--data-root", "data",
                        "--results", "ro/runs")
    assert code == 2 and "cannot write to ro/runs" in err
    assert not Path("data").exists()


def test_corrupt_feature_cache_is_rebuilt(synthetic_root: Path, tmp_path: Path) -> None:
    backbone = build_backbone(BackboneSpec("test-tiny"), "cpu")
    data = load_dataset("synthetic", synthetic_root)

    def features():
        cache = FeatureCache(tmp_path, torch.device("cpu"), workers=0)
        return cache, cache.split(backbone, data, "val")

    cache, reference = features()
    (path,) = (tmp_path / "features" / "synthetic").glob("val-*/*.pt")
    assert cache.encodes == 1 and features()[0].encodes == 0  # a sound file is reused
    blob = path.read_bytes()
    for damaged in (blob[: len(blob) // 2], blob[:4000] + bytes(b ^ 0xFF for b in blob[4000:4100]) + blob[4100:]):
        path.write_bytes(damaged)
        cache, feats = features()
        assert cache.encodes == 1 and torch.equal(feats.x, reference.x)  # detected, rebuilt, never used
        assert not path.exists()  # the damaged shard is gone; a new one holds the rows
        (path,) = (tmp_path / "features" / "synthetic").glob("val-*/*.pt")
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_split_file_is_drawn_again(synthetic_root: Path, tmp_path: Path) -> None:
    data = load_dataset("synthetic", synthetic_root)
    store = SplitStore(tmp_path)
    reference = store.get(data, 4, 1)
    path = store.path("synthetic", 4, 1)
    text = path.read_text()
    chosen = data.train[reference.train[0]].path
    unknown = text.replace(json.dumps(chosen), json.dumps(chosen + "x"), 1)  # valid JSON, a file not in the dataset
    assert unknown != text
    for damaged in (text[: len(text) // 2], unknown, "\x00\xff garbage", "[]"):
        path.write_text(damaged)
        assert store.get(data, 4, 1) == reference
        assert json.loads(path.read_text())["checksum"] == reference.checksum(data)


@pytest.mark.slow
def test_kill_9_during_training_loses_nothing(synthetic_root: Path, tmp_path: Path, monkeypatch) -> None:
    """kill -9 a `python -m fsbench run` while LoRA trains; a re-run completes and no partial file remains.

    The re-run (in this process, to save an interpreter start) uses fewer steps, a different config,
    to keep the test short; it proves the killed run left nothing that blocks or pollutes it.
    """
    args = ["run", "-m", "lora", *FAST, "--shots", "2", "--data-root", str(synthetic_root), "--results", "results",
            "--sampler", "fsbench"]  # the split file waited for below is the fsbench sampler's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "fsbench", *args, "--set", "lora.iters_per_shot=400"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    split = tmp_path / ".fsbench_cache/splits/synthetic/shots2_seed1.json"
    deadline = time.monotonic() + 120
    while not split.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # the split is written just before fit(): now it is training
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "results").rglob("*.json"))
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--set", "lora.iters_per_shot=2"]) == 0
    (result,) = iter_results(tmp_path / "results")
    assert result.status == "ok" and result.split_checksum
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".part"))]
