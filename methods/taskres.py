"""TaskRes (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023,
arXiv 2211.10277): a learnable residual, scaled by alpha, added to the frozen zero-shot text
classifier.

    logits = 100 * norm(f) norm(t + alpha * x)^T,   x initialised at zero

Defaults follow the official code (github.com/geekyutao/TaskRes: trainers/taskres.py,
configs/trainers/TaskRes/adam_lr2e-3_B256_ep*.yaml, train_regular.sh): the base t is the mean of
the un-normalised text embeddings of the dataset's CoOp template, alpha 0.5 (1.0 on Flowers102),
Adam lr 2e-3 (2e-4 on ImageNet) with Dassl's weight decay 5e-4, one warm-up epoch at 1e-5 then
cosine, batch 256, 100 epochs for 1-4 shots and 200 for 8-16; the last epoch is kept.

Deviations: training reads the cached features of the un-augmented images (the official code
encodes random crops each step); on ImageNet the official base also averages 7 extra templates
(IMAGENET_TEMPLATES_SELECT), here the base uses the dataset's templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.method import FewShotData, Method, register_method
from fsbench.text import encode_tokens
from methods.coop import dassl_lr, feature_batches, steps_per_epoch, train_epochs


@dataclass
class TaskResConfig:
    """TaskRes hyper-parameters (official scripts, regular base)."""

    scale: float | None = None  # alpha; None = official: 0.5, 1.0 on oxford_flowers
    lr: float | None = None  # None = official: 2e-3, 2e-4 on imagenet
    weight_decay: float = 5e-4  # Dassl's default
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Dassl's Adam betas
    batch_size: int = 256
    epochs: int = 0  # 0 = official: 100 for 1-4 shots, 200 for 8-16
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 0 or self.warmup_epochs < 0:
            raise ValueError("need batch_size >= 1, epochs >= 0 and warmup_epochs >= 0")


def official(dataset: str, shots: int) -> tuple[float, float, int]:
    """(alpha, lr, epochs) of the official scripts for `dataset` and `shots`."""
    scale = 1.0 if dataset == "oxford_flowers" else 0.5
    lr = 2e-4 if dataset == "imagenet" else 2e-3
    return scale, lr, 100 if shots <= 4 else 200


@torch.no_grad()
def base_text_features(method: Method) -> torch.Tensor:
    """(C, D): per class, the mean of the un-normalised embeddings of its template prompts."""
    ctx = method.ctx
    per_template = []
    for template in ctx.data.templates:
        tokens = ctx.backbone.tokenize([template.format(c) for c in ctx.classnames]).to(ctx.device)
        per_template.append(encode_tokens(ctx.backbone.model, tokens, normalize=False).float())
    return torch.stack(per_template).mean(0)


@register_method("taskres")
class TaskRes(Method):
    """Zero-shot classifier plus a learned, scaled residual; encoders frozen."""

    Config = TaskResConfig
    input_kind = "features"
    paper = "Yu et al., Task Residual for Tuning Vision-Language Models, CVPR 2023"
    summary = "TaskRes: learnable residual (alpha 0.5) on the frozen zero-shot text classifier"

    def _build(self) -> None:
        self.base = base_text_features(self)
        self.residual = nn.Parameter(torch.zeros_like(self.base))
        self.scale = self.config.scale
        if self.scale is None:
            self.scale = official(self.ctx.data.name, self.ctx.shots)[0]

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build()
        _, lr, epochs = official(ctx.data.name, ctx.shots)
        lr, epochs = cfg.lr or lr, cfg.epochs or epochs
        opt = torch.optim.Adam([self.residual], lr=lr, weight_decay=cfg.weight_decay,
                               betas=tuple(cfg.betas))
        batches = feature_batches(train.features.to(ctx.device), train.labels.to(ctx.device), cfg.batch_size,
                                  ctx.generator(1))
        train_epochs(ctx, opt, batches, lambda x, y: F.cross_entropy(self.logits(x), y), epochs,
                     steps_per_epoch(len(train), cfg.batch_size),
                     lambda e: dassl_lr(e, lr, epochs, cfg.warmup_epochs, cfg.warmup_lr), "train taskres")

    def classifier(self) -> torch.Tensor:
        return F.normalize(self.base + self.scale * self.residual, dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * F.normalize(x.float(), dim=-1) @ self.classifier().T

    def trainable_params(self) -> int:
        return self.residual.numel()

    def inference_overhead(self) -> int:
        return self.residual.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"residual": self.residual.detach()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        with torch.no_grad():
            self.residual.copy_(tensors["residual"])
