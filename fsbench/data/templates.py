"""Zero-shot prompt templates, one per dataset, keyed by registry name.

Copied from CoOp's `CUSTOM_TEMPLATES` (KaiyangZhou/CoOp, trainers/zsclip.py, Zhou et al. 2022).
CLIP-LoRA's official code keeps these templates in comments and uses "a photo of a {}." for every
dataset (MaxZanella/CLIP-LoRA, datasets/*.py); that one is `base.TRAIN_TEMPLATE`.

`IMAGENET_ENSEMBLE` is the 7-template ImageNet ensemble that Tip-Adapter, Tip-Adapter-F, LP++ and
TaskRes use for their ImageNet text classifier (`ensemble_templates`).
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

# The 7 ImageNet templates of Tip-Adapter (gaopengcuhk/Tip-Adapter d0e2d6f, datasets/imagenet.py:177),
# also LP++'s (FereshteShakeri/FewShot-CLIP-Strong-Baseline f81054f, datasets/imagenet.py:178) and
# TaskRes's IMAGENET_TEMPLATES_SELECT (geekyutao/TaskRes 5195359, trainers/imagenet_templates.py:86),
# a subset of CLIP's 80 ImageNet prompts (openai/CLIP, Prompt_Engineering_for_ImageNet.ipynb).
IMAGENET_ENSEMBLE: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def ensemble_templates(dataset: str, templates: list[str], keep_dataset: bool = False) -> list[str]:
    """The templates whose embeddings Tip-Adapter, LP++ and TaskRes average for `dataset`.

    On ImageNet their official code uses `IMAGENET_ENSEMBLE` (Tip-Adapter, LP++: those 7 only;
    TaskRes, `keep_dataset=True`: those 7 plus the dataset's own template, trainers/taskres.py:125-129);
    on every other dataset the dataset's `templates`.
    """
    if dataset != "imagenet":
        return list(templates)
    return [*IMAGENET_ENSEMBLE, *(templates if keep_dataset else [])]
