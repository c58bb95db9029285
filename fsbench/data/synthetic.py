"""A small generated dataset (10 classes of 32x32 shapes) for tests and the offline demo.

On first use the reader writes `<root>/synthetic/` in the CoOp layout (`images/<class>/*.png` +
`split_zhou_Synthetic.json`; 16 train / 4 val / 10 test images per class), then reads it through
the same code as the CoOp datasets. Generation is deterministic (a seeded numpy Generator, never
the global RNG): the same bytes on every machine with the same numpy and Pillow. The folder is
built under a temporary name and renamed into place, so a concurrent reader never sees half of it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fsbench.data.base import DatasetSplits, register_dataset
from fsbench.data.coop import CoopLayout, read_coop
from fsbench.errors import DataError

NAME = "synthetic"
LAYOUT = CoopLayout(NAME, ("synthetic",), "images", "split_zhou_Synthetic.json")
SEED = 0
SIZE = 32
COUNTS = {"train": 16, "val": 4, "test": 10}
# (class name, RGB colour, pattern): colour and pattern together make each class learnable.
CLASSES = (
    ("red square", (220, 40, 40), "square"),
    ("green circle", (40, 200, 60), "circle"),
    ("blue triangle", (50, 80, 230), "triangle"),
    ("yellow cross", (235, 220, 40), "cross"),
    ("purple ring", (150, 60, 200), "ring"),
    ("orange diamond", (245, 140, 30), "diamond"),
    ("cyan stripes", (40, 220, 220), "stripes"),
    ("white checkerboard", (240, 240, 240), "checkerboard"),
    ("pink bars", (250, 120, 180), "bars"),
    ("brown diagonals", (140, 90, 40), "diagonals"),
)


def _mask(pattern: str, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Boolean mask of `pattern` on coordinates (y, x) centred on the shape."""
    r = np.hypot(y, x)
    masks = {
        "square": np.maximum(abs(y), abs(x)) <= 8,
        "circle": r <= 9,
        "triangle": (abs(y) <= 8) & (abs(x) <= (y + 8) / 2),
        "cross": ((abs(y) <= 3) & (abs(x) <= 10)) | ((abs(x) <= 3) & (abs(y) <= 10)),
        "ring": (r >= 6) & (r <= 10),
        "diamond": abs(x) + abs(y) <= 10,
        "stripes": (y // 4) % 2 == 0,
        "checkerboard": (y // 4 + x // 4) % 2 == 0,
        "bars": (x // 4) % 2 == 0,
        "diagonals": ((x + y) // 4) % 2 == 0,
    }
    return masks[pattern]


def _image(rng: np.random.Generator, colour: tuple[int, int, int], pattern: str) -> Image.Image:
    """One image: the class pattern in its colour, randomly shifted and lit, on a noisy grey."""
    dy, dx = rng.integers(-4, 5, size=2)
    y, x = np.mgrid[:SIZE, :SIZE] - SIZE // 2
    mask = _mask(pattern, y - dy, x - dx)
    pixels = np.full((SIZE, SIZE, 3), rng.uniform(30, 90), dtype=np.float64)
    pixels[mask] = np.asarray(colour) * rng.uniform(0.7, 1.2)
    pixels += rng.normal(0.0, 12.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _write_dataset(folder: Path) -> None:
    """Write every image and the split file into `folder`."""
    rng = np.random.default_rng(SEED)
    split: dict[str, list] = {s: [] for s in COUNTS}
    for label, (classname, colour, pattern) in enumerate(CLASSES):
        class_dir = folder / LAYOUT.image_dir / classname.replace(" ", "_")
        class_dir.mkdir(parents=True)
        for name, count in COUNTS.items():
            for k in range(count):
                file = class_dir / f"{name}_{k:02d}.png"
                _image(rng, colour, pattern).save(file, format="PNG")
                split[name].append([file.relative_to(folder / LAYOUT.image_dir).as_posix(), label, classname])
    (folder / LAYOUT.split_file).write_text(json.dumps(split, indent=1), encoding="utf-8")


def ensure_synthetic(root: Path) -> Path:
    """Generate `<root>/synthetic/` unless it exists; return it. Safe against concurrent callers."""
    folder = root / LAYOUT.folders[0]
    if (folder / LAYOUT.split_file).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root))
    try:
        _write_dataset(tmp)
        try:
            tmp.rename(folder)
        except OSError as e:  # another process renamed its copy first, or a stale folder is in the way
            if not (folder / LAYOUT.split_file).is_file():
                raise DataError(f"{NAME}: {folder} exists without {LAYOUT.split_file}; delete it") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@register_dataset(NAME)
def read_synthetic(root: Path) -> DatasetSplits:
    """Read (generating on first use) the synthetic dataset under the data root `root`."""
    ensure_synthetic(root)
    return read_coop(root, LAYOUT)
