"""The four OOD sets of the `ood` protocol, as MCM reads them (test only, no labels in any ID label space).

MOS's ImageNet OOD benchmark (Huang & Li, "MOS: Towards Scaling Out-of-distribution Detection for
Large Semantic Space", CVPR 2021; deeplearning-wisc/large_scale_ood at af75ddd, README lines 27-47):
10,000 images each of iNaturalist, SUN and Places from concepts that do not overlap ImageNet-1k's,
and all 5,640 images of Textures (DTD, Cimpoi et al., CVPR 2014). MCM (Ming et al., NeurIPS 2022;
deeplearning-wisc/MCM at ea7130f, README "Out-of-Distribution Datasets") keeps them under
`datasets/ImageNet_OOD_dataset/` and reads each with torchvision's ImageFolder
(utils/train_eval_util.py:123-137):

| name | ImageFolder root under the data root (MCM's first) | class folders | images |
|---|---|---|---|
| ood_inaturalist | ImageNet_OOD_dataset/iNaturalist/, or MOS's ood_data/iNaturalist/ | images/ | 10,000 |
| ood_sun | ImageNet_OOD_dataset/SUN/, or ood_data/SUN/ | images/ | 10,000 |
| ood_places | ImageNet_OOD_dataset/Places/, or ood_data/Places/ | images/ | 10,000 |
| ood_textures | ImageNet_OOD_dataset/dtd/images/, or dtd/images/ (CoOp's DTD copy) | 47 textures | 5,640 |

As ImageFolder, every image file in a class folder of the root is read, in sorted order; the class
folder is kept as a label for `data check` only (images/ for the first three, DTD's 47 textures), never
used as a class: the protocol scores these images over the ID dataset's classes and computes no accuracy
on them. `extra["ood"]` marks them; `train` and `val` are empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fsbench.data._common import list_images, missing, prompt_name, subdirs
from fsbench.data.base import TRAIN_TEMPLATE, DatasetSplits, Item, register_dataset
from fsbench.errors import DataError

MCM_FOLDER = "ImageNet_OOD_dataset"


@dataclass(frozen=True)
class OodSet:
    """Where one OOD set may live under the data root: `roots` are ImageFolder roots, MCM's first."""

    name: str
    roots: tuple[str, ...]
    who: tuple[str, ...]  # whose layout each root is, for `data check`
    images: int  # MOS's count (README lines 36-45; DTD: 47 classes x 120)
    classes: int

    def layout(self) -> str:
        inside = "<texture>/*.jpg" if self.classes > 1 else "images/*.jpg"
        return f"{self.roots[0]}/{inside} (MCM README, 'Out-of-Distribution Datasets')"


OOD_SETS: dict[str, OodSet] = {s.name: s for s in (
    OodSet("ood_inaturalist", (f"{MCM_FOLDER}/iNaturalist", "ood_data/iNaturalist"), ("MCM", "MOS"), 10_000, 1),
    OodSet("ood_sun", (f"{MCM_FOLDER}/SUN", "ood_data/SUN"), ("MCM", "MOS"), 10_000, 1),
    OodSet("ood_places", (f"{MCM_FOLDER}/Places", "ood_data/Places"), ("MCM", "MOS"), 10_000, 1),
    OodSet("ood_textures", (f"{MCM_FOLDER}/dtd/images", "dtd/images"), ("MCM", "CoOp's dtd"), 5_640, 47),
)}


def find_root(root: Path, s: OodSet) -> Path | None:
    """The first of `s.roots` under `root` that is a folder, or None."""
    return next((root / r for r in s.roots if (root / r).is_dir()), None)


def read_ood_set(root: Path, s: OodSet) -> DatasetSplits:
    """Read OOD set `s` under the data root `root` as a test-only DatasetSplits, as ImageFolder lists it."""
    folder = find_root(root, s)
    if folder is None:
        raise missing(s.name, "image folder", root / s.roots[0], s.layout())
    classes = subdirs(folder)
    test = [Item(f"{c}/{f}", label) for label, c in enumerate(classes) for f in list_images(folder / c)]
    if not test:
        raise DataError(f"{s.name}: no images under {folder} (expected {s.layout()})")
    return DatasetSplits(name=s.name, image_root=folder, classnames=[prompt_name(c) for c in classes],
                         templates=[TRAIN_TEMPLATE], train=[], val=[], test=test,
                         extra={"test_only": True, "ood": True})


@register_dataset("ood_inaturalist")
def read_ood_inaturalist(root: Path) -> DatasetSplits:
    """MOS's iNaturalist OOD subset; see the module docstring."""
    return read_ood_set(root, OOD_SETS["ood_inaturalist"])


@register_dataset("ood_sun")
def read_ood_sun(root: Path) -> DatasetSplits:
    """MOS's SUN OOD subset; see the module docstring."""
    return read_ood_set(root, OOD_SETS["ood_sun"])


@register_dataset("ood_places")
def read_ood_places(root: Path) -> DatasetSplits:
    """MOS's Places OOD subset; see the module docstring."""
    return read_ood_set(root, OOD_SETS["ood_places"])


@register_dataset("ood_textures")
def read_ood_textures(root: Path) -> DatasetSplits:
    """Textures (all of DTD) as an OOD set; see the module docstring."""
    return read_ood_set(root, OOD_SETS["ood_textures"])
