"""Shared pieces of the benchmarks: devices, clocks, ImageNet-like data, the fsbench LoRA loop."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from gpu_checks.jsonout import write_out  # noqa: F401 (re-exported for the benchmarks' --out)
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from fsbench.backbones import Backbone
from fsbench.data.base import DatasetSplits, Item
from fsbench.device import amp_dtype
from fsbench.method import Context, FewShotData
from fsbench.methods.lora import CLIPLoRA, LoRAConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for model FLOP utilisation; others: --peak-tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_arg(name: str) -> torch.device:
    """"auto" = CUDA when present; asking for CUDA without it is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here; use --device cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of `fn()`, CUDA work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine(device: torch.device) -> str:
    """CPU model and cores (and the GPU, if used), for the benchmark's header."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}"
    if device.type == "cuda":
        text += f"; {torch.cuda.get_device_name(device)}"
    return text


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def write_images(folder: Path, count: int, classes: int, seed: int = 0) -> list[Item]:
    """`count` smooth random JPEGs of ImageNet-like sizes (300-500 px a side), labels cycling."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(300, 501, size=2))
        small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        img.save(folder / f"{i:05d}.jpg", quality=90)
        items.append(Item(f"{i:05d}.jpg", i % classes))
    return items


def imagenet_classes(count: int = 1000) -> list[str]:
    """CLIP's ImageNet class names (the paper's 1,000-class text side), or an even subset."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES)
    return names if count >= len(names) else names[:: len(names) // count][:count]


def imagenet_like(folder: Path, images: int, classes: int = 1000) -> tuple[DatasetSplits, FewShotData]:
    """A dataset with ImageNet's class names and template, and a train set of synthetic JPEGs."""
    items = write_images(folder, images, classes)
    data = DatasetSplits("imagenet-like", folder, imagenet_classes(classes), ["a photo of a {}."],
                         items, [], [])
    labels = torch.tensor([it.label for it in items])
    return data, FewShotData(items, labels, folder)


class StepClock:
    """A `Context.track` hook timing a training loop after `warmup` steps.

    The device is synchronised only where the timed region starts and ends, so that queued GPU
    work overlaps the Python of the next step as it does in a real run. The first step's FLOPs
    are counted when asked (`FlopCounterMode`; that step should be a warm-up step).
    """

    def __init__(self, device: torch.device, warmup: int = 0, count_flops: bool = False):
        self.device, self.warmup, self.count_flops = device, warmup, count_flops
        self.step_seconds = float("nan")  # mean over the timed steps
        self.flops: int | None = None

    def __call__(self, it: Iterable, total: int, desc: str) -> Iterator:
        start, steps = None, 0
        for i, x in enumerate(it):
            if i == self.warmup:
                sync(self.device)
                start = time.perf_counter()
            if i == 0 and self.count_flops:
                with FlopCounterMode(display=False) as counter:
                    yield x
                self.flops = counter.get_total_flops()
            else:
                yield x
            steps = i + 1 - self.warmup
        if start is not None:
            sync(self.device)
            self.step_seconds = (time.perf_counter() - start) / steps


def fsbench_steps(backbone: Backbone, data: DatasetSplits, train: FewShotData, steps: int,
                  device: torch.device, clock: StepClock, **config: object) -> CLIPLoRA:
    """Run fsbench's own `CLIPLoRA.fit` for `steps` steps (timed by `clock`); returns the method."""
    cfg = LoRAConfig(iters_per_shot=steps, **config)
    ctx = Context(backbone, data, device, seed=1, shots=1, amp_dtype=amp_dtype(device), track=clock)
    method = CLIPLoRA(cfg, ctx)
    method.fit(train, train)
    return method


def speedup_line(ratio: float) -> str:
    return f"speedup: {ratio:.2f}x"
