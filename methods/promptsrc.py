"""PromptSRC (Khattak et al., "Self-regulating Prompts: Foundational Model Adaptation without Forgetting",
ICCV 2023, arXiv 2307.06948): deep, independent vision and language prompts (IVLP) regularised towards the
frozen CLIP by three self-consistency terms, and averaged over the epochs with Gaussian weights.

    loss = CE(s f v^T, y) + 25 * L1(v, v0) + 10 * L1(f, f0) + KL(softmax(s f0 v0^T) || softmax(s f v^T))

f / v the prompted image / class text features, f0 the frozen image features, v0 the frozen class features
averaged over CLIP's 60 ImageNet templates (the textual diversity), s the logit scale.

Official code: github.com/muzairkhattak/PromptSRC (commit bb95c77):
- trainers/promptsrc.py:88-106 text context = the first `n_ctx` tokens of "a photo of a" (random N(0, 0.02)
  when n_ctx > 4), prompt "a photo of a <class>."; clip/model.py:210-222 deep prompts N(0, 0.02) in blocks
  1 .. depth - 1 of each tower (:229-252: after SOS in text, the last n_ctx tokens in vision);
  clip/model.py:373-379, :406-408 the first vision prompts appended after the positional embedding, before
  `ln_pre`; only these prompts train (trainers/promptsrc.py:236-245);
- trainers/promptsrc.py:114-128 v0: the mean of the frozen, unnormalised text features over the 60 templates
  of trainers/imagenet_templates.py:3-64, normalised at use (:199-200); :201-205 f0 and the frozen logits
  s f0 v0^T;
- trainers/promptsrc.py:297-313 the loss: L1 means weighted by TEXT_LOSS_WEIGHT (text) and IMAGE_LOSS_WEIGHT
  (image), KL(frozen || prompted) summed and divided by the number of logits;
- trainers/promptsrc.py:263-270, :320-335 Gaussian prompt aggregation (GPA): after epoch e (1-based) the
  prompts are accumulated with weight N(e; GPA_MEAN, GPA_STD), normalised over the epochs; the sum replaces
  the prompts after the last epoch.

Defaults: the few-shot config configs/trainers/PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml (and
scripts/promptsrc/few_shot.sh:8): batch 4 (:4), SGD lr 0.0025 (:17-18; Dassl's momentum 0.9, weight decay
5e-4), 50 epochs (:19), cosine after one constant warm-up epoch at 1e-5 (:20-23), random resized crop + flip
(:14), 4 + 4 tokens (:34-35), "a photo of a" (:36), depth 9 in both towers (:38-39), weights 25 / 10 (:40-41),
GPA mean 30 / std 30 on ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397 and mean 45 / std 5 on
StanfordCars, Flowers102, FGVCAircraft, DTD, EuroSAT (:42-47; resolved per dataset and written into the
stored config; other datasets get the first pair). The base-to-new config vit_b16_c2_ep20_batch4_4+4ctx.yaml
differs only in 20 epochs and GPA 15 / 1 (`--set promptsrc.epochs=20 --set promptsrc.gpa_mean=15
--set promptsrc.gpa_std=1`).

Deviations: bf16 autocast on GPU (the official casts CLIP and the prompts to fp16, PREC "fp16"); the GPA
weights are normalised as a softmax of the Gaussian's exponent (equal to the official normalised densities,
without their underflow at small std); prompts initialised from a generator seeded by the run's seed; the
frozen features come from the same backbone (the official loads two more CLIP copies); a depth beyond a
tower's blocks is capped there (the stored config says so).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.augment import train_transform
from fsbench.checks import check_at_least, check_crop_scale, check_non_negative, check_positive
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, Method, register_method
from fsbench.prompt_hooks import deep_prompts_hook
from fsbench.prompts import (
    INIT_STD,
    RANDOM,
    LearnedModule,
    Prompts,
    assemble_prompts,
    build_prompts,
    frozen_image_features,
)
from fsbench.text import encode_tokens
from fsbench.towers import (
    DeepPrompted,
    context_window,
    require_towers,
    text_depth,
    text_forward,
    vision_depth,
    vision_tokens,
)
from fsbench.training import DasslRecipe, dassl_steps, fewshot_image_batches, train_epochs

# CLIP's ImageNet prompts as PromptSRC uses them for v0 (trainers/imagenet_templates.py:3-64: 60 of the 80 of
# openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb)
PROMPTSRC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.", "the toy {}.",
    "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)

# GPA (mean, std) of the few-shot config (vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml:42-47)
GPA_FEW_SHOT = {name: (45.0, 5.0) for name in ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")}
GPA_DEFAULT = (30.0, 30.0)  # ImageNet, Caltech101, OxfordPets, Food101, UCF101, SUN397 (and other datasets)


@dataclass
class PromptSRCConfig(DasslRecipe):
    """PromptSRC hyper-parameters (official few-shot config); recipe fields from `DasslRecipe`."""

    lr: float = 0.0025
    batch_size: int = 4
    epochs: int = 50
    n_ctx_text: int = 4  # learned text tokens per prompt (the first ones of `init`; random beyond its tokens)
    n_ctx_vision: int = 4  # learned vision tokens per prompt
    init: str = "a photo of a"  # initialisation words of the text context, or "random" (N(0, 0.02))
    depth_text: int = 9  # text blocks with prompts (1 = input prompts only)
    depth_vision: int = 9  # vision blocks with prompts
    text_weight: float = 25.0  # TEXT_LOSS_WEIGHT: L1 of prompted to frozen class text features
    image_weight: float = 10.0  # IMAGE_LOSS_WEIGHT: L1 of prompted to frozen image features
    gpa_mean: float | None = None  # GPA Gaussian mean (epochs); None = the official per-dataset value
    gpa_std: float | None = None  # GPA Gaussian std; None = the official per-dataset value
    logit_scale: float = 100.0  # exp(CLIP's learned temperature) for the OpenAI weights
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])

    section: ClassVar[str] = "promptsrc"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "n_ctx_text", "n_ctx_vision", "depth_text", "depth_vision"):
            check_at_least(self.section, name, getattr(self, name), 1)
        check_non_negative(self.section, "text_weight", self.text_weight)
        check_non_negative(self.section, "image_weight", self.image_weight)
        check_positive(self.section, "logit_scale", self.logit_scale)
        if self.gpa_mean is not None:
            check_non_negative(self.section, "gpa_mean", self.gpa_mean)
        if self.gpa_std is not None:
            check_positive(self.section, "gpa_std", self.gpa_std)
        check_crop_scale(self.section, "crop_scale", self.crop_scale)
        if not self.init.strip():
            raise ConfigError('promptsrc.init must be "random" or initialisation words such as "a photo of a"')


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Normalised Gaussian weights of epochs 1 .. `epochs` (trainers/promptsrc.py:265-270, :358-360),
    computed as a softmax of the exponent: the same numbers, without underflow."""
    exponents = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(exponents)
    dens = [math.exp(x - top) for x in exponents]
    return [d / sum(dens) for d in dens]


def promptsrc_loss(logits: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, frozen_text: torch.Tensor,
                   image: torch.Tensor, frozen_image: torch.Tensor, frozen_logits: torch.Tensor,
                   text_weight: float, image_weight: float) -> torch.Tensor:
    """CE + text_weight * L1(text, frozen_text) + image_weight * L1(image, frozen_image) + KL(frozen || prompted)
    summed over logits / their number (trainers/promptsrc.py:297-313)."""
    ce = F.cross_entropy(logits, labels)
    l1_text = F.l1_loss(text, frozen_text) * text_weight
    l1_image = F.l1_loss(image, frozen_image) * image_weight
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(frozen_logits, dim=1), reduction="sum",
                  log_target=True) / logits.numel()
    return ce + (kl + l1_text + l1_image)


@torch.no_grad()
def template_mean_features(method: Method, templates: tuple[str, ...]) -> torch.Tensor:
    """(C, D) the normalised mean of the frozen, unnormalised text features over `templates`
    (trainers/promptsrc.py:119-128, normalised at :199-200)."""
    ctx = method.ctx
    total = None
    for template in templates:
        tokens = ctx.backbone.tokenize([template.format(c) for c in ctx.classnames]).to(ctx.device)
        feats = encode_tokens(ctx.backbone.model, tokens, normalize=False).float()
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)


class PromptSRCPrompts(nn.Module):
    """The learned prompts: text context (n_t, Wt) and deep text prompts (depth_text - 1, n_t, Wt), vision
    prompts (n_v, Wv) and deep vision prompts (depth_vision - 1, n_v, Wv)."""

    def __init__(self, context: torch.Tensor, depth_text: int, n_vision: int, vision_width: int,
                 depth_vision: int, seed: int):
        super().__init__()
        n_text, width = context.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.context = nn.Parameter(context.clone().float())
            self.deep_text = nn.Parameter(torch.randn(depth_text - 1, n_text, width) * INIT_STD)
            self.vision = nn.Parameter(torch.randn(n_vision, vision_width) * INIT_STD)
            self.deep_vision = nn.Parameter(torch.randn(depth_vision - 1, n_vision, vision_width) * INIT_STD)


def promptsrc_prompts(method: Method) -> Prompts:
    """The class prompts "<context> <class>.": the first `n_ctx_text` tokens of the init words, or random
    context when the words have fewer tokens (trainers/promptsrc.py:88-101)."""
    cfg, ctx = method.config, method.ctx
    gen = ctx.generator(1)
    if cfg.init != RANDOM:
        prompts = build_prompts(ctx.backbone, ctx.classnames, cfg.n_ctx_text, cfg.init, ctx.device, gen)
        if prompts.n_ctx >= cfg.n_ctx_text:
            return context_window(prompts, cfg.n_ctx_text)
    return build_prompts(ctx.backbone, ctx.classnames, cfg.n_ctx_text, RANDOM, ctx.device, gen)


@register_method("promptsrc")
class PromptSRC(DeepPrompted, LearnedModule, Method):
    """Deep independent vision + language prompts with self-consistency to the frozen CLIP and GPA."""

    Config = PromptSRCConfig
    input_kind = "images"
    paper = "Khattak et al., Self-regulating Prompts: Foundational Model Adaptation without Forgetting, ICCV 2023"
    summary = "PromptSRC: deep V+L prompts (4+4 tokens, depth 9), frozen-CLIP consistency, Gaussian averaging"

    def _build(self) -> None:
        cfg, ctx = self.config, self.ctx
        model = require_towers(self.name, ctx.backbone)
        mean, std = GPA_FEW_SHOT.get(ctx.dataset, GPA_DEFAULT)
        self.config = cfg = dataclasses.replace(  # the stored config records what ran
            cfg, depth_text=min(cfg.depth_text, text_depth(model)),
            depth_vision=min(cfg.depth_vision, vision_depth(model)),
            gpa_mean=mean if cfg.gpa_mean is None else cfg.gpa_mean,
            gpa_std=std if cfg.gpa_std is None else cfg.gpa_std)
        self.prompts = promptsrc_prompts(self)
        self.learner = PromptSRCPrompts(self.prompts.init, cfg.depth_text, cfg.n_ctx_vision,
                                        model.visual.transformer.width, cfg.depth_vision, ctx.seed).to(ctx.device)

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build()
        cfg = self.config
        self.frozen_text = template_mean_features(self, PROMPTSRC_TEMPLATES)
        bb = ctx.backbone
        batches = fewshot_image_batches(train, train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale),
                                        cfg.batch_size, ctx.generator())
        weights = gpa_weights(cfg.epochs, cfg.gpa_mean, cfg.gpa_std)
        average = {k: torch.zeros_like(p) for k, p in self.learner.named_parameters()}

        def aggregate(epoch: int) -> None:  # GPA after each epoch (trainers/promptsrc.py:320-330)
            for k, p in self.learner.named_parameters():
                average[k] += weights[epoch] * p.detach()

        train_epochs(ctx, cfg.optimizer(self.learner.parameters()), batches, self.loss, cfg.epochs,
                     dassl_steps(len(train), cfg.batch_size), cfg.schedule(cfg.epochs), "train promptsrc",
                     end_epoch=aggregate)
        self.learner.load_state_dict(average)  # the aggregate replaces the prompts (:332-335)
        self._finish()

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        text, image = self.text_features(), self.image_features(images)
        logits = cfg.logit_scale * image @ text.T
        frozen_image = frozen_image_features(self.ctx.backbone, images)
        frozen_logits = cfg.logit_scale * frozen_image @ self.frozen_text.T
        return promptsrc_loss(logits, labels, text, self.frozen_text, image, frozen_image, frozen_logits,
                              cfg.text_weight, cfg.image_weight)

    def text_features(self) -> torch.Tensor:
        """(C, D) normalised features of the class prompts with the deep text prompts."""
        x = assemble_prompts(self.prompts, self.learner.context)
        hook = deep_prompts_hook(self.learner.deep_text, self.prompts.prefix.shape[1])
        return text_forward(self.ctx.backbone.model, x, self.prompts.eot, hook).float()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) normalised features of images with the deep vision prompts."""
        learner = self.learner
        hook = deep_prompts_hook(learner.deep_vision, -learner.vision.shape[0])
        return F.normalize(vision_tokens(self.ctx.backbone.model, images, learner.vision, hook)[0].float(), dim=-1)

    def retarget(self) -> None:
        """Unseen classes: the learned prompts in front of their names (the base-to-new protocol)."""
        self.prompts = promptsrc_prompts(self)
        self._finish()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * self.image_features(x) @ self.text.T

