"""Helpers shared by the dataset readers: one-line errors, folder look-up, image listing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fsbench.data.base import DatasetSplits, Item
from fsbench.errors import DataError

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def missing(name: str, what: str, path: Path, layout: str) -> DataError:
    """The one-line error for a file or folder that is not where the layout puts it."""
    return DataError(f"{name}: {what} not found: {path} (expected {layout}; see README 'Datasets')")


def first_dir(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first `root / candidate` that is a folder, or None."""
    return next((root / c for c in candidates if (root / c).is_dir()), None)


def subdirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `folder`."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def list_images(folder: Path) -> list[str]:
    """Sorted names of the non-hidden image files in `folder` (extension checked, content not)."""
    with os.scandir(folder) as it:
        return sorted(
            e.name
            for e in it
            if not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            and e.is_file()
        )


def prompt_name(classname: str) -> str:
    """CoOp and CLIP-LoRA both write `classname.replace("_", " ")` into prompts; we do it once here."""
    return classname.replace("_", " ")


def build_splits(
    name: str,
    image_root: Path,
    classnames: list[str],
    template: str,
    splits: dict[str, list[Item]],
    where: Path,
    hint: str = "",
) -> DatasetSplits:
    """Assemble a DatasetSplits, refusing an empty split (`where` and `hint` go in the error)."""
    for split in SPLITS:
        if not splits[split]:
            raise DataError(f"{name}: the {split} split is empty (read from {where}){hint}")
    return DatasetSplits(
        name=name, image_root=image_root, classnames=classnames, templates=[template], **splits
    )
