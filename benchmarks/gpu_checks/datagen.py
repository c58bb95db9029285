"""A generated on-disk dataset in the `imagefolder` layout, with ImageNet's class names.

    python benchmarks/gpu_checks/datagen.py DIR --classes 1000 --out DIR/datagen.json

`DIR/{train,val,test}/<class>/<n>.jpg`, read by fsbench's own `imagefolder` reader, so the checks
run `fsbench run --dataset imagefolder --data-root DIR` end to end. Class folders are CLIP's
ImageNet class names (open_clip's `IMAGENET_CLASSNAMES`, spaces as "_"), so the text side has the
real prompt lengths; with fewer classes, an even subset. Training images have ImageNet-like sizes
(300-500 px a side, smooth random content) because the augmentation's cost depends on them;
val and test images are smaller (their size only changes decoding time).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from jsonout import write_out
from PIL import Image

SPLIT_SIZES = {"train": (300, 501), "val": (64, 129), "test": (64, 129)}  # side lengths [lo, hi)


def imagenet_classnames() -> list[str]:
    """open_clip's `zero_shot_metadata.IMAGENET_CLASSNAMES`, read without importing open_clip (and
    torch): that module is plain data, so loading its file alone takes milliseconds, not seconds."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed (gpu_check.sh installs it from the wheels folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
    module_spec = importlib.util.spec_from_file_location("_imagenet_metadata", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return list(module.IMAGENET_CLASSNAMES)


def class_folders(count: int) -> list[str]:
    """`count` folder names from CLIP's ImageNet class names (an even subset), unique and path-safe."""
    names = imagenet_classnames()
    names = names if count >= len(names) else names[:: len(names) // count][:count]
    folders: list[str] = []
    for name in names:
        folder = name.replace("/", "-").replace(" ", "_")
        while folder in folders:  # open_clip names two classes "missile" and two "sunglasses"
            folder += "_2"
        folders.append(folder)
    return folders


def write_jpeg(path: Path, side: tuple[int, int], seed: int) -> None:
    """A smooth random JPEG (blocky noise upsampled) of `side` = (height, width)."""
    rng = np.random.default_rng(seed)
    h, w = side
    small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=90)


def write_imagefolder(root: Path, classes: int, per_split: dict[str, int], seed: int = 0,
                      sizes: dict[str, tuple[int, int]] | None = None) -> int:
    """Write the dataset; returns the number of images. Deterministic in `seed`."""
    sizes = sizes or SPLIT_SIZES
    rng = np.random.default_rng(seed)
    jobs = []
    for split, count in per_split.items():
        lo, hi = sizes[split]
        for folder in class_folders(classes):
            for k in range(count):
                side = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
                jobs.append((root / split / folder / f"{k}.jpg", side, int(rng.integers(2**31))))
    with ThreadPoolExecutor(max_workers=8) as pool:  # PIL releases the GIL while encoding
        list(pool.map(lambda job: write_jpeg(*job), jobs))
    return len(jobs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train", type=int, default=1, help="training images per class")
    p.add_argument("--val", type=int, default=1)
    p.add_argument("--test", type=int, default=1)
    p.add_argument("--small", action="store_true", help="48-96 px training images (CPU smoke runs)")
    p.add_argument("--out", type=Path, help="write the counts and seconds as JSON")
    args = p.parse_args()
    sizes = {**SPLIT_SIZES, "train": (48, 97)} if args.small else SPLIT_SIZES
    start = time.perf_counter()
    count = write_imagefolder(args.root, args.classes, {"train": args.train, "val": args.val, "test": args.test},
                              sizes=sizes)
    seconds = time.perf_counter() - start
    print(f"wrote {count} images of {args.classes} classes under {args.root} in {seconds:.1f} s")
    if args.out:
        write_out(str(args.out), {"root": str(args.root), "classes": args.classes, "images": count,
                                  "seconds": seconds})


if __name__ == "__main__":
    main()
