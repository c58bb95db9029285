"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models", CVPR 2022,
arXiv 2203.05557): CoOp's context plus an image-conditioned bias from a small meta-network.

Defaults follow the official code (github.com/KaiyangZhou/CoOp: trainers/cocoop.py,
configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml): 4 context vectors initialised from
"a photo of a", meta-net Linear(D, D/16)-ReLU-Linear(D/16, W) on the normalised image feature
whose output is added to every context vector, SGD lr 0.002 (momentum 0.9, weight decay 5e-4),
one warm-up epoch at 1e-5 then cosine, batch 1, 10 epochs, random resized crop + flip.

Every image gets its own prompts, so training and evaluation run the text encoder once per image
over all classes: expensive on ImageNet, as in the original. The image tower stays frozen and the
meta-net reads the frozen image feature, so `logits` scores the cached test features
(`eval_input = "features"`): the test split is encoded once per backbone. The prompts live in
`fsbench.prompts`, the recipe and loop in `fsbench.training`.

Deviations: as CoOp (`methods/coop.py`); the meta-net runs in the autocast precision instead of
being cast to fp16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.augment import train_transform
from fsbench.checks import check_at_least, check_crop_scale, check_positive
from fsbench.method import FewShotData, Method, count_trainable, register_method
from fsbench.prompts import build_prompts, encode_prompts, frozen_image_features
from fsbench.training import DasslRecipe, dassl_steps, fewshot_image_batches, train_epochs

TEXT_BATCH = 2048  # prompts per text-encoder call at evaluation (images x classes)


@dataclass
class CoCoOpConfig(DasslRecipe):
    """CoCoOp hyper-parameters (official few-shot config: c4, 10 epochs, batch 1, ctxv1); the recipe
    fields (lr 0.002, momentum, weight_decay, warmup_epochs, warmup_lr) come from `DasslRecipe`."""

    batch_size: int = 1
    epochs: int = 10
    n_ctx: int = 4  # ignored when `init` gives words (then their token count, 4 for "a photo of a")
    init: str = "a photo of a"  # or "random" (N(0, 0.02))
    logit_scale: float = 100.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])

    section: ClassVar[str] = "cocoop"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.section, "logit_scale", self.logit_scale)
        check_at_least(self.section, "epochs", self.epochs, 1)
        check_at_least(self.section, "n_ctx", self.n_ctx, 1)
        check_crop_scale(self.section, "crop_scale", self.crop_scale)


def meta_net(vis_dim: int, ctx_dim: int, seed: int) -> nn.Sequential:
    """Linear(vis, vis/16) - ReLU - Linear(vis/16, ctx) with seeded PyTorch default init."""
    hidden = max(1, vis_dim // 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(vis_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, ctx_dim))


@register_method("cocoop")
class CoCoOp(Method):
    """Context vectors shifted per image by a meta-net bias; text encoder run per image."""

    Config = CoCoOpConfig
    input_kind = "images"
    eval_input = "features"  # the image tower is frozen; the meta-net takes the frozen feature
    paper = "Zhou et al., Conditional Prompt Learning for Vision-Language Models, CVPR 2022"
    summary = "CoCoOp: CoOp context + image-conditioned bias from a meta-net (per-image prompts)"

    def _build(self) -> None:
        cfg, ctx = self.config, self.ctx
        self.prompts = build_prompts(ctx.backbone, ctx.classnames, cfg.n_ctx, cfg.init, ctx.device,
                                     ctx.generator(1))
        self.context = nn.Parameter(self.prompts.init.clone())
        width = self.prompts.prefix.shape[-1]
        self.meta = meta_net(ctx.backbone.embed_dim, width, ctx.seed).to(ctx.device)

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build()
        bb = ctx.backbone
        tf = train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale)
        batches = fewshot_image_batches(train, tf, cfg.batch_size, ctx.generator())

        def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._logits(frozen_image_features(ctx.backbone, images)), labels)

        train_epochs(ctx, cfg.optimizer([self.context, *self.meta.parameters()]), batches, loss_fn, cfg.epochs,
                     dassl_steps(len(train), cfg.batch_size), cfg.schedule(cfg.epochs), "train cocoop")
        self.meta.eval()

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of normalised image features, each image with its own prompts."""
        shifted = self.context.unsqueeze(0) + self.meta(feats).unsqueeze(1)  # (B, n_ctx, W)
        text = encode_prompts(self.ctx.backbone.model, self.prompts, shifted)  # (B, C, D)
        return self.config.logit_scale * torch.einsum("bd,bcd->bc", feats, text.float())

    def retarget(self) -> None:
        """Unseen classes: the learned context and meta-net with their names (CoCoOp's own protocol)."""
        ctx = self.ctx
        self.prompts = build_prompts(ctx.backbone, ctx.classnames, self.context.shape[0], self.config.init,
                                     ctx.device, ctx.generator(1))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of (N, D) L2-normalised frozen image features (the meta-net reads the same feature)."""
        feats, per = x.float(), max(1, TEXT_BATCH // self.ctx.num_classes)
        with self.ctx.autocast():  # the runner does not autocast the cached-feature path; the text tower does
            return torch.cat([self._logits(feats[i:i + per]) for i in range(0, len(feats), per)]).float()

    def trainable_params(self) -> int:
        return count_trainable(self.context, self.meta)

    def inference_overhead(self) -> int:
        return self.trainable_params()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        meta = {f"meta.{k}": v for k, v in self.meta.state_dict().items()}
        return {"context": self.context.detach(), **meta}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        with torch.no_grad():
            self.context.copy_(tensors["context"])
        self.meta.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("meta.")})
        self.meta.eval()
