"""`fsbench sweep` / `fsbench ablate`: plan, resume after kill -9, failures, Ray, the Figure 3 grid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsbench.cli import main
from fsbench.config import BenchConfig, apply_sets, load_bench, method_config
from fsbench.engine import Runner
from fsbench.features import FeatureCache, tensor_checksum
from fsbench.method import METHODS
from fsbench.results import iter_results, result_path
from fsbench.spec import RunSpec
from fsbench.sweep import WorkQueue, ablation_specs, ablation_variants, build_plan, order_runs
from fsbench.sweep.plan import remove_stale_temp

ROOT = Path(__file__).resolve().parents[1]
FAST = ["lora.iters_per_shot=2", "linear_probe.max_iter=20", "linear_probe.weight_decays=[0.01]",
        "runtime.workers=0"]
PLUGIN = '''
import os
import time

from fsbench.method import Method, register_method


@register_method("{name}")
class Plugin(Method):
    input_kind = "features"

    def fit(self, train, val):
        time.sleep({sleep})
        if {die}:
            os._exit(1)  # the worker process dies mid-run
        if {fail}:
            raise RuntimeError("deliberate [failure]\\nsecond line")
        self.w = self.ctx.text_weights()
        with open({log!r}, "a") as fh:
            fh.write(f"{{self.ctx.shots}},{{self.ctx.seed}}\\n")

    def logits(self, x):
        return x @ self.w.T
'''


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as in a 1-CPU Ray worker: the short L-BFGS probe of these tests depends on
    summation order, and a shared CI machine runs one-thread torch faster and steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./bench.toml: built-in defaults
    return tmp_path


def plugin(tmp_path: Path, name: str, sleep: float = 0.0, fail: bool = False, die: str = "False") -> Path:
    """A plugin file registering method `name` (unique per test: a registry name is taken once);
    its `fit` sleeps, then exits the process when the expression `die` holds, or raises if `fail`."""
    path = tmp_path / f"{name}.py"
    path.write_text(PLUGIN.format(name=name, sleep=sleep, fail=fail, die=die, log=str(tmp_path / f"{name}.log")))
    return path


def sweep_args(root: Path, data: Path, results: str = "results", command: str = "sweep") -> list[str]:
    sets = [arg for s in [*FAST, f"runtime.cache_dir={root / 'cache'}"] for arg in ("--set", s)]
    return [command, "--backbones", "test-tiny", "--datasets", "synthetic", "--data-root", str(data),
            "--results", str(root / results), "--device", "cpu", *sets]


def results_by_key(folder: Path) -> dict[tuple, object]:
    return {(r.method, r.shots, r.seed): r for r in iter_results(folder)}


def tiny_cfg(root: Path, data: Path, *sets: str) -> BenchConfig:
    paths = [f'runtime.results="{root / "results"}"', f'runtime.data_root="{data}"', 'runtime.device="cpu"']
    return apply_sets(BenchConfig(), [*FAST, *paths, *sets])


# --- plan ------------------------------------------------------------------------------------


def test_order_groups_runs_by_backbone_and_dataset_in_study_order():
    specs = [RunSpec(m, b, d, k, 1) for m in ("zero_shot", "lora") for b in ("B/16", "L/14")
             for d in ("dtd", "eurosat") for k in (1, 2)]
    ordered = order_runs(specs + specs[:3])  # duplicates dropped
    assert len(ordered) == len(specs)
    groups = [(s.backbone, s.dataset) for s in ordered]
    assert list(dict.fromkeys(groups)) == [("B/16", "dtd"), ("B/16", "eurosat"), ("L/14", "dtd"), ("L/14", "eurosat")]
    assert sum(a != b for a, b in zip(groups, groups[1:], strict=False)) == 3  # each group: one block
    assert [s.method for s in ordered[:4]] == ["zero_shot", "zero_shot", "lora", "lora"]


def test_work_queue_keeps_workers_on_their_group():
    specs = order_runs([RunSpec("m", b, d, k, 1) for b in ("A", "B") for d in ("x", "y") for k in (1, 2)])
    queue = WorkQueue(specs)
    first = queue.take(None)
    assert (first.backbone, first.dataset) == ("A", "x")
    second = queue.take(None, busy={("A", "x")})  # another worker starts a free group, same backbone first
    assert (second.backbone, second.dataset) == ("A", "y")
    assert (queue.take(("A", "x"), busy={("A", "y")}).dataset, len(queue)) == ("x", 5)
    assert queue.take(("A", "x"), busy={("A", "y")}).backbone == "B"  # group done: a free group
    rest = [queue.take(("A", "y")) for _ in range(len(queue))]
    assert None not in rest and queue.take(None) is None


def test_plan_skips_same_config_and_reruns_a_changed_one(workdir, synthetic_root):
    args = [*sweep_args(workdir, synthetic_root), "--methods", "zero_shot,linear_probe", "--shots", "1",
            "--seeds", "1,2"]
    assert main(args) == 0
    specs = [RunSpec(m, "test-tiny", "synthetic", 1, s) for m in ("zero_shot", "linear_probe") for s in (1, 2)]
    plan = build_plan(Runner(tiny_cfg(workdir, synthetic_root)).planner, specs)
    assert (len(plan.todo), len(plan.done), len(plan.failed)) == (0, 4, 0)
    changed = build_plan(Runner(tiny_cfg(workdir, synthetic_root, "linear_probe.max_iter=21")).planner, specs)
    assert not changed.todo and len(changed.done) == 2  # a finished result of another config is not replaced
    assert [s.method for s, _ in changed.conflicts] == ["linear_probe", "linear_probe"]
    assert all("method config changed" in reason for _, reason in changed.conflicts)
    replaced = build_plan(Runner(tiny_cfg(workdir, synthetic_root, "linear_probe.max_iter=21")).planner, specs,
                          replace_changed=True)  # --retry changed
    assert [s.method for s in replaced.todo] == ["linear_probe", "linear_probe"] and replaced.todo[0].replace
    forced = build_plan(Runner(tiny_cfg(workdir, synthetic_root)).planner, specs, force=True)
    assert len(forced.todo) == 4


def test_dry_run_prints_the_plan_and_applies_list_overrides(workdir, synthetic_root, capsys):
    args = [*sweep_args(workdir, synthetic_root), "--methods", "zero_shot,lora", "--shots", "1,2,4",
            "--seeds", "1,2", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sweep plan" in out and "test-tiny" in out and "12 runs to do, 0 already done" in out
    assert not list(workdir.rglob("*.json"))
    assert not (workdir / "results").exists()  # a dry run creates no results folder


def test_sweep_saves_adapters_and_reruns_a_result_without_one(workdir, synthetic_root, capsys):
    args = [*sweep_args(workdir, synthetic_root), "--methods", "linear_probe", "--shots", "1", "--seeds", "1,2"]
    assert main(args) == 0
    saved = workdir / "adapters"
    assert main([*args, "--save-adapter", str(saved)]) == 0  # both results exist, but not their adapters
    assert "2 runs to do, 0 already done" in " ".join(capsys.readouterr().out.split())
    assert sorted(p.name for p in saved.rglob("shots1_seed*")) == ["shots1_seed1", "shots1_seed2"]
    assert main([*args, "--save-adapter", str(saved)]) == 0
    assert "0 runs to do, 2 already done" in " ".join(capsys.readouterr().out.split())


def test_remove_stale_temp_keeps_fresh_ones(tmp_path):
    old, fresh = tmp_path / "a" / ".shots1_seed1.json.x1.tmp", tmp_path / ".shots1_seed2.json.x2.tmp"
    old.parent.mkdir()
    old.write_text("{")
    fresh.write_text("{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert remove_stale_temp(tmp_path) == 1
    assert not old.exists() and fresh.exists()


# --- failures, resume -----------------------------------------------------------------------------


def test_a_failing_run_is_recorded_and_the_others_finish(workdir, synthetic_root, capsys):
    boom = plugin(workdir, "sweep_boom", fail=True)
    args = [*sweep_args(workdir, synthetic_root), "--methods", "sweep_boom,zero_shot", "--shots", "1",
            "--seeds", "1,2"]
    assert main([*args, "--plugin", str(boom)]) == 5  # RunFailed: some run of this sweep failed
    results = results_by_key(workdir / "results")
    assert [results[("zero_shot", 1, s)].status for s in (1, 2)] == ["ok", "ok"]
    failed = results[("sweep_boom", 1, 1)]
    assert failed.status == "failed" and failed.error == "RuntimeError: deliberate [failure]"
    assert "Traceback" in failed.extra["traceback"]
    assert "2 failed" in capsys.readouterr().out
    assert main(args) == 0  # failed earlier: skipped by default, and said so (plugin still registered)
    assert "2 failed earlier" in capsys.readouterr().out
    assert main([*args, "--retry", "failed"]) == 5
    assert "2 runs to do, 2 already done" in capsys.readouterr().out


def test_max_failures_stops_starting_runs(workdir, synthetic_root, capsys):
    boom = plugin(workdir, "sweep_boom_stop", fail=True)
    args = [*sweep_args(workdir, synthetic_root), "--methods", "sweep_boom_stop,zero_shot", "--shots", "1",
            "--seeds", "1,2", "--plugin", str(boom), "--set", "sweep.max_failures=0"]
    assert main(args) == 5
    assert "1 failed, 3 not started" in capsys.readouterr().out
    assert len(iter_results(workdir / "results")) == 1


def test_resume_after_kill_runs_each_run_exactly_once(workdir, synthetic_root, capsys):
    slow = plugin(workdir, "sweep_slow", sleep=0.4)
    args = [*sweep_args(workdir, synthetic_root), "--methods", "sweep_slow", "--shots", "1,2", "--seeds", "1,2,3",
            "--plugin", str(slow)]  # loaded once in this process too: by the second sweep
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "fsbench", *args], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = workdir / "results"
    deadline = time.monotonic() + 90
    while not list(results.rglob("*.json")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p: (p.stat().st_mtime_ns, json.loads(p.read_text())["created_at"]) for p in results.rglob("*.json")}
    assert 1 <= len(before) < 6
    assert main(args) == 0
    assert f"{6 - len(before)} done, {len(before)} skipped" in capsys.readouterr().out
    after = list(results.rglob("*.json"))
    assert len(after) == 6 and all(r.status == "ok" for r in iter_results(results))
    assert all((p.stat().st_mtime_ns, json.loads(p.read_text())["created_at"]) == v for p, v in before.items())
    fits = (workdir / "sweep_slow.log").read_text().split()
    assert sorted(fits) == sorted(f"{k},{s}" for k in (1, 2) for s in (1, 2, 3))  # each fit completed once
    assert not [p for p in results.rglob("*") if p.name.endswith(".tmp")]


# --- executors ----------------------------------------------------------------------------------


def test_ray_missing_is_a_one_line_error(workdir, synthetic_root, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    args = [*sweep_args(workdir, synthetic_root), "--methods", "zero_shot", "--shots", "1", "--seeds", "1",
            "--executor", "ray"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "not installed: pip install ray" in err and "\n" not in err


@pytest.mark.slow
def test_ray_executor_matches_local(workdir, synthetic_root, capsys):
    """Same results as local; a failing run is recorded; a run whose worker dies is lost alone."""
    pytest.importorskip("ray")
    boom = plugin(workdir, "sweep_boom_ray", fail=True)
    # Exits its process in a Ray worker (K=1), raises in this one.
    die = plugin(workdir, "sweep_die_ray", fail=True, die=f"os.getpid() != {os.getpid()} and self.ctx.shots == 1")
    study = ["--methods", "zero_shot,linear_probe,lora,sweep_boom_ray,sweep_die_ray", "--shots", "1,2", "--seeds", "1"]
    ray_args = ["--executor", "ray", "--set", "sweep.workers=2", "--set", "sweep.cpus_per_run=1"]
    # The plugins load in this process and in each Ray worker; the local sweep finds them registered.
    assert main([*sweep_args(workdir, synthetic_root, "ray"), *study, *ray_args, "--plugin", str(boom),
                 "--plugin", str(die)]) == 5
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "6 done, 0 skipped (already done), 4 failed" in out and "actor died unexpectedly" in out
    assert main([*sweep_args(workdir, synthetic_root, "local"), *study]) == 5
    local, remote = results_by_key(workdir / "local"), results_by_key(workdir / "ray")
    assert set(local) - set(remote) == {("sweep_die_ray", 1, 1)}  # lost with its worker: no result file
    for key, result in remote.items():
        assert (result.status, result.top1, result.config) == (local[key].status, local[key].top1,
                                                               local[key].config), key
    assert remote[("sweep_boom_ray", 1, 1)].error == "RuntimeError: deliberate [failure]"


@pytest.mark.slow
def test_feature_cache_survives_concurrent_writers(tmp_path, tiny, synthetic, synthetic_root):
    """This process and a child encode the same split at once: both get the same features, and the
    cache holds each row once (one shard each when both encoded).
    (A child process, not a fork: a forked torch process can deadlock in its thread pool.)"""
    script = f'''
import time
from pathlib import Path
import torch
from fsbench.backbones import BackboneSpec, build_backbone
from fsbench.data import load_dataset
from fsbench.features import FeatureCache, tensor_checksum
tmp = Path({str(tmp_path)!r})
backbone, data = build_backbone(BackboneSpec("test-tiny")), load_dataset("synthetic", {str(synthetic_root)!r})
cache = FeatureCache(tmp / "cache", torch.device("cpu"), 16, 0)
(tmp / "ready-child").touch()
while not (tmp / "ready-parent").exists():
    time.sleep(0.001)
feats = cache.split(backbone, data, "test")
print(tensor_checksum(feats.x, feats.y), cache.encodes)
'''
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE)
    cache = FeatureCache(tmp_path / "cache", torch.device("cpu"), 16, 0)
    while not (tmp_path / "ready-child").exists():
        assert child.poll() is None
        time.sleep(0.001)
    (tmp_path / "ready-parent").touch()  # start encoding together
    mine = cache.split(tiny, synthetic, "test")
    theirs, child_encodes = child.communicate(timeout=120)[0].decode().split()
    assert child.returncode == 0 and cache.encodes == 1
    assert theirs == tensor_checksum(mine.x, mine.y)
    files = list((tmp_path / "cache").rglob("*"))
    shards = [f for f in files if f.suffix == ".pt"]
    assert not [f for f in files if f.name.endswith(".tmp")] and len(shards) == (2 if child_encodes == "1" else 1)
    stored = FeatureCache(tmp_path / "cache", torch.device("cpu"), 16, 0).load(
        cache.key(tiny, synthetic, "test", tiny.preprocess))
    assert sorted(stored.index.tolist()) == list(range(len(synthetic.test)))  # rows both wrote, kept once
    assert tensor_checksum(stored.x[stored.index.argsort()], stored.y[stored.index.argsort()]) == theirs
    print("child encoded" if child_encodes == "1" else "child loaded")


# --- ablation -------------------------------------------------------------------------------------


def test_ablation_grid_is_figure_3():
    cfg = BenchConfig()
    variants = ablation_variants(cfg)
    assert len(variants) == 9 * 4 + 5 + 2  # (a) matrices x ranks; (b), (c) minus the shared default
    assert "lora@qkv-r2-all-both" in variants and "lora@qv-r8-all-both" in variants
    assert {v["position"] for v in variants.values()} == {"bottom", "mid", "up", "half-bottom", "half-up", "all"}
    assert {v["encoder"] for v in variants.values()} == {"vision", "text", "both"}
    assert {v["rank"] for k, v in variants.items() if "-all-both" not in k} == {2}
    lora = METHODS.get("lora")
    for v in variants.values():
        method_config(lora, v)  # every variant is a valid LoRA config
    specs = ablation_specs(cfg)
    paths = {result_path("r", s.label, s.backbone, s.dataset, s.shots, s.seed) for s in specs}
    assert len(specs) == len(paths) == len(variants) * 11 * 3  # 11 datasets x 3 seeds at 4 shots


def test_bench_toml_is_the_papers_full_study():
    cfg = load_bench(ROOT / "bench.toml")
    # the methods fsbench ships, not test plugins
    shipped = {n for n in METHODS.names() if METHODS.get(n).__module__.startswith("fsbench.methods.")}
    # peft: an optional cross-check of lora; clap, gda, prolip: 2024 baselines beyond the paper's study; the
    # 2025 comparison (issue 22) and LoRA's relatives: outside the paper's study too
    beyond = {"peft", "clap", "gda", "prolip", "promptsrc", "tcp", "dept_coop", "dept_kgcoop", "dept_maple",
              "clip_svd", "clipfit", "two_stage", "lora_dora", "lora_pissa", "lora_vera", "gallop",
              # issue 21's test-time and transductive methods: other protocols than the paper's
              "tda", "tpt", "zero", "transclip"}
    assert set(cfg.study.methods) == shipped - beyond
    assert (len(cfg.study.datasets), cfg.study.shots, cfg.study.seeds) == (11, [1, 2, 4, 8, 16], [1, 2, 3])
    lora = METHODS.get("lora")
    assert method_config(lora, cfg.methods["lora"]) == lora.Config()  # written out = the paper's defaults
    assert not cfg.ablation.enabled and ablation_variants(cfg) == ablation_variants(BenchConfig())


def test_ablate_runs_each_variant_into_its_own_result(workdir, synthetic_root, capsys):
    grid = ['ablation.matrices=[["v"]]', "ablation.ranks=[2]", 'ablation.positions=["all","up"]',
            'ablation.encoders=["both","vision"]', "ablation.seeds=[1]", "ablation.shots=[1]"]
    args = [*sweep_args(workdir, synthetic_root, command="ablate"), *[a for s in grid for a in ("--set", s)]]
    assert main([*args, "--dry-run"]) == 0
    assert "4 runs to do" in capsys.readouterr().out
    assert main(args) == 0
    results = iter_results(workdir / "results")
    labels = {r.method for r in results}
    assert labels == {"lora@v-r2-all-both",  # (a) matrices x ranks
                      "lora@qkv-r2-all-both", "lora@qkv-r2-up-both",  # (b) positions
                      "lora@qkv-r2-all-vision"}  # (c) encoders
    for r in results:
        assert r.extra["base_method"] == "lora" and r.status == "ok"
        assert r.method == f"lora@{''.join(r.config['matrices'])}-r{r.config['rank']}-" \
                           f"{r.config['position']}-{r.config['encoder']}"
    assert main(args) == 0 and "0 runs to do, 4 already done" in capsys.readouterr().out
