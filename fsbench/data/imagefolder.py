"""A user's own images, one folder per class; the data root given is the image folder itself.

Two layouts:
  (a) `root/{train,val,test}/<class>/<image>`: val is optional; without it every 5th training
      file of each class (sorted order: files 5, 10, ...) is held out as val.
  (b) `root/<class>/<image>`: each class's sorted files are dealt 3:1:1, file i going to
      train if i % 5 in {0, 1, 2}, to val if i % 5 == 3 and to test if i % 5 == 4.
Class order is the sorted folder names; class names are the folder names with "_" as spaces.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from fsbench.data._common import SPLITS, build_splits, list_images, missing, prompt_name, subdirs
from fsbench.data.base import DatasetSplits, Item, register_dataset
from fsbench.data.templates import TEMPLATES
from fsbench.errors import DataError

NAME = "imagefolder"
LAYOUT = "<root>/{train,val,test}/<class>/<image> (val optional) or <root>/<class>/<image>"
HOLD_OUT_VAL = (0, 0, 0, 0, 1)  # train, val: every 5th file to val
DEAL_3_1_1 = (0, 0, 0, 1, 2)  # train, val, test


@register_dataset(NAME)
def read_imagefolder(root: Path) -> DatasetSplits:
    """Read class folders from `root` in layout (a) or (b) of the module docstring."""
    if not root.is_dir():
        raise missing(NAME, "image folder", root, LAYOUT)
    if any((root / s).is_dir() for s in SPLITS):
        classes, splits = _read_split_folders(root)
    else:
        classes = _classes(root)
        train, val, test = _deal(_items(root, "", classes), DEAL_3_1_1)
        splits = {"train": train, "val": val, "test": test}
    empty = sorted(set(range(len(classes))) - {it.label for it in splits["train"]})
    if empty:
        raise DataError(f"{NAME}: class {classes[empty[0]]!r} has no training images under {root}")
    classnames = [prompt_name(c) for c in classes]
    hint = "; when val or test is dealt from a class's files (every 5th file), a class needs 5+ images"
    return build_splits(NAME, root, classnames, TEMPLATES[NAME], splits, root, hint)


def _read_split_folders(root: Path) -> tuple[list[str], dict[str, list[Item]]]:
    """Layout (a): classes are train's folders; val is held out of train when absent."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise missing(NAME, f"{split} folder", root / split, LAYOUT)
    classes = _classes(root / "train")
    train = _items(root, "train", classes)
    test = _items(root, "test", classes)
    if (root / "val").is_dir():
        val = _items(root, "val", classes)
    else:
        train, val = _deal(train, HOLD_OUT_VAL)
    return classes, {"train": train, "val": val, "test": test}


def _classes(folder: Path) -> list[str]:
    classes = subdirs(folder)
    if not classes:
        raise DataError(f"{NAME}: no class folders in {folder} (expected {LAYOUT})")
    return classes


def _items(root: Path, split: str, classes: list[str]) -> list[Item]:
    """Every image under `root/split/<class>/`, sorted by class then file name."""
    labels = {c: i for i, c in enumerate(classes)}
    folder = root / split
    items = []
    for cls in subdirs(folder):
        if cls not in labels:
            raise DataError(f"{NAME}: class folder {folder / cls} is not among the training classes")
        prefix = f"{split}/{cls}/" if split else f"{cls}/"
        items += [Item(prefix + f, labels[cls]) for f in list_images(folder / cls)]
    return items


def _deal(items: list[Item], slots: Sequence[int]) -> list[list[Item]]:
    """Deal each class's items in order: the class's i-th item goes to bucket slots[i % len(slots)]."""
    buckets: list[list[Item]] = [[] for _ in range(max(slots) + 1)]
    seen: Counter[int] = Counter()
    for it in items:
        buckets[slots[seen[it.label] % len(slots)]].append(it)
        seen[it.label] += 1
    return buckets
