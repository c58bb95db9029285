"""The CoOp-layout test trees the reference samplers are proven on (tests/test_samplers_ref.py and
tests/fixtures/samplers/make_fixtures.py build the same trees with the generators of tests/datagen.py).

Class sizes vary, some classes have fewer train or val images than K (the small-class rules), and
the split lists are shuffled, so a class's first appearance in a list is not its label order.
"""

from __future__ import annotations

from pathlib import Path

from datagen import make_aircraft, make_coop_dataset, make_imagenet

PETS = ("abyssinian", "american_bulldog", "beagle", "pug", "sphynx")
PETS_COUNTS = ((20, 5, 2), (17, 2, 2), (3, 4, 2), (16, 1, 2), (1, 6, 2))  # train/val/test per class
EUROSAT = ("AnnualCrop", "Forest", "SeaLake", "Highway")
EUROSAT_COUNTS = ((18, 4, 1), (5, 3, 1), (24, 8, 1), (2, 1, 1))
AIRCRAFT = ("707-320", "A340-500", "F/A-18", "Falcon 2000", "Tu-154")
AIRCRAFT_COUNTS = ((20, 4, 1), (16, 3, 1), (9, 9, 1), (30, 2, 1), (4, 5, 1))
IMAGENET_TRAIN = (20, 23, 26, 21)  # the train folder; K=16 draws 16 + 4 per class

SHOTS = (1, 2, 4, 8, 16)
IMAGENET_SHOTS = (1, 2, 4, 16, 32)  # 32: more than any class has (CLIP-LoRA's code fails, CoOp keeps them all)
SEEDS = (1, 2, 3)
# fsbench dataset name -> CLIP-LoRA's build_dataset name
DATASETS = {"oxford_pets": "oxford_pets", "eurosat": "eurosat", "fgvc_aircraft": "fgvc", "imagenet": "imagenet"}


def make_trees(root: Path, clip_lora_layout: bool = False) -> Path:
    """Write the four trees under `root` in CoOp's folder names (or CLIP-LoRA's); returns `root`."""
    make_coop_dataset(root, "oxford_pets", clip_lora_layout, PETS, per_class=PETS_COUNTS, shuffle_seed=11)
    make_coop_dataset(root, "eurosat", clip_lora_layout, EUROSAT, per_class=EUROSAT_COUNTS, shuffle_seed=12)
    make_aircraft(root, per_class=AIRCRAFT_COUNTS, shuffle_seed=13, variants=AIRCRAFT)
    make_imagenet(root, clip_lora_layout, n_classes=len(IMAGENET_TRAIN), n_val=1, train_counts=IMAGENET_TRAIN)
    return root


def shots_of(dataset: str) -> tuple[int, ...]:
    return IMAGENET_SHOTS if dataset == "imagenet" else SHOTS
