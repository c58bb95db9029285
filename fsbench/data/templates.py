"""Zero-shot prompt templates, one per dataset, keyed by registry name.

Copied from CoOp's `CUSTOM_TEMPLATES` (KaiyangZhou/CoOp, trainers/zsclip.py, Zhou et al. 2022).
CLIP-LoRA's official code keeps these templates in comments and uses "a photo of a {}." for every
dataset (MaxZanella/CLIP-LoRA, datasets/*.py); that one is `base.TRAIN_TEMPLATE`.
"""

from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of a {}."

TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    # not CoOp datasets: the plain CLIP template
    "imagefolder": DEFAULT_TEMPLATE,
    "synthetic": DEFAULT_TEMPLATE,
}
