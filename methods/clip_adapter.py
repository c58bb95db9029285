"""CLIP-Adapter (Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature Adapters",
IJCV 2023, arXiv 2110.04544): a bottleneck MLP on the image feature, blended residually.

    f' = ratio * relu(W2 relu(W1 f)) + (1 - ratio) * f,   logits = 100 * norm(f') norm(t)^T

Defaults follow the official code (github.com/gaopengcuhk/CLIP-Adapter: clip_adapter.py):
reduction 4, ReLU after both linears, no biases, ratio 0.2, the dataset's CoOp template for the
text classifier. The repository says to train it with CoOp's commands, so the optimiser is
CoOp's (Dassl) recipe: SGD lr 0.002, momentum 0.9, weight decay 5e-4, one warm-up epoch at 1e-5
then cosine, batch 32, 50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots; the last epoch is kept.

Deviations: training reads the cached, L2-normalised features of the un-augmented images (the
official code encodes random crops each step), so the residual blends normalised features; the
LP++ authors' reproduction uses lr 0.01 instead of CoOp's 0.002.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.method import FewShotData, Method, count_trainable, register_method
from methods.coop import coop_epochs, dassl_lr, feature_batches, steps_per_epoch, train_epochs


@dataclass
class CLIPAdapterConfig:
    """CLIP-Adapter hyper-parameters (official code; CoOp's Dassl optimiser)."""

    reduction: int = 4  # bottleneck width = D / reduction
    ratio: float = 0.2  # residual ratio of the adapted feature
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    epochs: int = 0  # 0 = CoOp's per-shot schedule (50 / 100 / 200)
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.reduction < 1 or not 0 <= self.ratio <= 1 or self.batch_size < 1 or self.epochs < 0:
            raise ValueError("need reduction >= 1, 0 <= ratio <= 1, batch_size >= 1 and epochs >= 0")


def adapter_mlp(dim: int, reduction: int, seed: int) -> nn.Sequential:
    """Linear(D, D/r) - ReLU - Linear(D/r, D) - ReLU, no biases, seeded PyTorch default init."""
    hidden = max(1, dim // reduction)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                             nn.Linear(hidden, dim, bias=False), nn.ReLU(inplace=True))


@register_method("clip_adapter")
class CLIPAdapter(Method):
    """Residual bottleneck adapter on the frozen image feature, trained on cached features."""

    Config = CLIPAdapterConfig
    input_kind = "features"
    paper = "Gao et al., CLIP-Adapter: Better Vision-Language Models with Feature Adapters, IJCV 2023"
    summary = "CLIP-Adapter: residual bottleneck MLP (ratio 0.2) on the image feature"

    def _build(self) -> None:
        ctx = self.ctx
        self.adapter = adapter_mlp(ctx.backbone.embed_dim, self.config.reduction, ctx.seed).to(ctx.device)
        self.text = ctx.text_weights().to(ctx.device)

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build()
        epochs = cfg.epochs or coop_epochs(ctx.shots, ctx.data.name)
        opt = torch.optim.SGD(self.adapter.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        batches = feature_batches(train.features.to(ctx.device), train.labels.to(ctx.device), cfg.batch_size,
                                  ctx.generator(1))
        train_epochs(ctx, opt, batches, lambda x, y: F.cross_entropy(self.logits(x), y), epochs,
                     steps_per_epoch(len(train), cfg.batch_size),
                     lambda e: dassl_lr(e, cfg.lr, epochs, cfg.warmup_epochs, cfg.warmup_lr), "train clip_adapter")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        ratio = self.config.ratio
        feats = F.normalize(ratio * self.adapter(x).float() + (1 - ratio) * x, dim=-1)
        return self.config.logit_scale * feats @ self.text.T

    def trainable_params(self) -> int:
        return count_trainable(self.adapter)

    def inference_overhead(self) -> int:
        return self.trainable_params()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        self.adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in tensors.items()})
