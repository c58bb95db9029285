"""The reference codes' few-shot draws, exactly: `clip_lora` (MaxZanella/CLIP-LoRA) and `coop` (KaiyangZhou/CoOp
on Dassl). Proven against the official code run unchanged on test trees (tests/fixtures/samplers/README.md).

Both official codes seed Python's global `random` once (`random.seed(seed)`, CLIP-LoRA run_utils.py:11-15,
Dassl dassl/utils/tools.py:73-77) and then call Dassl's `generate_fewshot_dataset` (CLIP-LoRA
datasets/utils.py:210-252, Dassl dassl/data/datasets/base_dataset.py:167-209): classes in the order they first
appear in the split list, `random.sample(items, K)` per class, and for a class with fewer than K items
`random.choices(items, k=K)` (CLIP-LoRA, repeat=True) or all its items (Dassl, repeat=False). Here the same calls
run on a private `random.Random(seed)`, whose state is the global one's after `random.seed(seed)`, over
positions into the split (sample and choices pick by index, so they pick the same items); the global RNG is
never touched. Nothing consumes the global `random` between the seeding and the draw in either main script
(CLIP-LoRA main.py:17-27 loads CLIP in between, which draws nothing from `random`; CoOp train.py:128-142 only
logs and builds the trainer, whose first step is the dataset).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fsbench.data.base import DatasetSplits, Item
from fsbench.errors import ConfigError, DataError
from fsbench.samplers import Sampler, register_sampler
from fsbench.splits import MAX_VAL_SHOTS, FewShotSplit

# Datasets whose val split fsbench holds out of the official train folder; the reference codes draw from the
# whole train folder (`DatasetSplits.split("train+val")`, in folder order).
TRAIN_FOLDER_DATASETS = frozenset({"imagenet"})


def by_class(items: Sequence[Item], positions: Sequence[int] | None = None) -> dict[int, list[int]]:
    """Positions grouped by label, classes in the order they first appear (Dassl's `split_dataset_by_label`)."""
    out: dict[int, list[int]] = {}
    for i in range(len(items)) if positions is None else positions:
        out.setdefault(items[i].label, []).append(i)
    return out


def fewshot(groups: dict[int, list[int]], per_class: int, rng: random.Random, repeat: bool) -> list[int]:
    """Dassl's `generate_fewshot_dataset` on one data source: `per_class` per class by `rng.sample`; a smaller
    class gives `rng.choices(..., k=per_class)` (repeat) or all of its items in list order (no repeat)."""
    chosen: list[int] = []
    for pool in groups.values():
        if len(pool) >= per_class:
            chosen += rng.sample(pool, per_class)
        elif repeat:
            chosen += rng.choices(pool, k=per_class)
        else:
            chosen += pool
    return chosen


def _check(shots: int, val_shots: int | None) -> int:
    if shots < 1:
        raise ConfigError(f"shots must be >= 1, got {shots}")
    val_k = min(shots, MAX_VAL_SHOTS) if val_shots is None else val_shots
    if val_k < 1:
        raise ConfigError(f"validation shots must be >= 1, got {val_k}")
    return val_k


@register_sampler("clip_lora")
class ClipLoraSampler(Sampler):
    """The official CLIP-LoRA code's draw (Zanella & Ben Ayed 2024; MaxZanella/CLIP-LoRA): validation first
    (min(K, 4) per class from the val split), then K train shots, one global-equivalent RNG seeded once,
    classes in split-list order, a small class sampled with replacement (datasets/oxford_pets.py:28-30 and the
    other split-file datasets, datasets/utils.py:238-243). ImageNet: K + min(K, 4) per class from the whole
    train folder in ImageFolder order, the first K for training and the rest for validation
    (datasets/imagenet.py:214-239); a class with fewer images fails there, and here (one line).

    A method asking for another validation size (`val_shots`) gets that many per class by the same rule."""

    summary = "the official CLIP-LoRA code's draw (val first, global seed, random.choices for small classes)"

    def draw(self, data, shots, seed, val_shots=None, repeat=False):
        val_k = _check(shots, val_shots)
        rng = random.Random(seed)  # == random.seed(seed) (run_utils.py set_random_seed)
        if data.name in TRAIN_FOLDER_DATASETS:
            return self._train_folder(data, shots, seed, val_k, rng)
        val = fewshot(by_class(data.val), val_k, rng, repeat=True)
        train = fewshot(by_class(data.train), shots, rng, repeat=True)
        return FewShotSplit(data.name, shots, seed, tuple(train), tuple(val), self.name)

    def _train_folder(self, data: DatasetSplits, shots: int, seed: int, val_k: int,
                      rng: random.Random) -> FewShotSplit:
        folder = data.split("train+val")
        train: list[int] = []
        val: list[int] = []
        for label, pool in by_class(folder).items():
            if len(pool) < shots + val_k:
                name = data.classnames[label] if 0 <= label < len(data.classnames) else str(label)
                raise DataError(f"{data.name}: class {name!r} (label {label}) has {len(pool)} train-folder images "
                                f"but the clip_lora sampler draws K + {val_k} = {shots + val_k} per class (the "
                                "official code fails here too); lower --shots or use --sampler coop|fsbench")
            picked = rng.sample(pool, shots + val_k)
            train += picked[:shots]
            val += picked[shots:]
        return FewShotSplit(data.name, shots, seed, tuple(train), tuple(val), self.name, "train+val", "train+val")


@register_sampler("coop")
class CoopSampler(Sampler):
    """CoOp's draw on Dassl (Zhou et al. 2022; KaiyangZhou/CoOp, KaiyangZhou/Dassl.pytorch): K train shots first,
    then min(K, 4) validation shots per class, one global-equivalent RNG seeded once, classes in split-list
    order, a small class keeps all of its images (repeat=False; CoOp datasets/oxford_pets.py:44-45 and the
    other datasets). ImageNet: K per class from the whole train folder (datasets/imagenet.py:52); CoOp
    validates on the test set (`val=test`, datasets/imagenet.py:61), which fsbench never does: validation
    is min(K, 4) per class from the train-folder images not drawn for training, drawn after them by the same
    rule and RNG (the one difference from CoOp). CoOp lists a class folder unsorted (Dassl's
    `listdir_nohidden`, dassl/utils/tools.py:135-145), i.e. in the file system's order; fsbench's is sorted,
    and the draws agree where the file system lists sorted.

    A method asking for another validation size (`val_shots`) gets that many per class by the same rule."""

    summary = ("CoOp / Dassl's draw (train first, global seed, small classes keep what they have); "
               "ImageNet val from unused train images")

    def draw(self, data, shots, seed, val_shots=None, repeat=False):
        val_k = _check(shots, val_shots)
        rng = random.Random(seed)  # == random.seed(seed) (Dassl set_random_seed)
        if data.name not in TRAIN_FOLDER_DATASETS:
            train = fewshot(by_class(data.train), shots, rng, repeat=False)
            val = fewshot(by_class(data.val), val_k, rng, repeat=False)
            return FewShotSplit(data.name, shots, seed, tuple(train), tuple(val), self.name)
        folder = data.split("train+val")
        train = fewshot(by_class(folder), shots, rng, repeat=False)
        val = _val_from_rest(folder, train, val_k, rng)
        return FewShotSplit(data.name, shots, seed, tuple(train), tuple(val), self.name, "train+val", "train+val")


def _val_from_rest(folder: list[Item], train: list[int], val_k: int, rng: random.Random) -> list[int]:
    """`val_k` per class (Dassl's rule, no repeat) from the train-folder images not in `train`."""
    drawn = set(train)
    return fewshot(by_class(folder, [i for i in range(len(folder)) if i not in drawn]), val_k, rng, repeat=False)


def coop_train_folder_val(data: DatasetSplits, train: list[int], shots: int, seed: int, val_k: int) -> list[int]:
    """The coop sampler's ImageNet validation for a given train draw (positions in "train+val"), e.g. one
    imported from CoOp's split file: the RNG is advanced past CoOp's own train draw of (K, seed) first, so a
    train draw equal to CoOp's gets the sampler's validation."""
    folder = data.split("train+val")
    rng = random.Random(seed)
    fewshot(by_class(folder), shots, rng, repeat=False)
    return _val_from_rest(folder, train, val_k, rng)
