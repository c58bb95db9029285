"""End to end through the CLI: result files, resume, and one-line errors for user mistakes."""

from __future__ import annotations

import json

import pytest

from fsbench.cli import main

REQUIRED = {"method", "backbone", "dataset", "shots", "seed", "top1", "train_seconds", "peak_memory_bytes",
            "trainable_params", "config", "versions", "created_at"}


@pytest.fixture
def workdir(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(*args: str) -> int:
    return main(["run", "--backbone", "test-tiny", "--dataset", "synthetic", "--shots", "2", "--seed", "1",
                 "--workers", "0", "--device", "cpu", *args])


@pytest.mark.parametrize("method", ["lora", "linear_probe", "zero_shot"])
def test_run_writes_a_complete_result(workdir, synthetic_root, method):
    rc = _run("--method", method, "--data-root", str(synthetic_root), "--set", "lora.iters_per_shot=20")
    assert rc == 0
    path = workdir / "results/runs/test-tiny/synthetic" / method / "shots2_seed1.json"
    result = json.loads(path.read_text())
    assert REQUIRED <= set(result)
    assert result["status"] == "ok" and 0 <= result["top1"] <= 100
    assert result["n_test"] == 100 and result["split_checksum"]
    assert set(result["versions"]) == {"fsbench", "torch", "open_clip", "git"}
    if method == "lora":
        assert result["config"]["iters_per_shot"] == 20
        assert result["trainable_params"] == 3 * 2 * 2 * 2 * (64 + 64)  # q,k,v x 2 blocks x 2 towers
    if method == "zero_shot":
        assert result["trainable_params"] == 0


def test_top1_is_computed_from_predictions(workdir, synthetic_root, monkeypatch):
    """Accuracy is measured: a method that always answers class 0 scores exactly 1/C."""
    import torch

    from fsbench.methods.zero_shot import ZeroShot

    monkeypatch.setattr(ZeroShot, "logits", lambda self, x: torch.nn.functional.one_hot(
        torch.zeros(len(x), dtype=torch.long), self.ctx.num_classes).float())
    assert _run("--method", "zero_shot", "--data-root", str(synthetic_root)) == 0
    result = json.loads((workdir / "results/runs/test-tiny/synthetic/zero_shot/shots2_seed1.json").read_text())
    assert result["top1"] == pytest.approx(10.0)


def test_rerun_skips_finished_runs_and_force_redoes_them(workdir, synthetic_root):
    args = ("--method", "linear_probe", "--data-root", str(synthetic_root))
    assert _run(*args) == 0
    path = workdir / "results/runs/test-tiny/synthetic/linear_probe/shots2_seed1.json"
    first = json.loads(path.read_text())["created_at"]
    mtime = path.stat().st_mtime_ns
    assert _run(*args) == 0
    assert path.stat().st_mtime_ns == mtime
    # another config: never reused, and the finished result is not replaced without --force (exit 2)
    assert _run(*args, "--set", "linear_probe.max_iter=50") == 2
    assert path.stat().st_mtime_ns == mtime
    assert _run(*args, "--set", "linear_probe.max_iter=50", "--force") == 0
    assert path.stat().st_mtime_ns != mtime and first
    assert json.loads(path.read_text())["config"]["max_iter"] == 50


@pytest.mark.parametrize("args, message", [
    (["--method", "lroa"], "did you mean 'lora'"),
    (["--method", "lora", "--backbone", "ViT-B/61"], "unknown backbone"),
    (["--method", "lora", "--dataset", "eurosatt"], "did you mean 'eurosat'"),
    (["--method", "lora", "--dataset", "eurosat"], "eurosat"),
    (["--method", "lora", "--set", "lora.rnak=4"], "unknown key 'rnak'"),
    (["--method", "lora", "--config", "missing.toml"], "config file not found"),
    (["--method", "lora", "--device", "cuda:x"], "device"),
])
def test_user_mistakes_exit_nonzero_with_one_line(workdir, synthetic_root, capsys, args, message):
    rc = _run("--data-root", str(synthetic_root), *args)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err


def test_bad_bench_toml_key_is_one_line(workdir, synthetic_root, capsys):
    (workdir / "bench.toml").write_text("[study]\nmethods = ['zero_shot']\nbackbone = ['x']\n")
    rc = _run("--data-root", str(synthetic_root))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "bench.toml:3" in err and "valid keys" in err and len(err.splitlines()) == 1


def test_ls_lists_registered_names(capsys):
    assert main(["ls", "methods"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "zero_shot" in out and "Zanella" in out
    assert main(["ls", "backbones"]) == 0 and "test-tiny" in capsys.readouterr().out
    assert main(["ls", "datasets"]) == 0
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in capsys.readouterr().out.splitlines() if line.count("│") == 3}
    assert rows["fgvc_aircraft"] == "aircraft, fgvc" and "aircraft" not in rows  # aliases on their main row
    # 11 datasets + imagefolder + synthetic + 4 ImageNet variants + 4 OOD sets (issue 21)
    assert len(rows) == 21 and rows["imagenet"] == ""
    assert main(["ls", "nonsense"]) == 2
