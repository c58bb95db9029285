"""Projected end-to-end time of the paper's 16-shot ImageNet CLIP-LoRA job (ViT-B/16), both paths.

    PYTHONPATH=. python benchmarks/projection.py --device cuda
    PYTHONPATH=. python benchmarks/projection.py --device cpu

The job (Zanella & Ben Ayed 2024, Table 1: 50 min on one A100): 500 x 16 = 8,000 steps of
batch 32, each re-encoding the 1,000 class prompts through the adapted text tower, then the
50,000 test images. Measured here, on this machine: the step time of both paths (1,000
classes, batch 32, the real ViT-B/16 architecture with random weights), the eval throughput of
both models (LoRA merged), the decode + preprocess rate of ImageNet-sized JPEGs per core, and
fsbench's one-off decoding of the 16,000 training images. fsbench runs its default LoRA
config (`augment="auto"`: on the device on CUDA, PIL on CPU). Projected = 8,000 x step +
decoding + test encoding; the last line is reference / fsbench.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import StepClock, device_arg, fsbench_steps, imagenet_like, machine, speedup_line, timed, write_out
from lora_step import both_models, official_workers, reference_steps

from fsbench.augment import to_uint8_tensor
from fsbench.images import default_workers, load_image

STEPS, TEST_IMAGES, TRAIN_IMAGES, OFFICIAL_WORKERS = 8_000, 50_000, 16_000, 8


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--backbone", default="ViT-B/16", help="the paper's job uses ViT-B/16 (test-tiny: smoke test)")
    p.add_argument("--batch", type=int, default=32, help="training batch (the paper's 32)")
    p.add_argument("--steps", type=int, help="timed steps per path (default 20 on GPU, 1 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per path (default 3 on GPU, 0 on CPU)")
    p.add_argument("--eval-batch", type=int, help="eval batch (default 256 on GPU, 16 on CPU)")
    p.add_argument("--eval-images", type=int, help="images timed for eval (default 2048 on GPU, 16 on CPU)")
    p.add_argument("--ref-text-chunk", type=int, help="as lora_step.py (default 0 on GPU, 100 on CPU)")
    p.add_argument("--out", help="also write the numbers as JSON to this file")
    args = p.parse_args()
    gpu = device_arg(args.device).type == "cuda"
    args.steps = args.steps or (20 if gpu else 1)
    args.warmup = (3 if gpu else 0) if args.warmup is None else args.warmup
    args.eval_batch = args.eval_batch or (256 if gpu else 16)
    args.eval_images = args.eval_images or (2048 if gpu else 16)
    args.ref_text_chunk = (0 if gpu else 100) if args.ref_text_chunk is None else args.ref_text_chunk
    return args


@torch.no_grad()
def eval_rate(logits: Callable[[torch.Tensor], torch.Tensor], size: int, args: argparse.Namespace,
              device: torch.device, dtype: torch.dtype | None) -> float:
    """Test images per second through `logits` (one warm-up batch, then `eval_images`)."""
    x = torch.randn(args.eval_batch, 3, size, size, device=device)

    def run(batches: int) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for _ in range(batches):
                logits(x)

    run(1)
    batches = max(1, args.eval_images // args.eval_batch)
    return batches * args.eval_batch / timed(lambda: run(batches), device)


def preprocess_rate(items: list, root: Path, preprocess: Callable) -> float:
    """Test-time decode + resize + crop + normalise, images per second on one core."""
    start = time.perf_counter()
    for it in items:
        preprocess(load_image(root / it.path))
    return len(items) / (time.perf_counter() - start)


def line(name: str, step: float, decode: float, test: float) -> str:
    total = STEPS * step + decode + test
    return (f"{name:<10} {STEPS} x {step:8.3f} s = {STEPS * step / 60:8.1f} min train + {decode / 60:6.1f} min "
            f"decode + {test / 60:6.1f} min test = {total / 60:8.1f} min")


def main() -> None:
    args = parse_args()
    device = device_arg(args.device)
    backbone, ref = both_models(args.backbone, device)
    with tempfile.TemporaryDirectory() as tmp:
        data, train = imagenet_like(Path(tmp), max(64, 2 * args.batch))
        fast, slow = StepClock(device, args.warmup), StepClock(device, args.warmup)
        method = fsbench_steps(backbone, data, train, args.warmup + args.steps, device, fast, batch_size=args.batch)
        reference_steps(backbone, data, train, ref, args.batch, args.warmup + args.steps, args.ref_text_chunk,
                        official_workers(device), slow)
        fast_step, ref_step = fast.step_seconds, slow.step_seconds
        decode_s = timed(lambda: to_uint8_tensor(train.items, train.image_root, device), device) / len(train.items)
        prep = preprocess_rate(train.items[:32], train.image_root, backbone.preprocess)
    fast_eval = eval_rate(method.logits, backbone.image_size, args, device, method.ctx.amp_dtype)
    ref.eval()  # official: eval mode merges the LoRA update into the weights
    text = torch.randn(1000, backbone.embed_dim, device=device)
    ref_dtype = torch.float16 if device.type == "cuda" else None
    ref_eval = eval_rate(lambda x: 100 * ref.encode_image(x) @ text.T, backbone.image_size, args, device, ref_dtype)
    workers = default_workers() or 1
    fast_test = TEST_IMAGES / min(fast_eval, prep * workers)
    ref_test = TEST_IMAGES / min(ref_eval, prep * OFFICIAL_WORKERS)
    print(f"machine: {machine(device)}; {time.strftime('%Y-%m-%d')}")
    print(f"measured: step fsbench {fast_step:.3f} s, reference {ref_step:.3f} s (batch {args.batch}, 1000 classes); "
          f"eval fsbench {fast_eval:.1f} img/s, reference {ref_eval:.1f} img/s; preprocess {prep:.1f} img/s/core "
          f"(fsbench {workers} loader processes, official {OFFICIAL_WORKERS}); decode {1 / decode_s:.1f} img/s")
    print(line("fsbench", fast_step, TRAIN_IMAGES * decode_s, fast_test))
    print(line("reference", ref_step, 0.0, ref_test))
    budget = (300 - TRAIN_IMAGES * decode_s - fast_test) / STEPS
    if budget > 0:
        print(f"under 5 min needs fsbench steps of at most {budget * 1000:.1f} ms here "
              f"(measured {fast_step * 1000:.1f} ms)")
    else:
        print("under 5 min is out of reach here: decoding and test encoding alone take "
              f"{(TRAIN_IMAGES * decode_s + fast_test) / 60:.1f} min")
    fast_total = STEPS * fast_step + TRAIN_IMAGES * decode_s + fast_test
    print(f"16-shot ImageNet {args.backbone} CLIP-LoRA projected: {fast_total / 60:.1f} min")
    print(speedup_line((STEPS * ref_step + ref_test) / fast_total))
    write_out(args.out, {"machine": machine(device), "backbone": args.backbone, "batch": args.batch,
                         "fsbench_s_per_step": fast_step, "reference_s_per_step": ref_step,
                         "fsbench_eval_img_per_s": fast_eval, "reference_eval_img_per_s": ref_eval,
                         "preprocess_img_per_s_per_core": prep, "decode_img_per_s": 1 / decode_s,
                         "fsbench_minutes": fast_total / 60, "reference_minutes": (STEPS * ref_step + ref_test) / 60,
                         "speedup": (STEPS * ref_step + ref_test) / fast_total})


if __name__ == "__main__":
    main()
