"""Generators of tiny on-disk datasets in each real layout, for tests.

The layouts are written down here independently of fsbench/data (from CoOp's DATASETS.md and
CLIP-LoRA's datasets/*.py), so the tests check the readers against the published layouts.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image

# name -> (CoOp DATASETS.md folder, CLIP-LoRA code folder, image folder, split file)
COOP_LAYOUTS = {
    "caltech101": ("caltech-101", "Caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "OxfordPets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "StanfordCars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "Flower102", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "Food101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "DTD", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
DEFAULT_CLASSES = ("apple_pie", "beta", "gamma")
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30))


@lru_cache(maxsize=64)
def _encoded(suffix: str, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG" if suffix == ".png" else "JPEG")
    return buf.getvalue()


def write_image(path: Path, label: int) -> None:
    """Write a tiny 8x8 image whose colour depends on `label` (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encoded(path.suffix.lower(), COLOURS[label % len(COLOURS)]))


def make_coop_dataset(
    root: Path,
    name: str,
    clip_lora_folder: bool = False,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    counts: tuple[int, int, int] = (3, 1, 2),
    per_class: Sequence[tuple[int, int, int]] | None = None,
    shuffle_seed: int | None = None,
) -> Path:
    """Write `name` in CoOp's split-json layout under `root`; returns the dataset folder.

    `classes` are the raw names stored in the split file; `counts` are images per class in
    train/val/test, or `per_class` gives them class by class. `shuffle_seed` shuffles each split's
    entries (so a class's first appearance is not its label order, as in real split files).
    `clip_lora_folder` uses the folder name of CLIP-LoRA's code instead of CoOp's.
    """
    coop_folder, lora_folder, image_dir, split_file = COOP_LAYOUTS[name]
    folder = root / (lora_folder if clip_lora_folder else coop_folder)
    split: dict[str, list] = {}
    for s, split_name in enumerate(("train", "val", "test")):
        split[split_name] = []
        for label, cls in enumerate(classes):
            for k in range(per_class[label][s] if per_class else counts[s]):
                rel = f"{cls}/{split_name}_{k}.jpg"
                write_image(folder / image_dir / rel, label)
                split[split_name].append([rel, label, cls])
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}|{split_name}").shuffle(split[split_name])
    (folder / split_file).write_text(json.dumps(split), encoding="utf-8")
    return folder


AIRCRAFT_VARIANTS = ("707-320", "F/A-18", "Falcon 2000")


def make_aircraft(root: Path, folder: str = "fgvc_aircraft", per_split: int = 2,
                  per_class: Sequence[tuple[int, int, int]] | None = None, shuffle_seed: int | None = None,
                  variants: Sequence[str] = AIRCRAFT_VARIANTS) -> Path:
    """Write FGVC-Aircraft's own layout (variants.txt + images_variant_*.txt + images/) in `root/folder`.

    `per_class` gives the train/val/test images of each variant (default `per_split` each); `shuffle_seed`
    shuffles the lines of each list."""
    base = root / folder
    base.mkdir(parents=True, exist_ok=True)
    (base / "variants.txt").write_text("".join(v + "\n" for v in variants), encoding="utf-8")
    image_id = 1000000
    for s, split in enumerate(("train", "val", "test")):
        lines = []
        for label, variant in enumerate(variants):
            for _ in range(per_class[label][s] if per_class else per_split):
                image_id += 1
                write_image(base / "images" / f"{image_id}.jpg", label)
                lines.append(f"{image_id} {variant}\n")
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}|{split}").shuffle(lines)
        (base / f"images_variant_{split}.txt").write_text("".join(lines), encoding="utf-8")
    return base


def imagenet_wnids(n_classes: int) -> list[str]:
    """`n_classes` wnid-shaped folder names, sorted."""
    return [f"n{i:08d}" for i in range(n_classes)]


def make_imagenet(
    root: Path,
    clip_lora_layout: bool = False,
    with_classnames: bool = True,
    n_classes: int = 3,
    n_train: int = 3,
    n_val: int = 2,
    train_counts: Sequence[int] | None = None,
) -> Path:
    """Write ImageNet class folders: `imagenet/images/{train,val}` (CoOp) or `imagenet/{train,val}`.

    With `with_classnames`, also CoOp's `classnames.txt` ("<wnid> <name>"; names "class <i>").
    Without it the reader needs all 1000 classes, so pass `n_classes=1000`. `train_counts` gives each
    class's train images (default `n_train` each).
    """
    folder = root / "imagenet"
    image_root = folder if clip_lora_layout else folder / "images"
    wnids = imagenet_wnids(n_classes)
    for label, wnid in enumerate(wnids):
        for k in range(train_counts[label] if train_counts else n_train):
            write_image(image_root / "train" / wnid / f"{wnid}_{k}.JPEG", label)
        for k in range(n_val):
            write_image(image_root / "val" / wnid / f"ILSVRC2012_val_{label:05d}{k}.JPEG", label)
    if with_classnames:
        lines = "".join(f"{w} class {i}\n" for i, w in enumerate(wnids))
        (folder / "classnames.txt").write_text(lines, encoding="utf-8")
    return folder


IMAGEFOLDER_CLASSES = ("golden_retriever", "tabby_cat")


def make_imagefolder(root: Path, with_splits: bool, with_val: bool = True, per_class: int = 5) -> Path:
    """Write a user image folder: `root/{train,val,test}/<class>/` (with_splits) or `root/<class>/`.

    Files are PNG and JPEG mixed (names `img_<k>.png|jpg`), `per_class` per class and split.
    """
    splits = (("train", "val", "test") if with_val else ("train", "test")) if with_splits else ("",)
    for split in splits:
        for label, cls in enumerate(IMAGEFOLDER_CLASSES):
            for k in range(per_class):
                write_image(root / split / cls / f"img_{k}.{'png' if k % 2 else 'jpg'}", label)
    return root


# --- the domain-generalisation targets (CoOp DATASETS.md, "ImageNetV2" to "ImageNet-R") ----------------

# name -> (folder under the data root, image folder inside it, how a real file is named)
DG_LAYOUTS = {
    "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "{k}.jpeg"),
    "imagenet_sketch": ("imagenet-sketch", "images", "sketch_{k}.JPEG"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", "0.00{k}_label _ label_0.5.jpg"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", "art_{k}.jpg"),
}


def write_imagenet_classnames(path: Path, wnids: list[str]) -> Path:
    """CoOp's classnames.txt: "<wnid> <name>" per line, names with spaces ("class 0 name")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{w} class {i} name\n" for i, w in enumerate(wnids)), encoding="utf-8")
    return path


def make_dg_target(root: Path, name: str, classes: list[str], per_class: int = 2,
                   classnames: list[str] | None = None) -> Path:
    """Write one DG target's class folders under `root`; returns its image folder.

    `classes` are the folder names: ImageNet label indices as strings for V2, wnids otherwise.
    With `classnames` (wnids), also write classnames.txt into the target's folder, as CoOp does.
    A and R get the README.txt their tar files hold beside the class folders.
    """
    folder, image_dir, pattern = DG_LAYOUTS[name]
    images = root / folder / image_dir
    images.mkdir(parents=True, exist_ok=True)
    for label, cls in enumerate(classes):
        for k in range(per_class):
            write_image(images / cls / pattern.format(k=k), label)
    if name in ("imagenet_a", "imagenet_r"):
        (images / "README.txt").write_text("class folders are wnids\n", encoding="utf-8")
    if classnames is not None:
        write_imagenet_classnames(root / folder / "classnames.txt", classnames)
    return images


# --- the OOD sets of the `ood` protocol (MCM README, "Out-of-Distribution Datasets"; MOS's tarballs) --------

# name -> (folder under the data root, class folders): MOS's three hold one folder images/ of hashed jpg names
OOD_LAYOUTS = {
    "ood_inaturalist": ("ImageNet_OOD_dataset/iNaturalist", ("images",)),
    "ood_sun": ("ImageNet_OOD_dataset/SUN", ("images",)),
    "ood_places": ("ImageNet_OOD_dataset/Places", ("images",)),
    "ood_textures": ("ImageNet_OOD_dataset/dtd/images", ("banded", "waffled", "zigzagged")),
}


def make_ood_set(root: Path, name: str, per_class: int = 3, folder: str | None = None) -> Path:
    """Write one OOD set in MCM's layout under `root` (or under `folder` instead of MCM's); returns its
    ImageFolder root. Images are tiny solid colours, unlike the synthetic dataset's shapes; iNaturalist, SUN and
    Places get 32-hex file names as MOS's tarballs, Textures DTD's `<texture>_<nnnn>.jpg`."""
    default, classes = OOD_LAYOUTS[name]
    base = root / (folder or default)
    shift = list(OOD_LAYOUTS).index(name)  # each set its own mix of colours
    for label, cls in enumerate(classes):
        for k in range(per_class):
            stem = f"{cls}_{k:04d}" if len(classes) > 1 else f"{name}{k}".encode().hex()[:32].ljust(32, "0")
            write_image(base / cls / f"{stem}.jpg", label + k * (shift + 1))
    if len(classes) > 1:  # DTD's waffled/ holds a KDE .directory file beside its images
        (base / "waffled" / ".directory").write_text("[Dolphin]\n", encoding="utf-8")
    return base


def make_ood_sets(root: Path, per_class: int = 3) -> list[str]:
    """All four OOD sets in MCM's layout under `root`; returns their names."""
    for name in OOD_LAYOUTS:
        make_ood_set(root, name, per_class)
    return list(OOD_LAYOUTS)
