"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models",
CVPRW 2024, arXiv 2405.18541): low-rank updates on the attention projections of both CLIP
encoders, one fixed recipe for every dataset and shot count.

Defaults follow the official code (github.com/MaxZanella/CLIP-LoRA: main.py, lora.py,
loralib/): rank 2, alpha 1, scaling alpha/sqrt(rank), dropout 0.25 on the LoRA input, A
Kaiming-uniform and B zero, AdamW (lr 2e-4, wd 1e-2, betas 0.9/0.999), cosine to 1e-6 over
500 x K steps of batch 32, cross-entropy on 100 x cosine similarity with the text features
recomputed through the adapted text encoder every step ("a photo of a {}."), and the last
iterate evaluated with the update merged into the weights. The LoRA layer, the choice of blocks and
projections, injection and merging are the toolkit's (`fsbench.tuners`); this file is the method.

Deviation: positions are index sets over a tower's depth. For 12-layer towers they equal the
official lists; for deeper towers (ViT-L/14 vision, 24 layers) "all", "half-bottom" and "half-up"
equal the official ViT-L/14 lists (all 24 layers since the official commit e6bf706, 2024-09-12;
loralib/utils.py INDEX_POSITIONS_VISION), and the positions the official code defines for 12-layer
towers only (bottom, mid, up, top1-3) are scaled with the depth.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.augment import device_batches, to_uint8_tensor, train_transform
from fsbench.backbones import BackboneInfo
from fsbench.method import FewShotData, Method, count_trainable, register_method
from fsbench.text import bucket_tokens, encode_buckets
from fsbench.training import (
    EndToEnd,
    LoRARecipe,
    all_steps,
    check_end_to_end,
    check_lora_recipe,
    image_batches,
    train_iterations,
)
from fsbench.tuners import LoRALayerConfig, LoRALinear, TargetsConfig, check_lora_layer, inject_lora, merged_state_dict


@dataclass
class LoRAConfig(EndToEnd, TargetsConfig, LoRARecipe, LoRALayerConfig):
    """CLIP-LoRA hyper-parameters (official defaults): the LoRA layer, the recipe, the targets and the
    end-to-end pass, composed from the toolkit's pieces (fields, and their stored order, unchanged)."""

    section: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        check_lora_layer(self.section, self)
        check_lora_recipe(self.section, self)
        check_end_to_end(self.section, self)
        TargetsConfig.__post_init__(self)


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
        cfg = self.config
        self.prepare()
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        self.model.train()
        train_iterations(self.ctx, opt, self._batches(train), self.train_loss, self.total_steps(), cfg.eta_min,
                         "train lora")
        self.finish()

    def total_steps(self) -> int:
        """Optimiser steps of `fit`: `iters_per_shot` x shots (two_stage's first stage takes a fraction)."""
        return self.config.iters_per_shot * self.ctx.shots

    def prepare(self) -> None:
        """Start of `fit`: copy the frozen model, add LoRA, tokenise the class prompts once."""
        cfg, ctx = self.config, self.ctx
        self.model = copy.deepcopy(ctx.backbone.model)  # the shared frozen model stays untouched
        self.params = self.adapt(self.model)
        self._frozen_text: torch.Tensor | None = None
        prompts = [self.template().format(c) for c in ctx.classnames]
        self._tokens = bucket_tokens(ctx.backbone.tokenize(prompts).to(ctx.device), cfg.text_buckets, self.model)

    def template(self) -> str:
        """The one prompt template of training and scoring: CLIP-LoRA's "a photo of a {}." for every dataset."""
        return self.ctx.train_template

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
        prompts = [self.template().format(c) for c in ctx.classnames]
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
            return image_batches(train.items, train.image_root, tf, cfg.batch_size, ctx.generator(),
                                 all_steps(len(train.items), cfg.batch_size))
        images = to_uint8_tensor(train.items, train.image_root, ctx.device)
        return device_batches(images, train.labels, cfg.batch_size, bb.image_size, bb.mean, bb.std,
                              cfg.crop_scale, ctx.generator(), ctx.generator(1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x, self.text)

    def cosine_scale(self) -> float | None:
        return self.config.logit_scale if type(self).logits is CLIPLoRA.logits else None  # `_logits`: both normalised

    def trainable_params(self) -> int:
        return count_trainable(*self.layers)
