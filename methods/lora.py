"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models",
CVPRW 2024, arXiv 2405.18541): low-rank updates on the attention projections of both CLIP
encoders, one fixed recipe for every dataset and shot count.

Defaults follow the official code (github.com/MaxZanella/CLIP-LoRA: main.py, lora.py,
loralib/): rank 2, alpha 1, scaling alpha/sqrt(rank), dropout 0.25 on the LoRA input, A
Kaiming-uniform and B zero, AdamW (lr 2e-4, wd 1e-2, betas 0.9/0.999), cosine to 1e-6 over
500 x K steps of batch 32, cross-entropy on 100 x cosine similarity with the text features
recomputed through the adapted text encoder every step ("a photo of a {}."), and the last
iterate evaluated with the update merged into the weights.

Deviation: positions are index sets over a tower's depth. For 12-layer towers they equal the
official lists; for deeper towers (ViT-L/14 vision, 24 layers) we scale them with the depth,
and "all" means every layer (the official list for ViT-L/14 covers layers 0-20 only).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from fsbench.attention import SplitAttention
from fsbench.errors import RunFailed
from fsbench.images import augmented_batches
from fsbench.method import FewShotData, Method, count_trainable, register_method, zero_shot_weights

MATRICES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
POSITIONS = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top1", "top2", "top3")


@dataclass
class LoRAConfig:
    """CLIP-LoRA hyper-parameters (official defaults)."""

    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25  # on the LoRA branch input
    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 32
    iters_per_shot: int = 500  # total steps = iters_per_shot x shots
    eta_min: float = 1e-6  # cosine schedule floor
    matrices: list[str] = field(default_factory=lambda: ["q", "k", "v"])  # any of q, k, v, o
    encoder: str = "both"  # vision | text | both
    position: str = "all"  # see POSITIONS
    logit_scale: float = 100.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not self.matrices or any(m not in MATRICES for m in self.matrices):
            raise ValueError(f"matrices must be a non-empty subset of q, k, v, o, got {self.matrices}")
        if self.encoder not in ("vision", "text", "both"):
            raise ValueError(f"encoder must be vision, text or both, got {self.encoder!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if not 0 <= self.dropout < 1 or self.batch_size < 1 or self.iters_per_shot < 1:
            raise ValueError("need 0 <= dropout < 1, batch_size >= 1 and iters_per_shot >= 1")


class LoRALinear(nn.Module):
    """`base_layer(x) + scaling * B A dropout(x)`, mergeable into `base_layer.weight`."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        like = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0 so W is unchanged
        self.scaling = alpha / math.sqrt(rank)  # official CLIP-LoRA, not peft's alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


def layer_indices(position: str, depth: int) -> list[int]:
    """Blocks adapted for `position` in a tower of `depth` blocks (official sets at depth 12)."""
    third, half = depth // 3, depth // 2
    spans = {"all": (0, depth), "bottom": (0, third), "mid": (third, 2 * third),
             "up": (2 * third, depth), "half-bottom": (0, half), "half-up": (half, depth),
             "top1": (depth - 1, depth), "top2": (depth - 2, depth), "top3": (depth - 3, depth)}
    lo, hi = spans[position]
    return list(range(lo, hi))


def towers(model: nn.Module, encoder: str) -> Iterator[nn.Module]:
    if encoder in ("vision", "both"):
        yield model.visual.transformer
    if encoder in ("text", "both"):
        yield model.transformer


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[LoRALinear]:
    """Wrap the chosen projections of the chosen blocks in `LoRALinear`; returns the layers."""
    layers = []
    for tower in towers(model, cfg.encoder):
        blocks = list(tower.resblocks)
        for i in layer_indices(cfg.position, len(blocks)):
            attn = blocks[i].attn
            if not isinstance(attn, SplitAttention):
                raise TypeError("LoRA needs the unfused attention of fsbench.attention")
            for m in cfg.matrices:
                lora = LoRALinear(getattr(attn, MATRICES[m]), cfg.rank, cfg.alpha, cfg.dropout)
                setattr(attn, MATRICES[m], lora)
                layers.append(lora)
    return layers


def train_transform(image_size: int, mean, std, scale) -> transforms.Compose:
    """CLIP-LoRA's augmentation: RandomResizedCrop (bicubic, scale 0.08-1) + flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


@register_method("lora")
class CLIPLoRA(Method):
    """LoRA on q/k/v of both CLIP encoders, trained end to end on augmented images."""

    Config = LoRAConfig
    input_kind = "images"
    paper = "Zanella & Ben Ayed, Low-Rank Few-Shot Adaptation of Vision-Language Models, CVPRW 2024"
    summary = "CLIP-LoRA: rank-2 LoRA on q,k,v of both encoders, one recipe for all datasets"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self.model = copy.deepcopy(ctx.backbone.model)  # the shared frozen model stays untouched
        self.layers = inject_lora(self.model, cfg)
        self._frozen_text: torch.Tensor | None = None
        params = [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]
        total = cfg.iters_per_shot * ctx.shots
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=cfg.eta_min)
        scaler = torch.amp.GradScaler(enabled=ctx.amp_dtype == torch.float16)
        self.model.train()
        batches = self._batches(train)
        for step in ctx.track(range(total), total, "train lora"):
            images, labels = next(batches)
            with ctx.autocast():
                logits = self._logits(images.to(ctx.device, non_blocking=True), self._text())
                loss = F.cross_entropy(logits.float(), labels.to(ctx.device))
            if not torch.isfinite(loss):
                raise RunFailed(f"non-finite loss ({loss.item()}) at step {step + 1} of {total}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        self.model.eval()
        for layer in self.layers:
            layer.merge()
        with torch.no_grad(), ctx.autocast():
            self.text = self._text().float()

    def _text(self) -> torch.Tensor:
        """Class embeddings with the single training template, through the (adapted) text tower."""
        if self.config.encoder == "vision":  # text tower frozen: compute once
            if self._frozen_text is None:
                with torch.no_grad():
                    self._frozen_text = self._encode_classes()
            return self._frozen_text
        return self._encode_classes()

    def _encode_classes(self) -> torch.Tensor:
        return zero_shot_weights(self.ctx.backbone, self.ctx.classnames, [self.ctx.data.train_template],
                                 self.ctx.device, self.model)

    def _logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.encoder != "text"):
            feats = F.normalize(self.model.encode_image(images).float(), dim=-1)
        return self.config.logit_scale * feats @ text.float().T

    def _batches(self, train: FewShotData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bb = self.ctx.backbone
        tf = train_transform(bb.image_size, bb.mean, bb.std, self.config.crop_scale)
        return augmented_batches(train.items, train.image_root, tf, self.config.batch_size,
                                 self.ctx.generator())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x, self.text)

    def trainable_params(self) -> int:
        return count_trainable(*self.layers)
