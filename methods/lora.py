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
official lists; for deeper towers (ViT-L/14 vision, 24 layers) "all", "half-bottom" and "half-up"
equal the official ViT-L/14 lists (all 24 layers since the official commit e6bf706, 2024-09-12;
loralib/utils.py INDEX_POSITIONS_VISION), and the positions the official code defines for 12-layer
towers only (bottom, mid, up, top1-3) are scaled with the depth.
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

from fsbench.attention import attention_layers, fused_state_dict, projections
from fsbench.augment import device_batches, to_uint8_tensor
from fsbench.backbones import BackboneInfo
from fsbench.checks import (
    check_at_least,
    check_betas,
    check_crop_scale,
    check_fraction,
    check_non_negative,
    check_positive,
)
from fsbench.errors import ConfigError, RunFailed
from fsbench.images import augmented_batches
from fsbench.method import FewShotData, Method, count_trainable, register_method
from fsbench.text import bucket_tokens, encode_buckets, text_tower

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
    # "device": images decoded once to uint8 tensors on the training device, crops drawn as
    # torchvision does and resized there in batches (fsbench.augment); "pil": torchvision's PIL
    # transforms on the CPU, one image at a time (the official code's path); "auto": "device"
    # on CUDA, "pil" on CPU (where per-image PIL crops of small images are the faster path)
    augment: str = "auto"
    text_buckets: int = 4  # prompt length groups per text pass (fsbench.text.bucket_tokens); same maths

    def __post_init__(self) -> None:
        check_at_least("lora", "rank", self.rank, 1)
        for name in ("alpha", "lr", "logit_scale"):
            check_positive("lora", name, getattr(self, name))
        check_non_negative("lora", "weight_decay", self.weight_decay)
        check_non_negative("lora", "eta_min", self.eta_min)
        check_betas("lora", "betas", self.betas)
        check_crop_scale("lora", "crop_scale", self.crop_scale)
        check_fraction("lora", "dropout", self.dropout)
        check_at_least("lora", "batch_size", self.batch_size, 1)
        check_at_least("lora", "iters_per_shot", self.iters_per_shot, 1)
        if not self.matrices or any(m not in MATRICES for m in self.matrices):
            raise ValueError(f"matrices must be a non-empty subset of q, k, v, o, got {self.matrices}")
        if self.encoder not in ("vision", "text", "both"):
            raise ValueError(f"encoder must be vision, text or both, got {self.encoder!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if self.augment not in ("auto", "device", "pil"):
            raise ValueError(f"augment must be 'auto', 'device' or 'pil', got {self.augment!r}")
        if self.text_buckets < 1:
            raise ValueError(f"text_buckets must be >= 1, got {self.text_buckets}")


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


def attention_towers(model: nn.Module, encoder: str) -> dict[str, list[nn.Module]]:
    """The attention layers of the chosen towers, in depth order (`fsbench.attention.attention_layers`):
    open_clip's blocks, timm's (SigLIP, EVA-CLIP) with their fused `qkv` split into q/k/v slices."""
    found = {}
    if encoder in ("vision", "both"):
        found["vision"] = attention_layers(model.visual)
    if encoder in ("text", "both"):
        found["text"] = attention_layers(getattr(text_tower(model), "transformer", None))
    return found


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> list[LoRALinear]:
    """Wrap the chosen projections of the chosen blocks in `LoRALinear`; returns the layers.

    A tower without attention (ConvNeXt's vision tower) is skipped when `encoder` is "both" and
    is a `ConfigError` when it is the only tower asked for.
    """
    layers = []
    for name, blocks in attention_towers(model, cfg.encoder).items():
        if not blocks and cfg.encoder != "both":
            raise ConfigError(f"lora.encoder={cfg.encoder}: the {name} tower of this backbone has no attention "
                              "layers to adapt (ConvNeXt and ResNet vision towers); use encoder=text")
        for i in layer_indices(cfg.position, len(blocks)) if blocks else []:
            targets = projections(blocks[i])
            for m in cfg.matrices:
                owner, attr = targets[m]
                lora = LoRALinear(getattr(owner, attr), cfg.rank, cfg.alpha, cfg.dropout)
                setattr(owner, attr, lora)
                layers.append(lora)
    if not layers:
        raise ConfigError(f"lora.encoder={cfg.encoder}: no attention layer fsbench can adapt in this backbone")
    return layers


def _effective(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) a projection applies, LoRA update included."""
    if isinstance(linear, LoRALinear):
        delta = 0 if linear.merged else linear.delta_weight()
        return linear.base_layer.weight + delta, linear.base_layer.bias
    return linear.weight, linear.bias


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a LoRA-adapted CLIP in open_clip's own format, updates merged.

    Every unfused projection is fused back (`nn.MultiheadAttention`'s `in_proj_weight`, timm's
    `qkv`), so the result loads into a plain open_clip model (`--checkpoint`).
    """
    return fused_state_dict(model, _effective)


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

    @classmethod
    def supports(cls, backbone: BackboneInfo) -> str | None:
        """Attention layers are the targets: a tower without them (ConvNeXt, ResNet) is left out."""
        if not backbone.vision_attention and not backbone.text_attention:
            return "no attention layers in either tower"
        if not backbone.vision_attention:
            return "text tower only: the vision tower has no attention layers"
        if not backbone.text_attention:
            return "vision tower only: the text tower is a Hugging Face model"
        return None

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self.prepare()
        params = self.params
        total = cfg.iters_per_shot * ctx.shots
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=cfg.eta_min)
        scaler = torch.amp.GradScaler(enabled=ctx.amp_dtype == torch.float16)
        self.model.train()
        batches = self._batches(train)
        ctx.curves.start("train lora")
        losses, lrs = [], []
        for step in ctx.track(range(total), total, "train lora"):
            loss = self.train_loss(*next(batches))
            losses.append(loss.detach().reshape(()))
            lrs.append(opt.param_groups[0]["lr"])
            if (step + 1) % 50 == 0 or step + 1 == total:  # recorded and checked every 50 steps: one sync
                values = torch.stack(losses).float().cpu()
                ctx.curves.losses(values.tolist(), lrs)
                losses, lrs = [], []
                if not torch.isfinite(values).all():
                    raise RunFailed(f"non-finite loss in steps {step // 50 * 50 + 1}-{step + 1} of {total}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        self.finish()

    def prepare(self) -> None:
        """Start of `fit`: copy the frozen model, add LoRA, tokenise the class prompts once."""
        cfg, ctx = self.config, self.ctx
        self.model = copy.deepcopy(ctx.backbone.model)  # the shared frozen model stays untouched
        self.params = self.adapt(self.model)
        self._frozen_text: torch.Tensor | None = None
        prompts = [ctx.train_template.format(c) for c in ctx.classnames]
        self._tokens = bucket_tokens(ctx.backbone.tokenize(prompts).to(ctx.device), cfg.text_buckets, self.model)

    def adapt(self, model: nn.Module) -> list[nn.Parameter]:
        """Inject the adapter into `model`; return the parameters to train (`peft` overrides this)."""
        self.layers = inject_lora(model, self.config)
        return [p for layer in self.layers for p in (layer.lora_A, layer.lora_B)]

    def merge(self) -> None:
        for layer in self.layers:
            layer.merge()

    def finish(self) -> None:
        """End of `fit`: evaluation mode, update merged into the weights, class texts encoded once."""
        self.model.eval()
        self.merge()
        with torch.no_grad(), self.ctx.autocast():
            self.text = self._text().float()

    def retarget(self) -> None:
        """Unseen classes: their training-template prompts through the adapted (merged) text tower;
        the adapted vision tower is class-agnostic (CLIP-LoRA's own text-side classifier)."""
        ctx = self.ctx
        prompts = [ctx.train_template.format(c) for c in ctx.classnames]
        self._tokens = bucket_tokens(ctx.backbone.tokenize(prompts).to(ctx.device), self.config.text_buckets,
                                     self.model)
        self._frozen_text = None
        with torch.no_grad(), ctx.autocast():
            self.text = self._text().float()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The LoRA factors by module name (merging changes the base weights, not A and B)."""
        return {f"{name}.{p}": getattr(m, p).detach() for name, m in self.model.named_modules()
                if isinstance(m, LoRALinear) for p in ("lora_A", "lora_B")}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.prepare()
        unexpected = self.model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"not LoRA factors of this configuration: {unexpected[:3]}")
        self.finish()

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The adapted CLIP as open_clip weights (`fsbench.adapters.export_merged`)."""
        return merged_state_dict(self.model)

    def train_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of one batch against the (adapted) class texts, under the run's autocast."""
        with self.ctx.autocast():
            logits = self._logits(images.to(self.ctx.device, non_blocking=True), self._text())
            return F.cross_entropy(logits.float(), labels.to(self.ctx.device))

    def _text(self) -> torch.Tensor:
        """Class embeddings with the single training template, through the (adapted) text tower."""
        if self.config.encoder == "vision":  # text tower frozen: compute once
            if self._frozen_text is None:
                with torch.no_grad():
                    self._frozen_text = self._encode_classes()
            return self._frozen_text
        return self._encode_classes()

    def _encode_classes(self) -> torch.Tensor:
        return F.normalize(encode_buckets(self.model, self._tokens, normalize=False).float(), dim=-1)

    def _logits(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.encoder != "text"):
            feats = F.normalize(self.model.encode_image(images).float(), dim=-1)
        return self.config.logit_scale * feats @ text.float().T

    def _batches(self, train: FewShotData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bb, cfg, ctx = self.ctx.backbone, self.config, self.ctx
        if cfg.augment == "pil" or (cfg.augment == "auto" and ctx.device.type != "cuda"):
            tf = train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale)
            return augmented_batches(train.items, train.image_root, tf, cfg.batch_size, ctx.generator())
        images = to_uint8_tensor(train.items, train.image_root, ctx.device)
        return device_batches(images, train.labels, cfg.batch_size, bb.image_size, bb.mean, bb.std,
                              cfg.crop_scale, ctx.generator(), ctx.generator(1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x, self.text)

    def trainable_params(self) -> int:
        return count_trainable(*self.layers)
