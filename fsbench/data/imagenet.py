"""ImageNet-1k (Deng et al. 2009) from class folders, with CLIP's class names.

Layouts: `imagenet/images/{train,val}/<wnid>/*.JPEG` (CoOp, KaiyangZhou/CoOp DATASETS.md and
datasets/imagenet.py) or `imagenet/{train,val}/<wnid>/*.JPEG` (CLIP-LoRA, MaxZanella/CLIP-LoRA
datasets/imagenet.py). Labels follow sorted wnids. Names come from `imagenet/classnames.txt`
(CoOp's "<wnid> <name>" file) when present, else from open_clip's copy of CLIP's 1000 names.

Deliberate deviation: the official val folder is the test split, and our val split is held out
of train (the last 10% of each class's sorted files, at least one), so it never overlaps test.
CoOp passes the test set as val (`super().__init__(train_x=train, val=test, test=test)`), which
lets model selection see the evaluation data; CLIP-LoRA samples its val shots from train too.
"""

from __future__ import annotations

import re
from pathlib import Path

from fsbench.data._common import build_splits, list_images, missing, subdirs
from fsbench.data.base import DatasetSplits, Item, register_dataset
from fsbench.data.templates import TEMPLATES
from fsbench.errors import DataError

NAME = "imagenet"
SPLIT_PARENTS = ("images", "")  # CoOp first, then CLIP-LoRA
LAYOUT = (
    "imagenet/images/{train,val}/<wnid>/*.JPEG (CoOp) or imagenet/{train,val}/<wnid>/*.JPEG,"
    " plus optional imagenet/classnames.txt"
)
WNID = re.compile(r"n\d{8}")


@register_dataset(NAME)
def read_imagenet(root: Path) -> DatasetSplits:
    """Read ImageNet from the data root `root`; see the module docstring for the val split."""
    folder = root / NAME
    image_root = next((folder / p for p in SPLIT_PARENTS if (folder / p / "train").is_dir()), None)
    if image_root is None:
        raise missing(NAME, "train folder", folder / "images" / "train", LAYOUT)
    if not (image_root / "val").is_dir():
        raise missing(NAME, "val folder", image_root / "val", LAYOUT)
    wnids = subdirs(image_root / "train")
    classnames = _classnames(folder, wnids)
    train, val = [], []
    for label, wnid in enumerate(wnids):
        files = list_images(image_root / "train" / wnid)
        if len(files) < 2:
            raise DataError(f"{NAME}: {image_root / 'train' / wnid} needs at least 2 images (train + val)")
        n_val = max(1, len(files) // 10)
        items = [Item(f"train/{wnid}/{f}", label) for f in files]
        train += items[:-n_val]
        val += items[-n_val:]
    test = _read_test(image_root, {w: i for i, w in enumerate(wnids)})
    splits = {"train": train, "val": val, "test": test}
    data = build_splits(NAME, image_root, classnames, TEMPLATES[NAME], splits, image_root)
    data.extra["wnids"] = wnids  # label -> wnid: the variants (A, R, V2, Sketch) are matched by it
    return data


def _read_test(image_root: Path, labels: dict[str, int]) -> list[Item]:
    """The official val folder, labelled by the train folder's wnid order."""
    test = []
    for wnid in subdirs(image_root / "val"):
        if wnid not in labels:
            raise DataError(f"{NAME}: {image_root / 'val' / wnid} has no matching train folder")
        test += [Item(f"val/{wnid}/{f}", labels[wnid]) for f in list_images(image_root / "val" / wnid)]
    return test


def _classnames(folder: Path, wnids: list[str]) -> list[str]:
    """Class names for sorted `wnids`: classnames.txt if present, else CLIP's list (needs all 1000)."""
    txt = folder / "classnames.txt"
    if txt.is_file():
        table = _read_classnames_txt(txt)
        absent = [w for w in wnids if w not in table]
        if absent:
            raise DataError(f"{NAME}: {txt} has no name for {absent[0]} ({len(absent)} wnids missing)")
        return [table[w] for w in wnids]
    if len(wnids) != 1000 or not all(WNID.fullmatch(w) for w in wnids):
        raise DataError(
            f"{NAME}: found {len(wnids)} class folders, not the 1000 ImageNet wnids (n01440764, ...);"
            f" to use other classes put '<wnid> <name>' lines in {txt}"
        )
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # lazy: open_clip imports torch

    return list(IMAGENET_CLASSNAMES)


def _read_classnames_txt(path: Path) -> dict[str, str]:
    """CoOp's classnames.txt: "<wnid> <name with spaces>" per line (datasets/imagenet.py)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{NAME}: cannot read {path} ({e})") from e
    table = {}
    for n, line in enumerate(lines, start=1):
        wnid, _, name = line.strip().partition(" ")
        if wnid and not name.strip():
            raise DataError(f"{NAME}: malformed {path}: line {n} ({line!r}) is not '<wnid> <name>'")
        if wnid:
            table[wnid] = name.strip()
    return table
