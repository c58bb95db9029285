"""On-device crops (`fsbench.augment`) against torchvision's PIL RandomResizedCrop, same boxes.

    PYTHONPATH=.:benchmarks python benchmarks/gpu_checks/crops.py --device cuda --out crops.json

CLIP-LoRA trains on torchvision's PIL pipeline (official code: github.com/MaxZanella/CLIP-LoRA,
main.py:38-43, `train_tranform`: RandomResizedCrop(224, scale=(0.08, 1), bicubic) + flip). fsbench's
`augment="device"` draws the same boxes and flips (tests/test_speed_paths.py) and resizes with
torchvision's tensor `resized_crop`, bicubic, antialiased. This script measures what remains
between the two, in normalised units (what the model sees) and in 8-bit levels, on 224 px crops of
300-500 px images of two kinds: "smooth" (blocky noise upsampled bilinearly, like photographs'
gradients) and "edges" (the same blocks upsampled by nearest neighbour: hard, often saturated
edges, the worst case for bicubic overshoot). Three comparisons per device:

- `pipeline`: `fsbench.augment.augment` against `Compose([RandomResizedCrop, RandomHorizontalFlip,
  ToTensor, Normalize])` with the RNG seeded alike (boxes, flips, normalisation: the whole path);
- `antialias`: the crop + resize alone, antialiased (fsbench's setting);
- `no_antialias`: the same without antialiasing (the tensor default before torchvision 0.17),
  to show what the setting buys.
On CUDA the uint8 image is resized in float32 and rounded (torchvision has no uint8 CUDA kernel);
on CPU torchvision uses its uint8 kernel, which follows PIL's fixed-point arithmetic.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from jsonout import write_out
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fsbench.augment import RATIO, augment, crop_params

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's
# Pass bars, in 8-bit levels, from CPU measurements (BENCHMARKS.md): rounding on smooth content;
# on hard saturated edges, 99.9% of pixels within rounding and a few bicubic-overshoot outliers.
TOLERANCE = {"smooth_max": 2.0, "edges_p999": 2.0, "edges_max": 16.0}


def sample_images(kind: str, count: int, seed: int) -> list[Image.Image]:
    """`count` RGB images of 300-500 px a side: "smooth" (bilinear) or "edges" (nearest) blocks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(300, 501, size=2))
        small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.BILINEAR if kind == "smooth" else Image.NEAREST))
    return out


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> CLIP-normalised float32."""
    return (x.float() / 255 - torch.tensor(MEAN, device=x.device).view(3, 1, 1)) / \
        torch.tensor(STD, device=x.device).view(3, 1, 1)


def stats(diffs: list[torch.Tensor]) -> dict[str, float]:
    """Max / mean / 99.9th percentile of |difference|, normalised units and 8-bit levels."""
    d = torch.cat([x.flatten() for x in diffs]).double()
    std = torch.tensor(STD).view(1, 3, 1, 1)
    levels = torch.cat([(x.cpu().reshape(-1, 3, *x.shape[-2:]) * std * 255).flatten() for x in diffs]).double()
    q = max(0, int(0.999 * len(levels)) - 1)
    return {"max": d.max().item(), "mean": d.mean().item(), "max_levels": levels.max().item(),
            "mean_levels": levels.mean().item(), "p999_levels": levels.sort().values[q].item()}


def crop_diffs(images: list[Image.Image], device: torch.device, antialias: bool, size: int,
               seed: int) -> list[torch.Tensor]:
    """|PIL - tensor| per image for the crop + bicubic resize alone, on torchvision's boxes."""
    g, out = torch.Generator().manual_seed(seed), []
    for img in images:
        t = to_tensor(img).to(device)
        top, left, h, w = crop_params(t.shape[-2], t.shape[-1], (0.08, 1.0), RATIO, g)
        pil = to_tensor(TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC))
        got = TF.resized_crop(t, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                              antialias=antialias)
        out.append((normalise(got).cpu() - normalise(pil)).abs())
    return out


def pipeline_diffs(images: list[Image.Image], device: torch.device, size: int, seed: int) -> list[torch.Tensor]:
    """|torchvision's PIL pipeline - fsbench.augment.augment|, the RNG seeded alike (boxes and flips)."""
    pil = transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    torch.manual_seed(seed)
    expected = torch.stack([pil(img) for img in images])
    got = augment([to_tensor(img).to(device) for img in images], size, MEAN, STD,
                  torch.Generator().manual_seed(seed))
    return [(got.cpu() - expected).abs()]


def measure(device: torch.device, count: int, size: int) -> dict[str, dict[str, dict[str, float]]]:
    """{comparison: {kind: stats}} on `device`."""
    out: dict[str, dict[str, dict[str, float]]] = {"pipeline": {}, "antialias": {}, "no_antialias": {}}
    for seed, kind in enumerate(("smooth", "edges")):
        images = sample_images(kind, count, seed)
        out["pipeline"][kind] = stats(pipeline_diffs(images, device, size, seed))
        out["antialias"][kind] = stats(crop_diffs(images, device, True, size, seed))
        out["no_antialias"][kind] = stats(crop_diffs(images, device, False, size, seed))
    return out


def passes(m: dict[str, dict[str, dict[str, float]]]) -> bool:
    """fsbench's setting within TOLERANCE (pipeline and crop comparisons; levels are whole numbers
    up to float error, hence the 0.01 slack)."""
    return all(m[c]["smooth"]["max_levels"] <= TOLERANCE["smooth_max"] + 0.01
               and m[c]["edges"]["p999_levels"] <= TOLERANCE["edges_p999"] + 0.01
               and m[c]["edges"]["max_levels"] <= TOLERANCE["edges_max"] + 0.01 for c in ("pipeline", "antialias"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto: CPU, and CUDA when present")
    p.add_argument("--images", type=int, default=32, help="images of each kind")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", help="write the numbers as JSON")
    args = p.parse_args()
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else \
        ["cpu"] if args.device == "auto" else [args.device]
    start, numbers = time.perf_counter(), {"images_per_kind": args.images, "size": args.size, "tolerance": TOLERANCE}
    for name in devices:
        numbers[name] = measure(torch.device(name), args.images, args.size)
        for comparison, kinds in numbers[name].items():
            for kind, s in kinds.items():
                print(f"device crops vs PIL ({name}, {comparison}, {kind}): max {s['max']:.4f} mean {s['mean']:.5f} "
                      f"normalised; max {s['max_levels']:.1f} mean {s['mean_levels']:.3f} p99.9 "
                      f"{s['p999_levels']:.1f} levels", flush=True)
    numbers["devices"] = devices
    numbers["pass"] = all(passes(numbers[name]) for name in devices)
    numbers["seconds"] = time.perf_counter() - start
    print(f"within tolerance {TOLERANCE}: {numbers['pass']}")
    write_out(args.out, numbers)


if __name__ == "__main__":
    main()
