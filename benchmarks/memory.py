"""Peak memory of one CLIP-LoRA training step per backbone: fsbench vs the reference-style step.

    PYTHONPATH=. python benchmarks/memory.py --device cpu
    PYTHONPATH=. python benchmarks/memory.py --device cuda --classes 1000 --batch 32

Each (backbone, path) runs in a fresh process: build the model with LoRA, then one step
(forward, backward, AdamW update) on a random batch. GPU: `torch.cuda.max_memory_allocated`
over the step (weights included). CPU: the peak resident set size during the step minus the
resident set size before it, sampled every 5 ms (tracemalloc cannot see tensor memory), i.e.
activations, gradients and optimiser state; the allocator may keep some freed memory, so CPU
numbers are approximate. The last line is the reference / fsbench peak of the first backbone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from common import device_arg, imagenet_classes, machine, speedup_line, write_out
from reference import reference_lora_layers, reference_loss, reference_model

from fsbench.backbones import BackboneSpec, build_backbone
from fsbench.data.base import DatasetSplits
from fsbench.device import amp_dtype
from fsbench.method import Context
from fsbench.methods.lora import CLIPLoRA, LoRAConfig


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def peak_during(step: Callable[[], object], device: torch.device) -> int:
    """Bytes: CUDA peak allocated during `step`, or the CPU resident-set growth during it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    step()
    done.set()
    thread.join()
    return max(peak[0], rss()) - base


def random_batch(size: int, batch: int, classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return images, (torch.arange(batch) % classes).to(device)


def fsbench_step(spec: BackboneSpec, classes: list[str], batch: int, device: torch.device) -> Callable[[], object]:
    backbone = build_backbone(spec, device)
    data = DatasetSplits("memory", Path("."), classes, ["a photo of a {}."], [], [], [])
    method = CLIPLoRA(LoRAConfig(), Context(backbone, data, device, 0, 1, amp_dtype(device)))
    method.prepare()
    method.model.train()
    opt = torch.optim.AdamW([p for layer in method.layers for p in (layer.lora_A, layer.lora_B)])
    images, labels = random_batch(backbone.image_size, batch, len(classes), device)
    return lambda: (method.train_loss(images, labels).backward(), opt.step())


def reference_step(spec: BackboneSpec, classes: list[str], batch: int, device: torch.device) -> Callable[[], object]:
    model = reference_model(spec, LoRAConfig(), device)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")  # OpenAI's CLIP tokenizer, shared by every ViT here
    tokens = tokenizer([f"a photo of a {c}." for c in classes]).to(device)
    opt = torch.optim.AdamW([p for layer in reference_lora_layers(model) for p in (layer.w_lora_A, layer.w_lora_B)])
    images, labels = random_batch(model.visual.image_size[0], batch, len(classes), device)
    return lambda: (reference_loss(model, images, tokens, labels), opt.step())


def measure(path: str, backbone: str, classes: int, batch: int, device: str) -> int:
    """In a fresh process: peak bytes of one step of `path` ("fsbench" or "reference")."""
    build = fsbench_step if path == "fsbench" else reference_step
    step = build(BackboneSpec(backbone, pretrained="none"), imagenet_classes(classes), batch, torch.device(device))
    return peak_during(step, torch.device(device))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=["ViT-B/16", "ViT-B/32", "ViT-L/14"])
    p.add_argument("--device", default="auto")
    p.add_argument("--classes", type=int, help="text-side classes (default 1000 on GPU, 50 on CPU)")
    p.add_argument("--batch", type=int, help="images per step (default 32 on GPU, 4 on CPU)")
    p.add_argument("--out", help="also write the numbers as JSON to this file")
    args = p.parse_args()
    device = device_arg(args.device)
    gpu = device.type == "cuda"
    classes, batch = args.classes or (1000 if gpu else 50), args.batch or (32 if gpu else 4)
    what = "CUDA max_memory_allocated (weights included)" if gpu else "CPU peak RSS growth during the step"
    print(f"machine: {machine(device)}; {time.strftime('%Y-%m-%d')}")
    print(f"config: {classes} classes, batch {batch}; measure: {what}")
    ratios, table = [], {}
    ctx = mp.get_context("spawn")
    for backbone in args.backbones:
        peaks = {path: measure_in_fresh_process(ctx, path, backbone, classes, batch, str(device))
                 for path in ("fsbench", "reference")}
        ratios.append(peaks["reference"] / peaks["fsbench"])
        table[backbone] = {f"{k}_gib": v / 2**30 for k, v in peaks.items()}
        print(f"{backbone:<10} fsbench {peaks['fsbench'] / 2**30:7.2f} GiB   reference "
              f"{peaks['reference'] / 2**30:7.2f} GiB   reference/fsbench {ratios[-1]:5.2f}x", flush=True)
    print(speedup_line(ratios[0]))
    write_out(args.out, {"machine": machine(device), "classes": classes, "batch": batch, "measure": what,
                         "peaks": table, "ratio": ratios[0]})


def measure_in_fresh_process(ctx, path: str, backbone: str, classes: int, batch: int, device: str) -> float:
    """`measure` in a new process; NaN (printed) when the step runs out of device memory."""
    with ctx.Pool(1) as pool:
        try:
            return float(pool.apply(measure, (path, backbone, classes, batch, device)))
        except RuntimeError as exc:  # torch.OutOfMemoryError: e.g. the reference's 1,000-class text graph
            if "out of memory" not in str(exc).lower():
                raise
            print(f"{backbone} {path}: out of memory ({str(exc).splitlines()[0][:120]})", flush=True)
            return float("nan")


if __name__ == "__main__":
    main()
