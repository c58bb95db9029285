"""MaPLe (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023, arXiv 2210.03117): deep
language prompts in the first `depth` blocks of the text tower, each coupled to a vision prompt of the
same block through its own linear projection (text width -> vision width).

Official code: github.com/muzairkhattak/multimodal-prompt-learning (commit 69bce21):
- trainers/maple.py:69-176 `MultiModalPromptLearner`: `n_ctx` context vectors from the first tokens of
  "a photo of a" (:84-92; the rest of the words stay fixed in every prompt, :121-131), coupled to the
  first vision prompt by `proj = Linear(512, 768)` (:103); `depth - 1` deeper text prompts from
  N(0, 0.02) (:111-114), each with a projection, all copies of one initial Linear (:116-117, :207-208);
- clip/model.py:287-331 `ResidualAttentionBlock_MaPLe`: before blocks 1 .. depth - 1, the text tokens
  after SOS (:319-326) and the last `n_ctx` vision tokens (:303-309) are replaced by that block's
  prompts; clip/model.py:454-458: the first vision prompts are appended after the positional
  embedding, before `ln_pre`;
- trainers/maple.py:179-204: cross-entropy on CLIP's scaled cosine logits; only the prompt learner trains.

Defaults: the schedule the CLIP-LoRA paper says it used for MaPLe, its base-to-new config
configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml: 2 tokens, depth 9, "a photo of a" (:32-36),
SGD lr 0.0035 (:16-17) with Dassl's momentum 0.9 and weight decay 5e-4, 5 epochs (:18), batch 4 (:3),
one constant warm-up epoch at 1e-5 then cosine (:19-22), random resized crop + flip (:13), whatever
the shot count. The towers run through `fsbench.towers` (hooks before every block).

Deviations: bf16 autocast on GPU, every prompt and projection an fp32 parameter (the official config
runs CLIP in fp16, PREC "fp16" at :35: the first context and its projection are fp16 parameters,
trainers/maple.py:90-95,103-104, while the deeper text prompts and their projections are fp32
parameters, :111-117, cast to fp16 where they enter a block, clip/model.py:306,323); the
projections take the backbone's widths instead of the hard-coded 512 -> 768 (equal on ViT-B/16);
parameters are initialised from a generator seeded by the run's seed rather than the global RNG;
`coupling = false` (not in the official code) drops the vision prompts, leaving deep language prompts;
a depth beyond the shallower tower's blocks is capped there (and the stored config says so).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.augment import train_transform
from fsbench.checks import check_at_least, check_crop_scale, check_positive
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, Method, register_method
from fsbench.prompts import INIT_STD, LearnedModule, Prompts, assemble_prompts, build_prompts
from fsbench.towers import (
    DeepPrompted,
    Hook,
    context_window,
    replace_tokens,
    require_towers,
    text_depth,
    text_forward,
    vision_depth,
    vision_tokens,
)
from fsbench.training import DasslRecipe, dassl_steps, fewshot_image_batches, train_epochs


@dataclass
class MaPLeConfig(DasslRecipe):
    """MaPLe hyper-parameters (official vit_b16_c2_ep5_batch4_2ctx.yaml); recipe fields from `DasslRecipe`."""

    lr: float = 0.0035
    batch_size: int = 4
    epochs: int = 5
    n_ctx: int = 2  # learned tokens per prompt (the first n_ctx tokens of `init`)
    init: str = "a photo of a"  # initialisation words (the rest stay fixed), or "random" (N(0, 0.02))
    depth: int = 9  # blocks with prompts in each tower (1 = shallow: input prompts only)
    coupling: bool = True  # vision prompts projected from the language prompts; false = language only
    logit_scale: float = 100.0  # exp(CLIP's learned temperature) for the OpenAI weights
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])

    section: ClassVar[str] = "maple"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self.section, "epochs", self.epochs, 1)
        check_at_least(self.section, "n_ctx", self.n_ctx, 1)
        check_at_least(self.section, "depth", self.depth, 1)
        check_positive(self.section, "logit_scale", self.logit_scale)
        check_crop_scale(self.section, "crop_scale", self.crop_scale)
        if not self.init.strip():
            raise ConfigError('maple.init must be "random" or initialisation words such as "a photo of a"')


class MaPLePrompts(nn.Module):
    """The learned parts: context (n_ctx, Wt), its projection to the first vision prompt, the deeper
    text prompts (depth - 1, n_ctx, Wt) and their projections (trainers/maple.py:101-117)."""

    def __init__(self, init: torch.Tensor, depth: int, vision_width: int, coupling: bool, seed: int):
        super().__init__()
        n_ctx, width = init.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.proj = nn.Linear(width, vision_width) if coupling else None
            self.context = nn.Parameter(init.clone().float())
            self.deep_text = nn.Parameter(torch.randn(depth - 1, n_ctx, width) * INIT_STD)
            single = nn.Linear(width, vision_width)  # cloned: every projection starts equal (_get_clones)
            self.deep_proj = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)] if coupling else [])

    def text_hook(self) -> Hook:
        """Before blocks 1 .. depth - 1: the tokens after SOS become that block's prompt (:314-328)."""
        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            return replace_tokens(x, 1, self.deep_text[i - 1]) if 0 < i <= len(self.deep_text) else x
        return hook

    def vision_prompts(self) -> tuple[torch.Tensor | None, Hook | None]:
        """(first vision prompts, hook replacing the last n_ctx tokens before blocks 1 .. depth - 1)."""
        if self.proj is None:
            return None, None
        deep = [p(t) for p, t in zip(self.deep_proj, self.deep_text, strict=True)]

        def hook(i: int, x: torch.Tensor) -> torch.Tensor:
            return replace_tokens(x, -deep[i - 1].shape[0], deep[i - 1]) if 0 < i <= len(deep) else x
        return self.proj(self.context), hook


def maple_prompts(method: Method) -> Prompts:
    """The class prompts with the first `n_ctx` tokens of the initialisation words as the context."""
    cfg, ctx = method.config, method.ctx
    prompts = build_prompts(ctx.backbone, ctx.classnames, cfg.n_ctx, cfg.init, ctx.device, ctx.generator(1))
    if prompts.n_ctx < cfg.n_ctx:
        raise ConfigError(f"maple.n_ctx = {cfg.n_ctx} exceeds the {prompts.n_ctx} tokens of init {cfg.init!r}; "
                          'use fewer tokens or init = "random"')
    return context_window(prompts, cfg.n_ctx)


def usable_depth(depth: int, model: nn.Module) -> int:
    """The prompt depth capped at the shallower tower's blocks (12 on ViT-B/16; 2 on test-tiny)."""
    return min(depth, vision_depth(model), text_depth(model))


def maple_learner(method: Method) -> MaPLePrompts:
    """MaPLe's class prompts (set on `method.prompts`) and its coupled deep prompts, for MaPLe and DePT on
    MaPLe: the depth is capped at the towers' and recorded in `method.config` (the stored config says what ran)."""
    cfg, ctx = method.config, method.ctx
    model = require_towers(method.name, ctx.backbone)
    method.config = cfg = dataclasses.replace(cfg, depth=usable_depth(cfg.depth, model))
    method.prompts = maple_prompts(method)
    return MaPLePrompts(method.prompts.init, cfg.depth, model.visual.transformer.width, cfg.coupling,
                        ctx.seed).to(ctx.device)


@register_method("maple")
class MaPLe(DeepPrompted, LearnedModule, Method):
    """Deep language prompts coupled to deep vision prompts by linear projections; CLIP frozen."""

    Config = MaPLeConfig
    input_kind = "images"
    paper = "Khattak et al., MaPLe: Multi-modal Prompt Learning, CVPR 2023"
    summary = "MaPLe: deep text prompts (depth 9, 2 tokens) coupled to deep vision prompts by projections"

    def _build(self) -> None:
        self.learner = maple_learner(self)

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build()
        bb = ctx.backbone
        batches = fewshot_image_batches(train, train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale),
                                        cfg.batch_size, ctx.generator())
        train_epochs(ctx, cfg.optimizer(self.learner.parameters()), batches, self.loss, cfg.epochs,
                     dassl_steps(len(train), cfg.batch_size), cfg.schedule(cfg.epochs), "train maple")
        self._finish()

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.config.logit_scale * self.image_features(images) @ self.text_features().T
        return F.cross_entropy(logits, labels)

    def text_features(self) -> torch.Tensor:
        """(C, D) normalised features of the class prompts with the deep language prompts."""
        x = assemble_prompts(self.prompts, self.learner.context)
        return text_forward(self.ctx.backbone.model, x, self.prompts.eot, self.learner.text_hook()).float()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised features of images with the coupled deep vision prompts."""
        prompts, hook = self.learner.vision_prompts()
        return F.normalize(vision_tokens(self.ctx.backbone.model, images, prompts, hook)[0].float(), dim=-1)

    def retarget(self) -> None:
        """Unseen classes: the learned prompts in front of their names (MaPLe's base-to-new protocol)."""
        self.prompts = maple_prompts(self)
        self._finish()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * self.image_features(x) @ self.text.T

