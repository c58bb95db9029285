"""Reading images from a dataset's item list into batches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from fsbench.data.base import DatasetSplits, Item
from fsbench.errors import DataError
from fsbench.io import atomic_write_json

MAX_LISTED = 20  # bad files named in one error line
# Pillow refuses images over ~179 MP as possible decompression bombs; dataset files are the user's own,
# and a valid 20000 x 20000 photo must load. Above 1 GP the error names the reason.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 1_000_000_000)


BAD_REASONS: dict[str, str] = {}  # path -> why it could not be decoded, for error messages


class BadImageError(DataError):
    """An image file that cannot be decoded."""


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB; an unreadable file is a `BadImageError` (a `DataError`) naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"cannot read image {path}: {exc}") from None


def _readable(path: Path) -> str | None:
    """None if the file decodes, else why not."""
    try:
        load_image(path)
        return None
    except BadImageError as exc:
        return str(exc).removeprefix(f"cannot read image {path}: ")


def scan_images(items: Sequence[Item], root: Path, track: Callable[[Iterable, int, str], Iterable] | None = None,
                desc: str = "check images") -> list[Item]:
    """The items whose file cannot be decoded (every file is decoded, on a few threads)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        why = pool.map(_readable, [Path(root) / it.path for it in items], chunksize=64)
        why = track(why, len(items), desc) if track else why
        bad = []
        for it, reason in zip(items, why, strict=True):
            if reason is not None:
                BAD_REASONS[it.path] = reason
                bad.append(it)
        return bad


def bad_images_error(bad: Sequence[str], root: Path, skipping: bool = False) -> DataError:
    """One line naming every unreadable file (the first MAX_LISTED, then a count); `skipping`: the user
    passed --skip-bad-images already (the files broke while the run was going), so it is not advised."""
    more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    s = "" if len(bad) == 1 else "s"
    reason = f" (first: {BAD_REASONS[bad[0]]})" if bad and bad[0] in BAD_REASONS else ""
    fix = ("they became unreadable after the scan of --skip-bad-images; replace or delete them and run again"
           if skipping else "replace or delete them, or pass --skip-bad-images to leave them out")
    return DataError(f"{len(bad)} unreadable image{s} under {root}: {', '.join(bad[:MAX_LISTED])}{more}{reason}; "
                     + fix)


def load_images(items: Sequence[Item], root: Path) -> list[Image.Image]:
    """Decode every item; if any fails, one `DataError` names all the failures."""
    images, bad = [], []
    for it in items:
        try:
            images.append(load_image(Path(root) / it.path))
        except BadImageError as exc:
            BAD_REASONS[it.path] = str(exc).removeprefix(f"cannot read image {Path(root) / it.path}: ")
            bad.append(it.path)
    if bad:
        raise bad_images_error(bad, root)
    return images


SCAN_VERSION = 2  # 2: one verdict per file, keyed by its stat (1: one list per split lists)


def drop_bad_images(data: DatasetSplits, cache_dir: str | Path,
                    track: Callable[[Iterable, int, str], Iterable] | None = None) -> DatasetSplits:
    """`data` without its undecodable files (listed in `extra["skipped_images"]`).

    Whether a file decodes is a property of its bytes: each file's verdict is cached under
    `<cache_dir>/image_scan/` with the file's stat as git's index has it (size, mtime, ctime, inode,
    device; any write changes ctime), so a repaired image is decoded again and kept, a newly broken one
    is decoded and skipped, and an unchanged one is never decoded twice. (Stat, not a content digest:
    this scan covers whole splits, 1.28 M ImageNet train images, which need not be read to be stat-ed.)
    """
    from fsbench.identity import file_stat

    items = data.train + data.val + data.test
    stamps = {it.path: _stat_key(file_stat(Path(data.image_root) / it.path)) for it in items}
    path = Path(cache_dir) / "image_scan" / f"{data.name}-{_root_key(data.image_root)}-v{SCAN_VERSION}.json"
    try:
        saved = json.loads(path.read_text())["files"]
        verdicts = {p: bool(bad) for p, (stamp, bad) in saved.items() if stamps.get(p) == stamp}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        verdicts = {}
    todo = [it for it in items if it.path not in verdicts]
    if todo:
        broken = {it.path for it in scan_images(todo, data.image_root, track, f"check images of {data.name}")}
        verdicts.update({it.path: it.path in broken for it in todo})
        files = {p: [stamps[p], bad] for p, bad in verdicts.items() if stamps[p]}  # a missing file: looked at again
        try:
            atomic_write_json(path, {"version": SCAN_VERSION, "files": files})
        except OSError:
            pass  # decoded again next time
    bad = {p for p, b in verdicts.items() if b}
    keep = {s: [it for it in data.split(s) if it.path not in bad] for s in ("train", "val", "test")}
    return dataclasses.replace(data, **keep, extra={**data.extra, "skipped_images": sorted(bad)})


def _stat_key(stat: tuple[int, ...] | None) -> str:
    return "" if stat is None else hashlib.sha256(repr(stat).encode()).hexdigest()[:12]


def _root_key(root: Path) -> str:
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]


class ImageItems(Dataset):
    """`(transform(image), label)` pairs for a list of items under `root`; with `seeds`, item
    i's random transform draws from torch's RNG seeded with `seeds[i]` (the global state is
    restored afterwards)."""

    def __init__(self, items: Sequence[Item], root: Path, transform: Callable, seeds: Sequence[int] | None = None):
        self.items, self.root, self.transform = list(items), Path(root), transform
        self.seeds = None if seeds is None else list(seeds)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        it = self.items[i]
        image = load_image(self.root / it.path)
        if self.seeds is None:
            return self.transform(image), it.label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seeds[i])
            return self.transform(image), it.label


class Views:
    """`views` independent draws of a random `transform` of one image, stacked (V, 3, H, W)."""

    def __init__(self, transform: Callable, views: int):
        self.transform, self.views = transform, views

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.views)])

    def __repr__(self) -> str:
        return f"Views({self.views}, {self.transform!r})"


def item_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` (e.g. a base seed and an image path)."""
    return int(hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def default_workers() -> int:
    """Loader processes: one per core up to 8 (0 when there is a single core)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if n <= 1 else min(8, n)


def image_loader(items: Sequence[Item], root: Path, transform: Callable, batch_size: int,
                 device: torch.device, shuffle: bool = False, generator: torch.Generator | None = None,
                 workers: int | None = None, drop_last: bool = False,
                 seeds: Sequence[int] | None = None) -> DataLoader:
    """A DataLoader over `items` (pinned memory on CUDA; seeded shuffling via `generator`;
    per-item transform seeds via `seeds`)."""
    workers = default_workers() if workers is None else workers
    return DataLoader(
        ImageItems(items, root, transform, seeds), batch_size=batch_size, shuffle=shuffle,
        generator=generator, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=drop_last, persistent_workers=False,
    )
