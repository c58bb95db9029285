"""CLIP-LoRA training-step throughput: fsbench's loop vs a reference-style step, in one run.

    PYTHONPATH=. python benchmarks/lora_step.py --device cpu
    PYTHONPATH=. python benchmarks/lora_step.py --device cuda --backbone ViT-L/14

Both paths train rank-2 LoRA on q, k, v of both towers of the same seeded random-weight CLIP
(the real architecture; speed does not depend on the weights) with a 1,000-class text side
(ImageNet's class names, "a photo of a {}."), re-encoded through the adapted text tower
every step as the paper does. fsbench: `CLIPLoRA.fit` itself (prompts tokenised once and
bucketed by length, factored LoRA, SDPA, augmentation on the device, bf16 autocast on GPUs
with bf16). Reference: `reference.py`, as the official code (full 77-token prompts re-tokenised
each step, the d x d LoRA product, fp16 autocast on GPU / fp32 on CPU, PIL augmentation per step
from disk). Paths alternate per repeat; the last line is the ratio of median step times.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import (
    StepClock,
    device_arg,
    fsbench_steps,
    imagenet_like,
    machine,
    median,
    peak_tflops,
    speedup_line,
    write_out,
)
from reference import ReferenceTrainer, reference_batches, reference_model

from fsbench.augment import train_transform
from fsbench.backbones import Backbone, BackboneSpec, build_backbone
from fsbench.data.base import DatasetSplits
from fsbench.images import default_workers
from fsbench.method import FewShotData
from fsbench.methods.lora import LoRAConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="ViT-B/16", help="ViT-B/16, ViT-B/32, ViT-L/14 or test-tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, help="images per step (default 32 on GPU, 8 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps per repeat (default 20 on GPU, 1 on CPU)")
    p.add_argument("--warmup", type=int,
                   help="untimed steps per repeat (default 3 on GPU, 0 on CPU); the first counts FLOPs")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--augment", default="device", choices=["device", "pil", "auto"],
                   help="fsbench's augmentation (LoRAConfig.augment; its default 'auto' is 'pil' on CPU)")
    p.add_argument("--text-buckets", type=int, default=4, help="fsbench's prompt length groups")
    p.add_argument("--ref-text-chunk", type=int,
                   help="reference text side in chunks of N classes, same work (default: 0 = whole on GPU, "
                        "100 on CPU, where the 1,000-class fp32 graph needs about 60 GB)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--out", help="also write the numbers as JSON to this file")
    args = p.parse_args()
    gpu = device_arg(args.device).type == "cuda"
    args.batch = args.batch or (32 if gpu else 8)
    args.steps = args.steps or (20 if gpu else 1)
    args.warmup = (3 if gpu else 0) if args.warmup is None else args.warmup
    args.ref_text_chunk = (0 if gpu else 100) if args.ref_text_chunk is None else args.ref_text_chunk
    return args


def reference_steps(backbone: Backbone, data: DatasetSplits, train: FewShotData, model: torch.nn.Module,
                    batch: int, steps: int, text_chunk: int, workers: int, clock: StepClock) -> None:
    """Run `steps` official-style steps on shuffled batches of `train`, timed by `clock`."""
    tf = train_transform(backbone.image_size, backbone.mean, backbone.std, [0.08, 1.0])
    prompts = [data.train_template.format(c) for c in data.classnames]
    trainer = ReferenceTrainer(model, LoRAConfig(), prompts, backbone.tokenizer, steps, text_chunk)
    device = next(model.parameters()).device
    batches = reference_batches(train.items, train.image_root, tf, batch, device, workers,
                                torch.Generator().manual_seed(0))
    for _ in clock(range(steps), steps, "reference"):
        trainer.step(*next(batches))


def official_workers(device: torch.device) -> int:
    """The official loader's 8 processes on GPU hosts (at most one per core); 0 on CPU, where
    loader processes would only take cores from the step they feed."""
    return min(8, default_workers()) if device.type == "cuda" else 0


def report(name: str, times: list[float], flops: int | None, model_flops: int | None, batch: int,
           peak: float | None) -> str:
    step = median(times)
    cols = [f"{name:<10} s/step per repeat", " ".join(f"{t:8.3f}" for t in times), f"median {step:8.3f} s",
            f"{batch / step:8.2f} img/s"]
    if flops:
        cols.append(f"{flops / 1e12:7.2f} TFLOP/step executed, {flops / step / 1e12:7.1f} TFLOP/s")
    if model_flops and peak:
        cols.append(f"MFU {100 * model_flops / step / 1e12 / peak:5.1f}%")
    return "  ".join(cols)


def both_models(name: str, device: torch.device) -> tuple[Backbone, torch.nn.Module]:
    """fsbench's backbone and the reference-style LoRA model of `name`, random weights."""
    spec = BackboneSpec(name, pretrained="none")
    return build_backbone(spec, device), reference_model(spec, LoRAConfig(), device)


def main() -> None:
    args = parse_args()
    device = device_arg(args.device)
    backbone, ref = both_models(args.backbone, device)
    count = args.warmup > 0  # FLOPs of the first warm-up step (FlopCounterMode)
    fast_t, ref_t, flops = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data, train = imagenet_like(Path(tmp), max(64, 2 * args.batch), args.classes)
        for r in range(args.repeats):
            fast = StepClock(device, args.warmup, count_flops=count and r == 0)
            fsbench_steps(backbone, data, train, args.warmup + args.steps, device, fast,
                          batch_size=args.batch, augment=args.augment, text_buckets=args.text_buckets)
            slow = StepClock(device, args.warmup, count_flops=count and r == 0)
            reference_steps(backbone, data, train, ref, args.batch, args.warmup + args.steps, args.ref_text_chunk,
                            official_workers(device), slow)
            fast_t.append(fast.step_seconds)
            ref_t.append(slow.step_seconds)
            flops.setdefault("fsbench", fast.flops)
            flops.setdefault("reference", slow.flops)
            print(f"repeat {r + 1}: fsbench {fast_t[-1]:.3f} s/step, reference {ref_t[-1]:.3f} s/step", flush=True)
    peak = peak_tflops(device, args.peak_tflops)
    print(f"machine: {machine(device)}; {time.strftime('%Y-%m-%d')}")
    print(f"config: {args.backbone}, {args.classes} classes, batch {args.batch}, {args.steps} timed + "
          f"{args.warmup} warm-up steps x {args.repeats} repeats, fsbench augment={args.augment} "
          f"text_buckets={args.text_buckets}, reference text chunk={args.ref_text_chunk or 'none'}")
    print(report("fsbench", fast_t, flops["fsbench"], flops["fsbench"], args.batch, peak))
    print(report("reference", ref_t, flops["reference"], flops["fsbench"], args.batch, peak))
    print(speedup_line(median(ref_t) / median(fast_t)))
    write_out(args.out, numbers(args, fast_t, ref_t, flops, peak, device))


def mfu(model_flops: int | None, step: float, peak: float | None) -> float | None:
    """Model FLOP utilisation in percent: fsbench's FLOPs per step (the useful work) / step / peak."""
    return 100 * model_flops / step / 1e12 / peak if model_flops and peak else None


def numbers(args: argparse.Namespace, fast_t: list[float], ref_t: list[float], flops: dict, peak: float | None,
            device: torch.device) -> dict:
    """What `--out` writes."""
    fast, ref = median(fast_t), median(ref_t)
    return {"machine": machine(device), "backbone": args.backbone, "classes": args.classes, "batch": args.batch,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "augment": args.augment,
            "fsbench_s_per_step": fast, "reference_s_per_step": ref, "fsbench_times": fast_t,
            "reference_times": ref_t, "fsbench_flops": flops["fsbench"], "reference_flops": flops["reference"],
            "peak_tflops": peak, "fsbench_mfu_percent": mfu(flops["fsbench"], fast, peak),
            "reference_mfu_percent": mfu(flops["fsbench"], ref, peak), "speedup": ref / fast}


if __name__ == "__main__":
    main()
