"""The four ImageNet variants of the domain-generalisation protocol, in CoOp's layouts (test only).

ImageNet-V2 matched frequency (Recht et al., ICML 2019), ImageNet-Sketch (Wang et al., NeurIPS
2019), ImageNet-A (Hendrycks et al., CVPR 2021) and ImageNet-R (Hendrycks et al., ICCV 2021),
read as CoOp reads them (Zhou et al., IJCV 2022; KaiyangZhou/CoOp at ff61507, DATASETS.md lines
184-231 for the layouts, datasets/imagenetv2.py, imagenet_sketch.py, imagenet_a.py and
imagenet_r.py for the labels):

| name | folder | images | classes, label |
|---|---|---|---|
| imagenet_v2 | imagenetv2/ | imagenetv2-matched-frequency-format-val/<0..999>/ | 1000, folder number |
| imagenet_sketch | imagenet-sketch/ | images/<wnid>/ (or the zip's sketch/<wnid>/) | 1000, ImageNet index |
| imagenet_a | imagenet-adversarial/ | imagenet-a/<wnid>/ (200 folders) | 200, sorted wnid |
| imagenet_r | imagenet-rendition/ | imagenet-r/<wnid>/ (200 folders) | 200, sorted wnid |

Each is a test set: `test` holds every image, `train` and `val` are empty (CoOp passes the same
list as train and test, `super().__init__(train_x=data, test=data)`, line 29 of each reader; a
method is fitted on ImageNet and only evaluated here). Class names come from CoOp's
`classnames.txt` ("<wnid> <name>" per line), looked up in the variant's folder (where CoOp's
DATASETS.md copies it) and then in `imagenet/`. An ImageNet label index is the rank of a wnid among
the file's sorted wnids, which is how fsbench's `imagenet` reader labels (sorted train folders),
so the two agree for any line order; CoOp's V2 reader instead indexes the file's line order
(imagenetv2.py lines 33-39), the same for CoOp's own file, whose lines are sorted.

`extra["wnids"][c]` is the wnid of class `c` and `extra["imagenet_labels"][c]` its index among
classnames.txt's wnids (A's and R's labels index their 200 sorted wnid folders, as in
imagenet_a.py/imagenet_r.py lines 33-43; for V2 and Sketch the index is the identity). A method
fitted on ImageNet is scored on a variant by matching these wnids to the source ImageNet's
(`extra["wnids"]` of the `imagenet` reader; `fsbench.protocols.class_set(variant, source)`), never
by position: a source folder that lacks a class would otherwise shift every later label and score,
say, 'tiger shark' as 'hammerhead shark' without a word. A variant class the source lacks is a
one-line DataError naming its wnids (exit 3).
Deviation: CoOp's Sketch reader labels a class by its position among the folders present
(imagenet_sketch.py line 35), we by its ImageNet index; the two agree when all 1,000 are there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fsbench.data._common import list_images, missing, subdirs
from fsbench.data.base import DatasetSplits, Item, register_dataset
from fsbench.data.imagenet import _read_classnames_txt
from fsbench.data.templates import TEMPLATES
from fsbench.errors import DataError

CLASSNAMES = "classnames.txt"
IMAGENET_FOLDER = "imagenet"


@dataclass(frozen=True)
class Variant:
    """Where one variant lives under the data root and how its class folders are named.

    Attributes:
        name: registry name.
        folder: CoOp DATASETS.md's folder under the data root.
        image_dirs: accepted image folders inside `folder`, CoOp's first.
        numbered: class folders are ImageNet label indices ("0".."999"), not wnids (V2).
        subset: the folders are a subset of ImageNet's classes, and the class list is that
            subset in sorted wnid order (A, R); otherwise it is all of classnames.txt.
    """

    name: str
    folder: str
    image_dirs: tuple[str, ...]
    numbered: bool = False
    subset: bool = False

    def layout(self) -> str:
        folders = "<0..999>" if self.numbered else "<wnid>"
        return f"{self.folder}/{self.image_dirs[0]}/{folders}/* and {self.folder}/{CLASSNAMES} (CoOp DATASETS.md)"


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("imagenet_v2", "imagenetv2", ("imagenetv2-matched-frequency-format-val",), numbered=True),
    Variant("imagenet_sketch", "imagenet-sketch", ("images", "sketch")),
    Variant("imagenet_a", "imagenet-adversarial", ("imagenet-a",), subset=True),
    Variant("imagenet_r", "imagenet-rendition", ("imagenet-r",), subset=True),
)}


@register_dataset("imagenet_v2")
def read_imagenet_v2(root: Path) -> DatasetSplits:
    """ImageNet-V2 matched frequency; see the module docstring."""
    return read_variant(root, VARIANTS["imagenet_v2"])


@register_dataset("imagenet_sketch")
def read_imagenet_sketch(root: Path) -> DatasetSplits:
    """ImageNet-Sketch; see the module docstring."""
    return read_variant(root, VARIANTS["imagenet_sketch"])


@register_dataset("imagenet_a")
def read_imagenet_a(root: Path) -> DatasetSplits:
    """ImageNet-A, 200 classes; see the module docstring."""
    return read_variant(root, VARIANTS["imagenet_a"])


@register_dataset("imagenet_r")
def read_imagenet_r(root: Path) -> DatasetSplits:
    """ImageNet-R, 200 classes; see the module docstring."""
    return read_variant(root, VARIANTS["imagenet_r"])


def read_variant(root: Path, v: Variant) -> DatasetSplits:
    """Read variant `v` under the data root `root` into a test-only DatasetSplits."""
    folder = root / v.folder
    image_root = next((folder / d for d in v.image_dirs if (folder / d).is_dir()), None)
    if image_root is None:
        raise missing(v.name, "image folder", folder / v.image_dirs[0], v.layout())
    wnids, names = imagenet_classes(root, v)
    folders = _class_folders(image_root, v, wnids)
    folder_wnids = [wnids[int(f)] if v.numbered else f for f in folders]
    # the class list: all of ImageNet (V2, Sketch), or the subset's folders in sorted order (A, R)
    class_wnids = folder_wnids if v.subset else wnids
    label_of = {w: c for c, w in enumerate(class_wnids)}
    test = [Item(f"{f}/{name}", label_of[w]) for f, w in zip(folders, folder_wnids, strict=True)
            for name in list_images(image_root / f)]
    if not test:
        raise DataError(f"{v.name}: no images under {image_root} (expected {v.layout()})")
    index = {w: i for i, w in enumerate(wnids)}
    return DatasetSplits(
        name=v.name, image_root=image_root, classnames=[names[index[w]] for w in class_wnids],
        templates=[TEMPLATES[IMAGENET_FOLDER]], train=[], val=[], test=test,
        extra={"imagenet_labels": [index[w] for w in class_wnids], "wnids": class_wnids, "test_only": True},
    )


def imagenet_classes(root: Path, v: Variant) -> tuple[list[str], list[str]]:
    """ImageNet's wnids in label order (sorted) and their names, from CoOp's classnames.txt."""
    candidates = (root / v.folder / CLASSNAMES, root / IMAGENET_FOLDER / CLASSNAMES)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(
            f"{v.name}: {CLASSNAMES} not found: {candidates[0]} or {candidates[1]} (CoOp's '<wnid> <name>' file:"
            f" `fsbench data prepare {v.name}` fetches it, or copy {IMAGENET_FOLDER}/{CLASSNAMES} there)"
        )
    table = _read_classnames_txt(path)
    if not table:
        raise DataError(f"{v.name}: {path} lists no classes (expected '<wnid> <name>' lines)")
    wnids = sorted(table)
    return wnids, [table[w] for w in wnids]


def _class_folders(image_root: Path, v: Variant, wnids: list[str]) -> list[str]:
    """The class folders to read, checked against ImageNet's classes (numbered: all of 0..N-1)."""
    folders = subdirs(image_root)
    if v.numbered:
        wanted = [str(i) for i in range(len(wnids))]
        extra = sorted(set(folders) - set(wanted))
        if extra:
            raise DataError(f"{v.name}: {image_root / extra[0]} is not an ImageNet label index 0..{len(wnids) - 1}"
                            f" ({len(extra)} such folders; expected {v.layout()})")
        absent = [f for f in wanted if f not in set(folders)]
        if absent:
            raise missing(v.name, f"class folder ({len(absent)} of {len(wanted)} absent)",
                          image_root / absent[0], v.layout())
        return wanted
    known = set(wnids)
    unknown = [f for f in folders if f not in known]
    if unknown:
        raise DataError(f"{v.name}: class folder {image_root / unknown[0]} is not a wnid of the classnames.txt"
                        f" used ({len(unknown)} unknown folders; expected {v.layout()})")
    return folders
