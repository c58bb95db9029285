"""ZERO (Farina et al., "Frustratingly Easy Test-Time Adaptation of Vision-Language Models", NeurIPS 2024,
arXiv 2405.18330): TPT's views, no backpropagation; predict the class most of the confident views vote for.

Follows github.com/FarinaMatteo/zero at c609f7c (ttas/zero.py, ttas/base.py, data/augs.py, utils/tools.py): per
test image (batch 1, run.py:72-75), its original and 63 random crops + flips (`--num_views 64`, run.py:173;
data/augs.py:36-67: `MultiViewCropAndFlip`, no AugMix, the first view the Resize + CenterCrop original), frozen
CLIP with the hand-written prompt "a photo of a <class>." (`--ctx_init a_photo_of_a`, scripts/zero.sh:6;
clip/custom_clip.py:113). The views' cosine logits l (V, C) are filtered by confidence: the 30% (`gamma = 0.3`,
ttas/zero.py:24) with the lowest entropy of softmax(l / T), T = 1 / exp(logit_scale) (ttas/zero.py:75-77,
ttas/base.py:56-62); each kept view votes for its argmax, as a softmax at temperature zero (the dtype's machine
epsilon, ttas/zero.py:80-81); a tie for the most votes is broken by the first of the remaining views, from the most
confident down, whose argmax is among the tied classes, which then gets one more vote (ttas/zero.py:84-95,
utils/tools.py:212-218).

`online_logits` returns the log of each class's share of the votes (a class without votes gets log 1e-8): the
argmax is ZERO's prediction, and the softmax the runner's ECE is computed on is the vote share (the official code
returns the vote counts, whose softmax is ~1 for the winner whatever the margin). Outside an online protocol,
`logits` is zero-shot CLIP with the same prompt.

Deviations (docs/methods.md): the entropy is computed from log-softmax (the official `p * p.log()` gives NaN for a
probability that underflows to 0); the votes are counted in float32 (the official code in the fp16 autocast dtype);
when no remaining view breaks a tie, the tied class the most confident remaining view scores highest wins (the
official `break_sample_tie` indexes with the bitwise complement of the tied classes, utils/tools.py:205-209, and
fails when no view remains); views are seeded per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fsbench.checks import check_positive
from fsbench.method import FewShotData, Method, register_method, zero_shot_weights
from fsbench.prompts import frozen_image_features
from fsbench.tta_views import VIEWS, TTAViews, backbone_views, check_views, confidence_order

NO_VOTE = 1e-8  # the share a class without votes gets before the log (finite logits)


@dataclass
class ZeroConfig:
    """ZERO's defaults (ttas/zero.py, run.py, scripts/zero.sh)."""

    prompt: str = "a photo of a"  # --ctx_init a_photo_of_a (scripts/zero.sh:6): "<prompt> <class>."
    top: float = 0.3  # gamma (ttas/zero.py:24): share of the views kept by confidence
    views: int = VIEWS  # random views besides the original: --num_views 64 (run.py:173) minus 1 (data/augs.py:66)
    augmix: str = "never"  # crops + flips only (data/augs.py:62-67); "auto" / "always" as in tpt
    logit_scale: float = 100.0  # exp(CLIP's learned temperature) for the OpenAI weights (custom_clip.py:99-100)

    section: ClassVar[str] = "zero"

    def __post_init__(self) -> None:
        check_positive(self.section, "logit_scale", self.logit_scale)
        check_views(self.section, self.views, self.top, self.augmix)


def zero_vote(logits: torch.Tensor, top: float, logit_scale: float) -> torch.Tensor:
    """ZERO's votes (C,) from the views' cosine logits (V, C) (ttas/zero.py:75-95): the `top` share of views with the
    lowest entropy of softmax(logit_scale * logits) each vote for their argmax (softmax at zero temperature); a tie
    for the most votes goes to the class of the first remaining view, most confident first, that votes for one of
    the tied classes (one more vote for it)."""
    logits = logits.float()
    order = confidence_order(logit_scale * logits)
    k = max(1, int(logits.shape[0] * top))
    votes = (logits[order[:k]] / torch.finfo(logits.dtype).eps).softmax(1).sum(0)
    best, pred = torch.max(votes, dim=-1)
    ties = [int(pred)] + [i for i in range(len(votes)) if i != int(pred) and votes[i] == best]
    if len(ties) > 1:
        votes[break_tie(ties, logits[order[k:]])] += 1
    return votes


def break_tie(ties: list[int], rest: torch.Tensor) -> int:
    """The first of the remaining views (rows of `rest`, most confident first) whose argmax is a tied class
    (utils/tools.py:212-218); else the tied class the first remaining view scores highest; else the first tie."""
    for pred in rest.argmax(dim=1).tolist():
        if pred in ties:
            return pred
    if len(rest) == 0:
        return ties[0]
    return ties[int(rest[0, ties].argmax())]


@register_method("zero")
class Zero(Method):
    """Test-time augmentation with zero temperature: a majority vote of the confident views' argmax."""

    Config = ZeroConfig
    input_kind = "images"
    test_time = "online"
    paper = "Farina et al., Frustratingly Easy Test-Time Adaptation of Vision-Language Models, NeurIPS 2024"
    summary = "ZERO: per test image, the majority vote of its most confident augmented views, no backprop"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        """Nothing is learned: the class features of the hand-written prompt."""
        ctx = self.ctx
        names = [name.replace("_", " ") for name in ctx.classnames]
        self.text = zero_shot_weights(ctx.backbone, names, [self.config.prompt + " {}."], ctx.device)

    def retarget(self) -> None:
        """Other classes: the same prompt in front of their names."""
        self.fit(None, None)  # type: ignore[arg-type]  (nothing is fitted from data)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-shot scores of preprocessed images (inductive protocols)."""
        return self.config.logit_scale * frozen_image_features(self.ctx.backbone, x) @ self.text.T

    def online_transform(self) -> TTAViews:
        cfg = self.config
        return backbone_views(self.ctx.backbone, cfg.views, cfg.augmix, self.ctx.classes.lineage)

    @torch.no_grad()
    def online_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Log vote shares (B, C) of B test images given as their views (B, 1 + V, 3, S, S)."""
        out = []
        for views in x:
            votes = zero_vote(frozen_image_features(self.ctx.backbone, views) @ self.text.T, self.config.top,
                              self.config.logit_scale)
            out.append((votes / votes.sum()).clamp_min(NO_VOTE).log())
        return torch.stack(out)
