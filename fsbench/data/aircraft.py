"""FGVC-Aircraft (Maji et al. 2013) at the variant level, read from its own split lists.

CoOp (KaiyangZhou/CoOp, DATASETS.md and datasets/fgvc_aircraft.py) and CLIP-LoRA
(MaxZanella/CLIP-LoRA, datasets/fgvc.py) both expect the archive's `data/` folder renamed to
`fgvc_aircraft/`: `variants.txt` (one class per line, line order = label),
`images_variant_{train,val,test}.txt` (lines "<image id> <variant>") and `images/<id>.jpg`.
The un-renamed `fgvc_aircraft/data/` and the raw `fgvc-aircraft-2013b/data/` are accepted too.
"""

from __future__ import annotations

from pathlib import Path

from fsbench.data._common import SPLITS, build_splits, missing
from fsbench.data.base import DatasetSplits, Item, register_dataset
from fsbench.data.templates import TEMPLATES
from fsbench.errors import DataError

NAME = "fgvc_aircraft"
FOLDERS = ("fgvc_aircraft", "fgvc_aircraft/data", "fgvc-aircraft-2013b/data")
LAYOUT = (
    "fgvc_aircraft/variants.txt + fgvc_aircraft/images_variant_{train,val,test}.txt"
    " + fgvc_aircraft/images/<id>.jpg, i.e. the archive's data/ folder renamed to fgvc_aircraft/"
)


@register_dataset("fgvc")  # the name CLIP-LoRA's code uses
@register_dataset("aircraft")
@register_dataset(NAME)
def read_fgvc_aircraft(root: Path) -> DatasetSplits:
    """Read FGVC-Aircraft (100 variants) from the data root `root`."""
    folder = next((root / f for f in FOLDERS if (root / f / "variants.txt").is_file()), None)
    if folder is None:
        raise missing(NAME, "variants.txt", root / FOLDERS[0] / "variants.txt", LAYOUT)
    image_root = folder / "images"
    if not image_root.is_dir():
        raise missing(NAME, "image folder", image_root, LAYOUT)
    classnames = _lines(folder / "variants.txt")
    if len(set(classnames)) != len(classnames):
        raise DataError(f"{NAME}: malformed {folder / 'variants.txt'}: a variant is listed twice")
    index = {c: i for i, c in enumerate(classnames)}
    splits = {s: _read_split(folder / f"images_variant_{s}.txt", index) for s in SPLITS}
    return build_splits(NAME, image_root, classnames, TEMPLATES[NAME], splits, folder)


def _lines(path: Path) -> list[str]:
    """The non-blank, stripped lines of a text file; one-line DataError if it is missing or empty."""
    if not path.is_file():
        raise missing(NAME, "split list", path, LAYOUT)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{NAME}: cannot read {path} ({e})") from e
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{NAME}: {path} is empty")
    return lines


def _read_split(path: Path, index: dict[str, int]) -> list[Item]:
    """Parse "<image id> <variant name>" lines (CoOp's `read_data`: the name is the rest of the line)."""
    items = []
    for n, line in enumerate(_lines(path), start=1):
        image_id, _, variant = line.partition(" ")
        if variant not in index:
            raise DataError(f"{NAME}: malformed {path}: entry {n} ({line!r}) is not in variants.txt")
        items.append(Item(f"{image_id}.jpg", index[variant]))
    return items
