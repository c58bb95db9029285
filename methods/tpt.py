"""TPT (Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models",
NeurIPS 2022, arXiv 2209.07511): per test image, tune CoOp's context on the image's augmented views, predict,
and reset.

Follows github.com/azshue/TPT at 63ecbac (tpt_classification.py, clip/custom_clip.py, data/datautils.py):
for each test image (batch 1), its original and 63 random views (`fsbench.tta_views.TTAViews`; AugMix except
on the ImageNet family, tpt_classification.py:171-172), scored against CoOp's prompts "<context> <class>."
whose 4 context vectors start from the embeddings of "a photo of a" (scripts/test_tpt.sh:8, ctx_init;
clip/custom_clip.py:76-93); the 10% of views with the lowest entropy are kept (`select_confident`,
tpt_classification.py:41-44, 71, --selection_p 0.1 at :330); one step (--tta_steps 1, :331) of AdamW (lr 5e-3,
:323; torch's defaults otherwise: betas 0.9/0.999, eps 1e-8, weight decay 0.01, :145) on the marginal entropy of
their mean probability (`avg_entropy`, :46-51, 73); then the original image is scored with the tuned prompt
(:289-294), and the context and the optimiser state return to their initial state before the next image
(:270-275). Scores are `logit_scale` x cosine (clip/custom_clip.py:317-318: the model's exp(logit_scale),
100 for OpenAI's weights).

The image tower is frozen: each image's views are encoded once, the text tower runs forward and backward once
per step and forward once more for the prediction, over all classes. That cost is TPT's; the runner records it
(`eval_seconds` / `n_test`, peak memory).

Outside an online protocol (`fewshot`, `base2new`, ...) `logits` is the untuned prompt, i.e. zero-shot CLIP with
"a photo of a <class>." (nothing is fitted on the shots).

Deviations (docs/methods.md): mixed precision is the runner's bf16 autocast on GPU (TPT: fp16 autocast with a
GradScaler of initial scale 1000, whose unscaling leaves one AdamW step unchanged); the views are seeded per
image (TPT seeds the global RNGs once per run); the number of context vectors is the init words' token count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fsbench.backbones import BackboneInfo
from fsbench.checks import check_at_least, check_non_negative, check_positive
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, Method, register_method
from fsbench.prompts import build_prompts, encode_prompts, frozen_image_features
from fsbench.text import text_pooling
from fsbench.tta_views import VIEWS, TTAViews, avg_entropy, backbone_views, check_views, select_confident


@dataclass
class TPTConfig:
    """TPT's defaults (tpt_classification.py argparse, scripts/test_tpt.sh)."""

    init: str = "a photo of a"  # --ctx_init a_photo_of_a (test_tpt.sh:8): its 4 tokens are the context
    n_ctx: int = 4  # --n_ctx (tpt_classification.py:332): context vectors when init is "random" (N(0, 0.02))
    lr: float = 5e-3  # --lr (tpt_classification.py:323), AdamW
    weight_decay: float = 0.01  # torch.optim.AdamW's default (tpt_classification.py:145 passes only lr)
    steps: int = 1  # --tta_steps (:331)
    top: float = 0.1  # --selection_p (:330): share of the views kept by confidence
    views: int = VIEWS  # random views besides the original: -b 64 (test_tpt.sh:7) minus 1 (:171)
    augmix: str = "auto"  # AugMix the views: "auto" = not on the ImageNet family (:171-172), "always", "never"
    logit_scale: float = 100.0  # exp(CLIP's learned temperature) for the OpenAI weights (custom_clip.py:284, 317)

    section: ClassVar[str] = "tpt"

    def __post_init__(self) -> None:
        check_positive(self.section, "lr", self.lr)
        check_non_negative(self.section, "weight_decay", self.weight_decay)
        check_at_least(self.section, "steps", self.steps, 0)
        check_positive(self.section, "logit_scale", self.logit_scale)
        check_at_least(self.section, "n_ctx", self.n_ctx, 1)
        check_views(self.section, self.views, self.top, self.augmix)
        if not self.init.strip():
            raise ConfigError('tpt.init must be "random" or initialisation words such as "a photo of a"')


@register_method("tpt")
class TPT(Method):
    """Test-time prompt tuning: one entropy-minimisation step on CoOp's context per test image, then reset."""

    Config = TPTConfig
    input_kind = "images"
    test_time = "online"
    paper = "Shu et al., Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language Models, NeurIPS 2022"
    summary = "TPT: per test image, one AdamW step on the prompt's context minimising confident views' entropy"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        """Nothing is learned from the shots: the prompt starts from the init words at every test image."""
        self._build()

    @classmethod
    def supports(cls, backbone: BackboneInfo) -> str | None:
        if not backbone.text_attention:
            return "its text tower is a Hugging Face model (no token-embedding entry point for the context)"
        return None

    def _build(self) -> None:
        ctx = self.ctx
        if not text_pooling(ctx.backbone.model).embeds:
            raise ConfigError(f"tpt cannot run on {ctx.backbone.spec.name}: its text tower is a Hugging Face model")
        cfg = self.config
        self.prompts = build_prompts(ctx.backbone, ctx.classnames, cfg.n_ctx, cfg.init, ctx.device, ctx.generator(1))
        with torch.no_grad(), ctx.autocast():
            self.text = self.text_features(self.prompts.init)

    def retarget(self) -> None:
        """Other classes: the same init words in front of their names."""
        self._build()

    def text_features(self, context: torch.Tensor) -> torch.Tensor:
        """(C, D) normalised class features of the prompts with `context` (differentiable in it)."""
        return encode_prompts(self.ctx.backbone.model, self.prompts, context).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The untuned prompt's scores of preprocessed images (inductive protocols)."""
        return self.config.logit_scale * frozen_image_features(self.ctx.backbone, x) @ self.text.T

    def online_transform(self) -> TTAViews:
        cfg = self.config
        return backbone_views(self.ctx.backbone, cfg.views, cfg.augmix, self.ctx.classes.lineage)

    def online_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, C) of B test images given as their views (B, 1 + V, 3, S, S), each tuned for on its own."""
        return torch.cat([self.adapt(views)[0] for views in x])

    def adapt(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tune a fresh copy of the initial context on one image's views (original first), then score the
        original: (1, C) scores and the tuned context."""
        cfg = self.config
        feats = frozen_image_features(self.ctx.backbone, views)
        context = nn.Parameter(self.prompts.init.clone().float())  # reset (tpt_classification.py:270-274)
        optimizer = torch.optim.AdamW([context], lr=cfg.lr, weight_decay=cfg.weight_decay)  # fresh state (:275)
        selected = None
        for _ in range(cfg.steps):
            loss, selected = self.entropy(feats, context, selected)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return cfg.logit_scale * feats[:1] @ self.text_features(context).T, context.detach()

    def entropy(self, feats: torch.Tensor, context: torch.Tensor,
                selected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """TPT's loss on the views' features (V, D): the marginal entropy of the confident views (chosen at the
        first step and kept, tpt_classification.py:68-71), and their indices."""
        logits = self.config.logit_scale * feats @ self.text_features(context).T
        if selected is None:
            logits, selected = select_confident(logits, self.config.top)
        else:
            logits = logits[selected]
        return avg_entropy(logits), selected

    def trainable_params(self) -> int:
        return self.prompts.init.numel()  # tuned at test time, per image

    def inference_overhead(self) -> int:
        return self.prompts.init.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"context": self.prompts.init.detach()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        if not torch.equal(tensors["context"].to(self.prompts.init), self.prompts.init):
            raise ConfigError("the saved TPT context is not this configuration's initial context on this backbone")
