"""Reading images from a dataset's item list into batches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from fsbench.data.base import Item
from fsbench.errors import DataError


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB; an unreadable file is a `DataError` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


class ImageItems(Dataset):
    """`(transform(image), label)` pairs for a list of items under `root`."""

    def __init__(self, items: Sequence[Item], root: Path, transform: Callable):
        self.items, self.root, self.transform = list(items), Path(root), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        it = self.items[i]
        return self.transform(load_image(self.root / it.path)), it.label


def default_workers() -> int:
    """Loader processes: one per core up to 8 (0 when there is a single core)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if n <= 1 else min(8, n)


def image_loader(items: Sequence[Item], root: Path, transform: Callable, batch_size: int,
                 device: torch.device, shuffle: bool = False, generator: torch.Generator | None = None,
                 workers: int | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader over `items` (pinned memory on CUDA; seeded shuffling via `generator`)."""
    workers = default_workers() if workers is None else workers
    return DataLoader(
        ImageItems(items, root, transform), batch_size=batch_size, shuffle=shuffle,
        generator=generator, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=drop_last, persistent_workers=False,
    )


def augmented_batches(items: Sequence[Item], root: Path, transform: Callable, batch_size: int,
                      generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless epochs of shuffled, freshly augmented batches from images decoded once.

    Few-shot training sets are small (at most 16 x 1000 images), so decoding every file once
    and augmenting in memory keeps the trainer from waiting on JPEG decoding or on loader
    processes. Shuffling uses `generator`; the random transforms use torch's global RNG,
    which the engine seeds per run.
    """
    images = [load_image(Path(root) / it.path) for it in items]
    labels = torch.tensor([it.label for it in items], dtype=torch.long)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield torch.stack([transform(images[i]) for i in idx.tolist()]), labels[idx]
