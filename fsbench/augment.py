"""The shared training augmentation: `train_transform` (torchvision, PIL, one image at a time) and
the same crops batched on the training device.

The reference path (`fsbench.training.image_batches` with torchvision's PIL transforms)
crops, resizes and converts one PIL image at a time on the CPU. Here the few-shot images are
decoded once into uint8 tensors on the device (at their native size, as the PIL path keeps
them: padding every image to the largest one would waste memory on ImageNet's varied sizes,
and resizing them beforehand would change the crops). Each batch then:

1. draws every sample's RandomResizedCrop box and flip from a `torch.Generator` with exactly
   torchvision's algorithm and order of draws (scale 0.08-1, ratio 3/4-4/3, 10 tries, then the
   centre-crop fallback; `crop_params`), so a generator seeded like torch's global RNG gives
   torchvision's boxes (tested);
2. resizes each crop with torchvision's tensor `resized_crop` (bicubic, antialiased: the tensor
   counterpart of PIL's bicubic resize, same kernel support and a = -0.5);
3. flips, scales to [0, 1] and normalises the whole batch at once.

What remains against the official PIL pipeline (CLIP-LoRA main.py:38-43), measured on 224 px
crops of 300-500 px images by benchmarks/gpu_checks/crops.py and bounded in tests/test_augment.py:
on smooth content at most 2 of 255 levels (0.03 in CLIP-normalised units, mean 0.01 levels); on
hard saturated edges 99.9% of pixels within 1 level and single pixels up to 14 levels (0.21). Those
outliers sit where the result saturates (PIL 245 where torch gives 255, or 12 against 2), i.e.
where bicubic overshoot is clipped; which step of the two libraries' fixed-point arithmetic
differs there was not isolated. Without antialiasing (torch's tensor default before torchvision
0.17) downscaled crops alias: mean differences 30 to 600 times larger, up to 96 levels (1.40).
On CUDA, torchvision resizes uint8 in float32 and rounds (no uint8 CUDA kernel), so results
differ from the CPU path by rounding; gpu_check.sh measures that path on the GPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fsbench.data.base import Item
from fsbench.images import BadImageError, bad_images_error, load_image

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision's RandomResizedCrop default


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                    scale: Sequence[float]) -> transforms.Compose:
    """The shared training augmentation on PIL images (CLIP-LoRA main.py:38-43, CoOp's Dassl
    "random_resized_crop", "random_flip", "normalize"): RandomResizedCrop (bicubic, `scale`) + flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` drawing from `generator`: (top, left, h, w)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _decode(path: Path) -> torch.Tensor | None:
    try:
        return torch.from_numpy(np.array(load_image(path), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    except BadImageError:
        return None


def to_uint8_tensor(items: Sequence[Item], root: Path, device: torch.device,
                    threads: int | None = None) -> list[torch.Tensor]:
    """Decode every image once into a (3, H, W) uint8 tensor on `device`.

    Decoding runs on `threads` threads (default: one per core, at most 16; PIL releases the GIL
    while decoding): 16,000 ImageNet JPEGs take minutes on one core. Unreadable files are all
    named in one `DataError`.
    """
    threads = threads or min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        images = list(pool.map(_decode, [Path(root) / it.path for it in items]))
    bad = [it.path for it, img in zip(items, images, strict=True) if img is None]
    if bad:
        raise bad_images_error(bad, Path(root))
    return [img.to(device) for img in images]


def augment(images: Sequence[torch.Tensor], size: int, mean: Sequence[float], std: Sequence[float],
            generator: torch.Generator, scale: Sequence[float] = (0.08, 1.0),
            ratio: Sequence[float] = RATIO) -> torch.Tensor:
    """RandomResizedCrop(size, bicubic) + horizontal flip + normalise for uint8 (3, H, W) images.

    Per sample, the draws come in torchvision's order (crop box, then flip), so the result
    matches `Compose([RandomResizedCrop, RandomHorizontalFlip, ToTensor, Normalize])` run on
    the same images with the same RNG state, up to interpolation rounding.
    """
    crops, flips = [], []
    for img in images:
        top, left, h, w = crop_params(img.shape[-2], img.shape[-1], scale, ratio, generator)
        flips.append(bool(torch.rand(1, generator=generator).item() < 0.5))
        crops.append(TF.resized_crop(img, top, left, h, w, [size, size],
                                     interpolation=InterpolationMode.BICUBIC, antialias=True))
    x = torch.stack(crops).float().div_(255.0)
    flip = torch.tensor(flips, device=x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def device_batches(images: Sequence[torch.Tensor], labels: torch.Tensor, batch_size: int, size: int,
                   mean: Sequence[float], std: Sequence[float], scale: Sequence[float],
                   generator: torch.Generator,
                   aug_generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless epochs of shuffled (`generator`), freshly augmented (`aug_generator`) batches.

    The one shuffler's batches (`fsbench.training.index_batches` with `all_steps`, as
    `fsbench.training.image_batches` draws them for the PIL path): a new permutation per epoch, the
    last batch of an epoch may be smaller.
    """
    from fsbench.training import all_steps, index_batches  # training imports the method layer; augment is lower

    labels = labels.to(images[0].device) if images else labels
    for _, order in index_batches(len(images), batch_size, generator, all_steps(len(images), batch_size)):
        idx = order.tolist()
        batch = augment([images[i] for i in idx], size, mean, std, aug_generator, scale)
        yield batch, labels[idx]
