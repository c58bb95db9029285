"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022, arXiv 2109.01134):
learnable context vectors shared by all classes, "[SOS][V1]...[Vn][CLASS].[EOS]", trained through
the frozen text encoder on augmented images.

Defaults follow the official code (github.com/KaiyangZhou/CoOp: trainers/coop.py,
configs/trainers/CoOp/vit_b16*.yaml, COOP.md) and Dassl's optimiser defaults: 16 context
vectors drawn from N(0, 0.02) (or the words "a photo of a", then 4 vectors), class token at the
end, SGD lr 0.002 (momentum 0.9, weight decay 5e-4), one warm-up epoch at a constant 1e-5 then a
cosine over the epochs, batch 32 with Dassl's drop-last rule, random resized crop (scale 0.08-1,
bicubic) + flip, and 50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots (50 for every shot count on
ImageNet). The prompts live in `fsbench.prompts`, the recipe and loop in `fsbench.training`.

The image tower stays frozen, so `logits` scores cached, L2-normalised image features
(`eval_input = "features"`): the test split is encoded once per backbone, not once per run.

Subclasses (coop_4ctx, kgcoop, prograd) change defaults (`Config`), the loss (`loss`) or the
backward (`backward`); everything else is shared.

Deviations: mixed precision is bf16 autocast on GPU (CoOp casts CLIP to fp16); only the "end"
class-token position and the unified (not class-specific) context are implemented; the test images
are encoded once without autocast by the feature cache (CoOp encodes them in fp16 each run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.augment import train_transform
from fsbench.checks import check_at_least, check_crop_scale, check_positive
from fsbench.method import FewShotData, Method, register_method
from fsbench.prompts import Prompts, build_prompts, encode_prompts, frozen_image_features
from fsbench.training import (
    Backward,
    DasslRecipe,
    coop_epochs,
    dassl_lr,
    dassl_steps,
    fewshot_image_batches,
    train_epochs,
)

__all__ = ["CoOp", "CoOpConfig", "Prompts", "build_prompts", "coop_epochs", "dassl_lr", "encode_prompts",
           "frozen_image_features", "train_epochs"]


@dataclass
class CoOpConfig(DasslRecipe):
    """CoOp hyper-parameters (official ViT-B/16 configs, M=16, "end"); the recipe fields (lr,
    momentum, weight_decay, batch_size, epochs, warmup_epochs, warmup_lr) come from `DasslRecipe`."""

    n_ctx: int = 16  # context vectors; ignored when `init` gives words
    init: str = "random"  # "random" = N(0, 0.02); or init words, e.g. "a photo of a" (n_ctx = their tokens)
    logit_scale: float = 100.0  # exp(CLIP's learned temperature) for the OpenAI weights
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # Dassl RandomResizedCrop

    section: ClassVar[str] = "coop"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.section, "logit_scale", self.logit_scale)
        check_at_least(self.section, "n_ctx", self.n_ctx, 1)
        check_crop_scale(self.section, "crop_scale", self.crop_scale)
        if not self.init.strip():
            raise ValueError('init must be "random" or initialisation words such as "a photo of a"')


@register_method("coop")
class CoOp(Method):
    """Unified learnable context in front of the class name; only the context is trained."""

    Config = CoOpConfig
    input_kind = "images"
    eval_input = "features"  # the image tower is frozen: logits score cached features
    paper = "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022"
    summary = "CoOp: 16 learnable context vectors shared by all classes, text encoder frozen"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build(cfg.n_ctx)
        epochs = cfg.epochs or self.default_epochs()
        self.config = dataclasses.replace(cfg, epochs=epochs)  # the stored config records what ran
        self.prepare(train)
        bb = ctx.backbone
        tf = train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale)
        batches = fewshot_image_batches(train, tf, cfg.batch_size, ctx.generator())
        train_epochs(ctx, cfg.optimizer([self.context]), batches, self.loss, epochs,
                     dassl_steps(len(train), cfg.batch_size), cfg.schedule(epochs), f"train {self.name}",
                     backward=self.backward_fn())
        self._finish()

    def default_epochs(self) -> int:
        """CoOp's per-shot schedule (COOP.md); subclasses override with their own."""
        return coop_epochs(self.ctx.shots, self.ctx.dataset)

    def prepare(self, train: FewShotData) -> None:
        """Hook before training (e.g. KgCoOp's hand-crafted text features); nothing for CoOp."""

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the scaled cosine logits of augmented images against the learned prompts."""
        return F.cross_entropy(self.scores(images, self.text_features()), labels)

    def scores(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(B, C) logit_scale x cosine of the images' frozen features with class features `text`."""
        return self.config.logit_scale * frozen_image_features(self.ctx.backbone, images) @ text.T

    def text_features(self) -> torch.Tensor:
        """(C, D) normalised features of the learned prompts (differentiable in the context)."""
        return encode_prompts(self.ctx.backbone.model, self.prompts, self.context).float()

    def backward_fn(self) -> Backward | None:
        """A custom backward for the loop (ProGrad's gradient projection); None = plain backward."""
        return None

    def make_prompts(self, n_ctx: int) -> Prompts:
        """The class prompts of `ctx.classnames` around `n_ctx` context slots (init from the config)."""
        ctx = self.ctx
        return build_prompts(ctx.backbone, ctx.classnames, n_ctx, self.config.init, ctx.device, ctx.generator(1))

    def _build(self, n_ctx: int) -> None:
        self.prompts = self.make_prompts(n_ctx)
        self.context = nn.Parameter(self.prompts.init.clone())

    def _finish(self) -> None:
        with torch.no_grad(), self.ctx.autocast():
            self.text = self.text_features()

    def retarget(self) -> None:
        """Unseen classes: the learned context in front of their names (CoCoOp's base-to-new protocol
        for CoOp, Zhou et al. CVPR 2022, Table 1)."""
        self.prompts = self.make_prompts(self.context.shape[0])
        self._finish()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of (N, D) L2-normalised frozen image features (the runner's cached test features)."""
        return self.config.logit_scale * x.float() @ self.text.T

    def cosine_scale(self) -> float | None:
        return self.config.logit_scale if type(self).logits is CoOp.logits else None  # features and text normalised

    def trainable_params(self) -> int:
        return self.context.numel()

    def inference_overhead(self) -> int:
        return self.context.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"context": self.context.detach()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build(tensors["context"].shape[0])
        self.context = nn.Parameter(tensors["context"].to(self.ctx.device), requires_grad=False)
        self._finish()

