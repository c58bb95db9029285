"""`fsbench run --method lora` end to end, twice with one seed: step time and both loss curves.

    PYTHONPATH=.:benchmarks python benchmarks/gpu_checks/lora_e2e.py --data-root D --work W \\
        --backbone ViT-B/16 --steps 300 --device cuda --out lora_e2e.json

Each run is the real command (`fsbench.cli.main(["run", "--method", "lora", ...])`, here in this
process) on a generated `imagefolder` dataset (datagen.py; 1,000 ImageNet class names: the
paper's text side), 1 shot, `lora.iters_per_shot=STEPS`, `lora.augment=device`, random weights
(`--pretrained none`), into its own results folder. To observe the run without changing fsbench,
this script wraps two methods of `methods.lora.CLIPLoRA` for its own process only:
`train_loss` keeps each step's loss as a detached device tensor (read once, after training, so
recording adds no host-device synchronisation) and starts the clock at step `--warmup`
(synchronised); `finish`, called once after the last step, stops it (synchronised). s/step is
therefore the mean over the steps after warm-up of everything a step does in `CLIPLoRA.fit`:
on-device augmentation, the 1,000-prompt text pass, vision pass, backward, AdamW, schedule.
The two runs' curves are compared step by step: identical, or the largest difference, which
must stay within `--tolerance` (0 = bit-identical, the CPU bar; on CUDA some kernels, e.g. the
backward of fused attention, accumulate with atomics and need not be bit-reproducible).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from cli_runs import ok, read_results, run_fsbench
from jsonout import write_out

from fsbench.methods.lora import CLIPLoRA


class LossRecorder:
    """Wraps `CLIPLoRA.train_loss` and `CLIPLoRA.finish` (this process only) to record a run."""

    def __init__(self, warmup: int):
        self.warmup, self.losses, self.start, self.end, self.device = warmup, [], None, None, None
        self._saved = (CLIPLoRA.train_loss, CLIPLoRA.finish)

    def __enter__(self) -> LossRecorder:
        train_loss, finish = self._saved
        recorder = self

        def recording_loss(method: CLIPLoRA, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if len(recorder.losses) == recorder.warmup:
                recorder.device = method.ctx.device
                recorder.start = recorder._now()
            loss = train_loss(method, images, labels)
            recorder.losses.append(loss.detach())
            return loss

        def timed_finish(method: CLIPLoRA) -> None:
            if recorder.end is None and recorder.start is not None:
                recorder.end = recorder._now()
            finish(method)

        CLIPLoRA.train_loss, CLIPLoRA.finish = recording_loss, timed_finish
        return self

    def __exit__(self, *exc: object) -> None:
        CLIPLoRA.train_loss, CLIPLoRA.finish = self._saved

    def _now(self) -> float:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def curve(self) -> list[float]:
        return torch.stack(self.losses).float().cpu().tolist() if self.losses else []

    def step_seconds(self) -> float | None:
        timed = len(self.losses) - self.warmup
        return (self.end - self.start) / timed if self.start is not None and self.end and timed > 0 else None


def command(args: argparse.Namespace, results: Path) -> list[str]:
    """The `fsbench run` arguments of one run (an empty study file: nothing from ./bench.toml)."""
    empty = args.work / "empty.toml"
    empty.write_text("")
    return ["run", "--method", "lora", "--backbone", args.backbone, "--pretrained", "none",
            "--dataset", "imagefolder", "--data-root", str(args.data_root), "--shots", "1", "--seed", "1",
            "--config", str(empty), "--results", str(results), "--device", args.device,
            "--set", f"runtime.cache_dir={args.work / 'cache'}", "--set", "lora.augment=device",
            "--set", f"lora.iters_per_shot={args.steps}", "--set", f"lora.batch_size={args.batch}"]


def one_run(args: argparse.Namespace, index: int) -> dict:
    """One `fsbench run`; its exit code, loss curve, s/step and result fields."""
    results = args.work / f"results{index}"
    with LossRecorder(args.warmup) as rec:
        code = run_fsbench(command(args, results))
    found = read_results(results)
    result = found[0] if found else {}
    return {"exit_code": code, "ok": bool(found) and ok(result), "s_per_step": rec.step_seconds(),
            "steps_recorded": len(rec.losses), "result": result, "losses": rec.curve()}


def compare(a: list[float], b: list[float]) -> dict:
    """Step-by-step comparison of two loss curves."""
    if not a or len(a) != len(b):
        return {"identical": False, "max_abs_diff": None, "first_different_step": None}
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    first = next((i for i, d in enumerate(diffs) if d != 0), None)
    return {"identical": first is None, "max_abs_diff": max(diffs), "first_different_step": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, required=True, help="an imagefolder dataset (datagen.py)")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (results, caches)")
    p.add_argument("--backbone", default="ViT-B/16")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20, help="steps before the clock starts")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tolerance", type=float, default=0.0, help="largest allowed loss difference between runs")
    p.add_argument("--out", help="write the numbers as JSON")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [one_run(args, i) for i in (1, 2)]
    same = compare(runs[0]["losses"], runs[1]["losses"])
    passed = all(r["ok"] and r["steps_recorded"] == args.steps for r in runs) and same["max_abs_diff"] is not None \
        and same["max_abs_diff"] <= args.tolerance
    for i, r in enumerate(runs, 1):
        curve = r["losses"]
        print(f"run {i}: exit {r['exit_code']}, {r['steps_recorded']} steps, s/step {r['s_per_step']}, "
              f"loss {curve[0] if curve else None} -> {curve[-1] if curve else None}, top1 {r['result'].get('top1')}")
    print(f"loss curves: identical {same['identical']}, max |difference| {same['max_abs_diff']} "
          f"(tolerance {args.tolerance}): {'pass' if passed else 'FAIL'}")
    write_out(args.out, {"backbone": args.backbone, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                         "device": args.device, "s_per_step": [r["s_per_step"] for r in runs], **same,
                         "tolerance": args.tolerance, "runs": runs, "pass": passed})


if __name__ == "__main__":
    main()
