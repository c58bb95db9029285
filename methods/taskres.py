"""TaskRes (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023,
arXiv 2211.10277): a learnable residual, scaled by alpha, added to the frozen zero-shot text
classifier.

    logits = 100 * norm(f) norm(t + alpha * x)^T,   x initialised at zero

Defaults follow the official code (github.com/geekyutao/TaskRes 5195359: trainers/taskres.py,
configs/trainers/TaskRes/adam_lr2e-3_B256_ep*.yaml, train_regular.sh): the base t is the mean of
the un-normalised text embeddings of the dataset's CoOp template (on ImageNet, of the 7 templates of
IMAGENET_TEMPLATES_SELECT plus "a photo of a {}.", trainers/taskres.py:125-129), with the class
names as CoOp's split files write them (underscores kept, trainers/taskres.py:134; see
`official_classnames`), alpha 0.5 (1.0 on Flowers102), Adam lr 2e-3 (2e-4 on ImageNet) with
Dassl's weight decay 5e-4, one warm-up epoch at 1e-5 then cosine, batch 256 with Dassl's drop-last
rule, 100 epochs for 1-4 shots and 200 for 8-16; the last epoch is kept. The per-dataset values
that `fit` resolves (scale, lr, epochs) are written back into `self.config`.

Deviations: training reads the cached features of the un-augmented images (the official code
encodes random crops each step).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.checks import check_betas, check_non_negative, check_positive
from fsbench.data.base import Item
from fsbench.data.templates import ensemble_templates
from fsbench.method import FewShotData, Method, register_method
from fsbench.text import encode_tokens
from fsbench.training import DasslSchedule, check_dassl_schedule, dassl_steps, shuffled_batches, train_epochs

# Datasets whose CoOp split-file class names hold underscores and no spaces, so the names with
# underscores are the prompt names with spaces replaced (TaskRes keeps them; see `official_classnames`).
UNDERSCORE_NAMES = ("caltech101", "food101", "oxford_pets", "ucf101")


@dataclass
class TaskResFields:
    """TaskRes's own fields and its Adam (Dassl's): the first part of `TaskResConfig`'s stored keys."""

    scale: float | None = None  # alpha; None = official: 0.5, 1.0 on oxford_flowers
    lr: float | None = None  # None = official: 2e-3, 2e-4 on imagenet
    weight_decay: float = 5e-4  # Dassl's default
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Dassl's Adam betas


@dataclass
class TaskResConfig(DasslSchedule, TaskResFields):
    """TaskRes hyper-parameters (official scripts, regular base): its own fields, then Dassl's schedule
    (`fsbench.training.DasslSchedule`), then the logit scale."""

    batch_size: int = 256
    epochs: int = 0  # 0 = official: 100 for 1-4 shots, 200 for 8-16
    logit_scale: float = 100.0

    section: ClassVar[str] = "taskres"

    def __post_init__(self) -> None:
        if self.scale is not None:
            check_non_negative("taskres", "scale", self.scale)
        if self.lr is not None:
            check_positive("taskres", "lr", self.lr)
        check_positive("taskres", "logit_scale", self.logit_scale)
        check_non_negative("taskres", "weight_decay", self.weight_decay)
        check_betas("taskres", "betas", self.betas)
        check_dassl_schedule("taskres", self)


def official(dataset: str, shots: int) -> tuple[float, float, int]:
    """(alpha, lr, epochs) of the official scripts for `dataset` and `shots`."""
    scale = 1.0 if dataset == "oxford_flowers" else 0.5
    lr = 2e-4 if dataset == "imagenet" else 2e-3
    return scale, lr, 100 if shots <= 4 else 200


def sun397_name(folder: str) -> str:
    """CoOp's SUN397 class name of an image folder ("a/apartment_building/outdoor" ->
    "outdoor apartment_building"; CoOp datasets/sun397.py:69-75)."""
    return " ".join(folder.split("/")[1:][::-1])


def official_classnames(dataset: str, names: list[str], items: Sequence[tuple[int, Item]] = ()) -> list[str]:
    """Class names as TaskRes writes them into its base prompts: CoOp's split-file names, underscores
    kept (trainers/taskres.py:134 formats the raw names; CoOp's zero-shot code replaces "_" by " ").

    fsbench's names have "_" replaced by " ". For `UNDERSCORE_NAMES` the raw names have no spaces, so
    the replacement is undone; SUN397's raw names join folder parts with spaces, so they are rebuilt
    from the folder of a (label, item) of each class in `items` (classes without one keep their name).
    """
    if dataset in UNDERSCORE_NAMES:
        return [n.replace(" ", "_") for n in names]
    if dataset == "sun397":
        folders = {label: os.path.dirname(it.path) for label, it in items}
        return [sun397_name(folders[i]) if i in folders else n for i, n in enumerate(names)]
    return list(names)


@torch.no_grad()
def base_text_features(method: Method, classnames: list[str]) -> torch.Tensor:
    """(C, D): per class, the mean of the un-normalised embeddings of its template prompts
    (on ImageNet the official 7-template ensemble plus the dataset's template)."""
    ctx = method.ctx
    per_template = []
    for template in ensemble_templates(ctx.dataset, ctx.templates, keep_dataset=True):
        tokens = ctx.backbone.tokenize([template.format(c) for c in classnames]).to(ctx.device)
        per_template.append(encode_tokens(ctx.backbone.model, tokens, normalize=False).float())
    return torch.stack(per_template).mean(0)


@register_method("taskres")
class TaskRes(Method):
    """Zero-shot classifier plus a learned, scaled residual; encoders frozen."""

    Config = TaskResConfig
    input_kind = "features"
    paper = "Yu et al., Task Residual for Tuning Vision-Language Models, CVPR 2023"
    summary = "TaskRes: learnable residual (alpha 0.5) on the frozen zero-shot text classifier"

    def _build(self, train: FewShotData | None = None) -> None:
        items = list(zip(train.labels.tolist(), train.items, strict=True)) if train is not None else []
        self.base = base_text_features(self, official_classnames(self.ctx.dataset, self.ctx.classnames, items))
        self.residual = nn.Parameter(torch.zeros_like(self.base))
        self.scale = self.config.scale
        if self.scale is None:
            self.scale = official(self.ctx.dataset, self.ctx.shots)[0]

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build(train)
        _, lr, epochs = official(ctx.dataset, ctx.shots)
        lr, epochs = cfg.lr or lr, cfg.epochs or epochs
        self.config = dataclasses.replace(cfg, scale=self.scale, lr=lr, epochs=epochs)
        opt = torch.optim.Adam([self.residual], lr=lr, weight_decay=cfg.weight_decay,
                               betas=tuple(cfg.betas))
        batches = shuffled_batches(train.features.to(ctx.device), train.labels.to(ctx.device), cfg.batch_size,
                                   ctx.generator(1))
        train_epochs(ctx, opt, batches, lambda x, y: F.cross_entropy(self.logits(x), y), epochs,
                     dassl_steps(len(train), cfg.batch_size),
                     cfg.lr_schedule(lr, epochs), "train taskres")

    def classifier(self) -> torch.Tensor:
        return F.normalize(self.base + self.scale * self.residual, dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * F.normalize(x.float(), dim=-1) @ self.classifier().T

    def trainable_params(self) -> int:
        return self.residual.numel()

    def inference_overhead(self) -> int:
        return self.residual.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"residual": self.residual.detach(), "base": self.base}  # SUN397's base needs the train folders

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        with torch.no_grad():
            self.residual.copy_(tensors["residual"])
        if "base" in tensors:
            self.base = tensors["base"].to(self.residual.device)
