"""The nine datasets that CoOp ships as fixed `split_zhou_<Name>.json` files.

A split file is `{"train"|"val"|"test": [[relpath, label, classname], ...]}` with paths relative
to the dataset's image folder (CoOp, datasets/oxford_pets.py `read_split`). Folder names follow
CoOp's DATASETS.md (KaiyangZhou/CoOp) first; CLIP-LoRA's code (MaxZanella/CLIP-LoRA,
datasets/*.py) hard-codes other names for seven of them, which are accepted as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fsbench.data._common import SPLITS, build_splits, first_dir, missing, prompt_name
from fsbench.data.base import DatasetSplits, Item, register_dataset
from fsbench.data.templates import TEMPLATES
from fsbench.errors import DataError

# Renames CoOp applies when it builds a split from the raw folders (datasets/eurosat.py and
# datasets/caltech101.py, NEW_CNAMES). The published split files already hold the new names, so
# applying them again changes nothing there; it covers split files regenerated from raw folders.
EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "SeaLake": "Sea or Lake",
}
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


@dataclass(frozen=True)
class CoopLayout:
    """Where one split-json dataset lives under the data root.

    Attributes:
        name: registry name.
        folders: dataset folder names to try in order (CoOp's DATASETS.md, then CLIP-LoRA's code).
        image_dir: image folder inside the dataset folder ("" = the dataset folder itself).
        split_file: the split json inside the dataset folder.
        renames: class renames applied before "_" becomes " ".
        template: the zero-shot prompt template ("a photo of a {}, a type of texture."); "" = fsbench's
            table for `name` (`fsbench.data.templates.TEMPLATES`, CoOp's per-dataset templates).
    """

    name: str
    folders: tuple[str, ...]
    image_dir: str
    split_file: str
    renames: Mapping[str, str] = field(default_factory=dict)
    template: str = ""

    def layout(self) -> str:
        folder = self.folders[0]
        images = f"{folder}/{self.image_dir}" if self.image_dir else folder
        also = f", or the folder named {' or '.join(self.folders[1:])}" if len(self.folders) > 1 else ""
        return f"the CoOp layout: {images}/<images> + {folder}/{self.split_file}{also}"


LAYOUTS = (
    CoopLayout("caltech101", ("caltech-101", "Caltech101"), "101_ObjectCategories",
               "split_zhou_Caltech101.json", CALTECH_RENAMES),
    CoopLayout("oxford_pets", ("oxford_pets", "OxfordPets"), "images", "split_zhou_OxfordPets.json"),
    CoopLayout("stanford_cars", ("stanford_cars", "StanfordCars"), "", "split_zhou_StanfordCars.json"),
    CoopLayout("oxford_flowers", ("oxford_flowers", "Flower102"), "jpg", "split_zhou_OxfordFlowers.json"),
    CoopLayout("food101", ("food-101", "Food101"), "images", "split_zhou_Food101.json"),
    CoopLayout("sun397", ("sun397", "SUN397"), "SUN397", "split_zhou_SUN397.json"),
    CoopLayout("dtd", ("dtd", "DTD"), "images", "split_zhou_DescribableTextures.json"),
    CoopLayout("eurosat", ("eurosat",), "2750", "split_zhou_EuroSAT.json", EUROSAT_RENAMES),
    CoopLayout("ucf101", ("ucf101", "UCF101"), "UCF-101-midframes", "split_zhou_UCF101.json"),
)
ALIASES = {"oxford_flowers": ("flowers102",), "oxford_pets": ("pets",), "stanford_cars": ("cars",)}


def read_coop(root: Path, spec: CoopLayout) -> DatasetSplits:
    """Read the dataset described by `spec` from the data root `root`."""
    folder = first_dir(root, spec.folders)
    if folder is None:
        raise missing(spec.name, "dataset folder", root / spec.folders[0], spec.layout())
    image_root = folder / spec.image_dir
    if not image_root.is_dir():
        raise missing(spec.name, "image folder", image_root, spec.layout())
    split_path = folder / spec.split_file
    if not split_path.is_file():
        raise missing(spec.name, "split file", split_path, spec.layout())
    classnames, splits = read_split_file(split_path, spec.name)
    classnames = [prompt_name(spec.renames.get(c, c)) for c in classnames]
    template = spec.template or TEMPLATES[spec.name]
    return build_splits(spec.name, image_root, classnames, template, splits, split_path)


def read_split_file(path: Path, name: str) -> tuple[list[str], dict[str, list[Item]]]:
    """Parse and check a CoOp split json: returns the classnames (index = label) and the splits."""

    def bad(why: str) -> DataError:
        return DataError(f"{name}: malformed split file {path}: {why}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit int
        raise bad(f"not readable as JSON ({e})") from e
    if not isinstance(data, dict) or any(s not in data for s in SPLITS):
        raise bad('expected an object {"train": [...], "val": [...], "test": [...]}')
    names: dict[int, str] = {}
    splits = {s: _parse_entries(data[s], s, names, bad) for s in SPLITS}
    stray = sorted(set(names) - set(range(len(names))))
    if stray:
        n = len(names) - len(stray)  # the labels 0..n-1 that are in place
        raise bad(f"label {stray[0]} is outside 0..{n - 1} (labels must be 0..C-1, none skipped)")
    return [names[i] for i in range(len(names))], splits


def _parse_entries(
    entries: object, split: str, names: dict[int, str], bad: Callable[[str], DataError]
) -> list[Item]:
    """Turn one split's `[relpath, label, classname]` entries into Items, recording label -> name."""
    if not isinstance(entries, list) or not entries:
        raise bad(f"{split!r} must be a non-empty list of [relpath, label, classname]")
    items = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise bad(f"{split}[{i}] is {entry!r}, not [relpath, label, classname]")
        relpath, label, classname = entry
        if not isinstance(relpath, str) or not relpath or os.path.isabs(relpath) or not _inside(relpath):
            raise bad(f"{split}[{i}]: path {relpath!r} is not a relative path inside the image folder")
        if type(label) is not int:
            raise bad(f"{split}[{i}]: label {label!r} is not an int")
        if not isinstance(classname, str):
            raise bad(f"{split}[{i}]: classname {classname!r} is not a string")
        if names.setdefault(label, classname) != classname:
            raise bad(f"{split}[{i}]: label {label} is {classname!r} here but {names[label]!r} before")
        items.append(Item(relpath, label))
    return items


def _inside(relpath: str) -> bool:
    """A path that stays inside the image folder and can be a file name (no "..", NUL or lone surrogate)."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in relpath and ".." not in relpath.replace("\\", "/").split("/")


def register_coop_layout(spec: CoopLayout, aliases: tuple[str, ...] = ()) -> None:
    """Register a reader for a dataset in CoOp's split-json layout (one line in a plug-in file)."""
    _register(spec, aliases)


def _register(spec: CoopLayout, aliases: tuple[str, ...] = ()) -> None:
    def reader(root: Path) -> DatasetSplits:
        return read_coop(root, spec)

    reader.__name__ = reader.__qualname__ = f"read_{spec.name}"
    reader.__doc__ = f"Read {spec.name} in {spec.layout()}."
    for name in (spec.name, *ALIASES.get(spec.name, ()), *aliases):
        register_dataset(name)(reader)


for _spec in LAYOUTS:
    _register(_spec)
