"""The checks of benchmarks/gpu_check.sh, in priority order, with their sizes on a GPU and in --smoke.

Each check is one command run in its own process under a timeout. Commands that measure write
their numbers with `--out OUT/checks/<name>.json`; `pytest_gpu` writes JUnit XML instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

# Sizes per mode. GPU: the job (ViT-B/16, 1,000 classes, batch 32); smoke: the same steps,
# tiny (test-tiny backbone, 5 classes, a few steps), on CPU in about a minute.
SIZES = {
    "gpu": {"device": "cuda", "backbone": "ViT-B/16", "classes": 1000, "e2e_steps": 300, "e2e_warmup": 20,
            "e2e_batch": 32, "e2e_tolerance": 0.02, "crop_images": 32, "coop_epochs": 2, "budget": 480},
    "smoke": {"device": "cpu", "backbone": "test-tiny", "classes": 5, "e2e_steps": 6, "e2e_warmup": 2,
              "e2e_batch": 4, "e2e_tolerance": 0.0, "crop_images": 4, "coop_epochs": 1, "budget": 300},
}


@dataclass
class Check:
    """One check: what it shows, its command, its timeout (s) and what it needs to run at all."""

    name: str
    what: str
    argv: list[str]
    timeout: float
    cuda_only: bool = False
    needs: str | None = None  # a module that must be importable, else the check is skipped
    extra: dict = field(default_factory=dict)


def script(name: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve().parents[1] / name)]


def fsbench_args(s: dict, data: Path, results: Path, work: Path, sweep: bool = False) -> list[str]:
    """Arguments every fsbench command of the checks shares: random weights, the generated data,
    its own results folder, a shared cache, and an empty study file (nothing from ./bench.toml;
    `fsbench sweep` takes it as its argument, `fsbench run` as --config)."""
    config = [str(work / "empty.toml")] if sweep else ["--config", str(work / "empty.toml")]
    return [*config, "--backbones" if sweep else "--backbone", s["backbone"], "--data-root", str(data),
            "--results", str(results), "--device", s["device"], "--set", f"runtime.cache_dir={work / 'cache'}"]


def data_and_tests(s: dict, smoke: bool, out: Path, work: Path) -> list[Check]:
    data = work / "data"
    size = ["--small"] if smoke else []
    return [
        Check("datagen", f"generated imagefolder dataset, {s['classes']} ImageNet class names, 1 image per "
              "class and split", script("gpu_checks/datagen.py") + [str(data), "--classes", str(s["classes"]),
                                                                    *size, "--out", str(out / "datagen.json")], 90),
        Check("pytest_gpu", "pytest -m gpu (every GPU-marked test)",
              [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={work / 'junit.xml'}", "tests"], 150, cuda_only=True, extra={"junit": work / "junit.xml"}),
        Check("crops", "on-device crops vs torchvision's PIL RandomResizedCrop, same boxes (normalised units)",
              script("gpu_checks/crops.py") + ["--images", str(s["crop_images"]), "--out", str(out / "crops.json")],
              90),
    ]


def lora_checks(s: dict, smoke: bool, out: Path, work: Path) -> list[Check]:
    e2e = ["--data-root", str(work / "data"), "--work", str(work / "e2e"), "--backbone", s["backbone"],
           "--steps", str(s["e2e_steps"]), "--warmup", str(s["e2e_warmup"]), "--batch", str(s["e2e_batch"]),
           "--device", s["device"], "--tolerance", str(s["e2e_tolerance"])]
    dev = ["--device", s["device"]]
    tiny_step = ["--backbone", "test-tiny", "--classes", "10", "--batch", "4", "--steps", "1", "--warmup", "1",
                 "--repeats", "1"] if smoke else []
    tiny_proj = ["--backbone", "test-tiny", "--steps", "1", "--warmup", "0", "--eval-images", "8",
                 "--eval-batch", "8"] if smoke else []
    backbones = ["test-tiny"] if smoke else ["ViT-B/16", "ViT-B/32", "ViT-L/14"]
    tiny_mem = ["--classes", "10", "--batch", "2"] if smoke else []
    return [
        Check("lora_e2e", f"fsbench run --method lora {s['backbone']} augment=device, {s['e2e_steps']} steps, "
              "twice with seed 1 (s/step, loss curves)", script("gpu_checks/lora_e2e.py") + e2e +
              ["--out", str(out / "lora_e2e.json")], 240),
        Check("lora_step", "training step, fsbench vs reference-style path (s/step, MFU, ratio)",
              script("lora_step.py") + dev + tiny_step + ["--out", str(out / "lora_step.json")], 180),
        Check("projection", "16-shot ImageNet ViT-B/16 job: 8,000 steps + 50,000-image evaluation, projected",
              script("projection.py") + dev + tiny_proj + ["--out", str(out / "projection.json")], 180),
        Check("memory", "peak memory of one training step per backbone (fsbench and reference-style)",
              script("memory.py") + dev + ["--backbones", *backbones] + tiny_mem +
              ["--out", str(out / "memory.json")], 240),
    ]


def method_checks(s: dict, smoke: bool, out: Path, work: Path) -> list[Check]:
    data = work / "data"
    coop_res, ray_res = work / "coop_frozen", work / "sweep_ray"
    coop = ["run", "--method", "coop,linear_probe", "--dataset", "imagefolder", "--shots", "1", "--seed", "1",
            "--pretrained", "none", *fsbench_args(s, data, coop_res, work), "--set", f"coop.epochs={s['coop_epochs']}"]
    slots = ["--set", "sweep.workers=1", "--set", "sweep.cpus_per_run=1" if smoke else "sweep.gpus_per_run=1"]
    sweep = ["sweep", *fsbench_args(s, data, ray_res, work, sweep=True), "--methods", "zero_shot,linear_probe",
             "--datasets", "imagefolder", "--shots", "1", "--seeds", "1,2", "--executor", "ray",
             "--set", "study.pretrained=none", *slots]
    deep_res = work / "deep_prompt"
    deep = ["run", "--method", "maple,plot_pp", "--dataset", "imagefolder", "--shots", "1", "--seed", "1",
            "--pretrained", "none", *fsbench_args(s, data, deep_res, work), "--set", "maple.epochs=1",
            "--set", "plot_pp.epochs=1"]
    tt_data, tt_res = work / "data_tt", work / "test_time"
    size = ["--small"] if smoke else []
    tt_gen = script("gpu_checks/datagen.py") + [str(tt_data), "--classes", "10", "--test", "3", *size,
                                                "--out", str(out / "datagen_tt.json")]
    views = ["--set", "tpt.views=3", "--set", "zero.views=3"] if smoke else []  # the default on a GPU: 63 + 1
    tt = ["run", "--protocol", "test_time", "--method", "tda,tpt,zero", "--dataset", "imagefolder", "--shots", "1",
          "--seed", "1", "--pretrained", "none", *fsbench_args(s, tt_data, tt_res, work), *views]
    runner = script("gpu_checks/cli_runs.py")
    return [
        Check("datagen_tt", "a 10-class imagefolder dataset, 3 test images per class, for the test-time methods",
              tt_gen, 90),
        Check("test_time", "TDA, TPT and ZERO under --protocol test_time, one image at a time (ms per test image, "
              "peak memory)", runner + ["--results", str(tt_res), "--expect", "3", "--out",
                                        str(out / "test_time.json"), "--", *tt], 240),
        Check("deep_prompt", "MaPLe and PLOT++ (deep prompts through both towers), fsbench run, 1 epoch "
              "(s/step, peak memory)", runner + ["--results", str(deep_res), "--expect", "2", "--out",
                                                 str(out / "deep_prompt.json"), "--", *deep], 200),
        Check("coop_frozen", "CoOp and linear_probe (a frozen-feature method), fsbench run",
              runner + ["--results", str(coop_res), "--expect", "2", "--out", str(out / "coop_frozen.json"), "--",
                        *coop], 150),
        Check("sweep_ray", "fsbench sweep --executor ray, one worker (one GPU on a GPU machine), 4 runs",
              runner + ["--results", str(ray_res), "--expect", "4", "--out", str(out / "sweep_ray.json"), "--",
                        *sweep], 180, needs="ray"),
    ]


def other_benchmarks(s: dict, smoke: bool, out: Path, work: Path) -> list[Check]:
    """`--device cuda` in the two benchmarks the checks above do not cover (GPU only: on CPU they have
    their own documented runs, and the smoke run stays short)."""
    dev = ["--device", s["device"]]
    levers = ["--backbone", "test-tiny", "--prompts", "10", "--batch", "2", "--repeats", "1"] if smoke else []
    grid = ["--backbone", "test-tiny"] if smoke else []
    return [
        Check("levers", "benchmarks/levers.py --device cuda (every speed lever on its own)",
              script("levers.py") + dev + levers, 150, cuda_only=True),
        Check("frozen_grid", "benchmarks/frozen_grid.py --device cuda, 2 DTD-like classes, 1 shot, 1 seed",
              script("frozen_grid.py") + dev + grid + ["--classes", "2", "--shots", "1", "--seeds", "1"], 150,
              cuda_only=True),
    ]


def plan(smoke: bool, out: Path, work: Path) -> list[Check]:
    """Every check in the order they run (most important first: a run out of time loses the last)."""
    s = SIZES["smoke" if smoke else "gpu"]
    return [*data_and_tests(s, smoke, out, work), *lora_checks(s, smoke, out, work),
            *method_checks(s, smoke, out, work), *other_benchmarks(s, smoke, out, work)]
