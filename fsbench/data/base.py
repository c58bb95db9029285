"""What a dataset reader returns, and the registry readers register in."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fsbench.registry import Registry

# The template CLIP-LoRA trains with, for every dataset (Zanella & Ben Ayed 2024, official code).
TRAIN_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Item:
    """One labelled image: path relative to the dataset's image root, and its class index."""

    path: str
    label: int


@dataclass
class DatasetSplits:
    """A dataset read from disk: three disjoint splits over one class list.

    Attributes:
        name: registry name ("eurosat").
        image_root: folder that `Item.path` is relative to.
        classnames: class names, index = label, with CoOp's renames applied.
        templates: zero-shot prompt templates (CoOp's per-dataset template; a list so that
            ensembles are possible).
        train, val, test: the standard splits.
    """

    name: str
    image_root: Path
    classnames: list[str]
    templates: list[str]
    train: list[Item]
    val: list[Item]
    test: list[Item]
    train_template: str = TRAIN_TEMPLATE
    extra: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Item]:
        """A split by name; "train+val" is the train folder a reference code draws from where fsbench holds
        its val split out of it (ImageNet): train and val together, ordered by class, each class's train
        images before its val images (a class's images in folder order when the reader kept it)."""
        if name == "train+val":
            key = (id(self.train), id(self.val), len(self.train), len(self.val))
            memo = self.__dict__.get("_train_val")
            if memo is None or memo[0] != key:  # stable sort: train first within each class
                memo = (key, sorted(self.train + self.val, key=lambda it: it.label))
                self.__dict__["_train_val"] = memo
            return memo[1]
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def fingerprint(self, split: str) -> str:
        """Hash of a split's file list and labels: changes whenever its content does."""
        h = hashlib.sha256()
        for it in self.split(split):
            h.update(f"{it.path}\t{it.label}\n".encode())
        return h.hexdigest()[:16]


# A reader takes the data root (the folder holding every dataset's folder) and returns splits.
Reader = Callable[[Path], DatasetSplits]

DATASETS: Registry[Reader] = Registry("dataset")


def register_dataset(name: str) -> Callable[[Reader], Reader]:
    """Decorator registering a reader under `name`."""
    return DATASETS.register(name)
