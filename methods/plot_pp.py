"""PLOT++ (Chen et al., "PLOT: Prompt Learning with Optimal Transport for Vision-Language Models",
ICLR 2023, arXiv 2210.01253; PLOT++ is its ViT version): N text prompts per class and M image features,
scored by the optimal-transport similarity between the two sets (entropic OT, Sinkhorn).

Official code: github.com/CHENGY12/PLOT (commit 728539f), folder plot-pp:
- trainers/plotpp.py:56-174 `MultiModalPromptLearner`: N = 4 text contexts initialised from four
  per-dataset templates (:73-99; the context is as many tokens as the first template has words, :87),
  and M vision prompts of 2 tokens from N(0, 0.02) (:100-101);
- clip/model.py:258-278: the image is encoded once per vision prompt, the prompt appended after the
  positional embedding (before `ln_pre`): its M local features are the M prompted class tokens (PLOT's
  ResNet version matched feature-map positions instead; for ViT, PLOT++ matches prompted features);
- trainers/plotpp.py:199-262: cost 1 - cosine between every (image feature, text prompt) pair, uniform
  marginals 1/M and 1/N, Sinkhorn with eps 0.1, at most 100 iterations, stopped when the row scalings
  change by less than 1e-2 (:189-190, :202), the plan computed without gradient; score = sum(T * cosine);
  with `TRADE_OFF` the cosine of the mean features (the global prompt) is added;
- two stages (scripts/main_visiononly.sh, main_joint.sh; train.py:100): stage 1 trains the vision prompts
  only (text contexts fixed at the templates) on global + OT logits; stage 2 starts from stage 1 and
  trains both on the OT logits alone, which are also the test-time scores (scripts/evaluation.sh:45).

Defaults: configs/trainers/PLOTPP/vit.yaml (SGD lr 0.002, batch 32, one constant warm-up epoch at 1e-5
then cosine, random resized crop + flip) with Dassl's momentum 0.9 and weight decay 5e-4; epochs per
stage 50 / 100 / 200 for 1 / 2-4 / 8-16 shots, 50 on ImageNet (train.py:126-133); M = 4 (the README's
example), N = 4, 2 vision tokens (scripts/main_joint.sh:12-15).

Deviations: bf16 autocast on GPU (official fp16), the OT in float32; stage 1's text features are
computed once (its text contexts are fixed, so every step's would be identical); datasets without
official templates (synthetic, imagefolder) use Caltech101's; the templates of the fitted dataset are
kept for unseen classes (`retarget`); with `two_stage = false` only the joint stage runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.augment import train_transform
from fsbench.backbones import BackboneInfo
from fsbench.config import check_at_least, check_crop_scale, check_positive
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, Method, register_method
from fsbench.prompts import INIT_STD, RANDOM, Prompts, assemble_prompts, build_prompts
from fsbench.towers import backbone_support, context_window, text_forward, tower_support, vision_tokens
from fsbench.training import DasslRecipe, coop_epochs, dassl_steps, fewshot_image_batches, train_epochs

# plot-pp/trainers/plotpp.py:73-83, keyed by fsbench's dataset names (kept verbatim, spaces included)
TEMPLATES = {
    "caltech101": ["a photo of a", "this is a photo", "this is picture of", "one picture of a"],
    "dtd": ["a photo of a texture", "this is a photo texture", "this is a picture texture",
            "one picture of a texture"],
    "eurosat": ["a centered satellite photo of", "a centered satellite picture of",
                "this is centered satellite photo of", "one centered satellite photo of a"],
    "fgvc_aircraft": ["a photo of an aircraft", "a picture of an aircraft", "this is aircraft picture of",
                      "one picture of an aircraft"],
    "food101": ["a photo of a food", "this is a food photo", " this is food picture of", "one picture of a food"],
    "imagenet": ["a photo of a", "this is a photo ", "this is a", "one picture of a"],
    "oxford_flowers": ["a photo of a flower", "one picture of a flower", "this is flower picture of",
                       "one picture of a flower"],
    "oxford_pets": ["a photo of a pet", "one picture of a pet", "this is pet picture of", "one picture of a pet"],
    "stanford_cars": ["a photo of a", "this is a photo ", "this is picture of", "one picture of a"],
    "sun397": ["a photo of a", "this is a photo", "this is picture of", "one picture of a"],
    "ucf101": ["a photo of a person doing", "this is a photo people doing", "this is picture of people doing",
               "one picture of a person doing"],
}
DEFAULT_DATASET = "caltech101"  # templates for datasets the official code has none for
DATASET = "dataset"  # the `init` value for the official per-dataset templates


@dataclass
class PlotPPConfig(DasslRecipe):
    """PLOT++ hyper-parameters (official plot-pp scripts and vit.yaml); recipe fields from `DasslRecipe`."""

    n_text: int = 4  # N text prompts per class
    n_vision: int = 4  # M vision prompts (M local image features)
    n_ctx_vision: int = 2  # tokens per vision prompt
    init: str = DATASET  # "dataset": the official templates of the dataset; "random": N(0, 0.02)
    n_ctx: int = 4  # text context tokens with init = "random" (the templates set their own)
    eps: float = 0.1  # entropic regularisation of the Sinkhorn OT
    max_iter: int = 100  # Sinkhorn iterations at most
    thresh: float = 1e-2  # stop when the mean change of the row scalings falls below this
    two_stage: bool = True  # stage 1 (vision prompts, global + OT logits) before the joint stage
    logit_scale: float = 100.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])

    section: ClassVar[str] = "plot_pp"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_text", "n_vision", "n_ctx_vision", "n_ctx", "max_iter"):
            check_at_least(self.section, name, getattr(self, name), 1)
        for name in ("eps", "thresh", "logit_scale"):
            check_positive(self.section, name, getattr(self, name))
        check_crop_scale(self.section, "crop_scale", self.crop_scale)
        if self.init not in (DATASET, RANDOM):
            raise ConfigError(f'plot_pp.init must be "dataset" or "random", got {self.init!r}')
        if self.init == DATASET and self.n_text > 4:
            raise ConfigError(f'plot_pp.n_text = {self.n_text}: the official templates are 4; use init = "random"')


def sinkhorn(K: torch.Tensor, u: torch.Tensor, v: torch.Tensor, max_iter: int, thresh: float) -> torch.Tensor:
    """Transport plans diag(r) K diag(c) (..., M, N) with row sums `u` and column sums `v`.

    Alternates r = u / K c and c = v / K^T r, stopping once the mean change of r is below `thresh`
    (plot-pp/trainers/plotpp.py:199-213); the column sums are then exact, the row sums close.
    """
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / (K @ c.unsqueeze(-1)).squeeze(-1)
        c = v / (K.transpose(-2, -1) @ r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < thresh:
            break
    return r.unsqueeze(-1) * c.unsqueeze(-2) * K


def ot_scores(image: torch.Tensor, text: torch.Tensor, eps: float, max_iter: int,
              thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(OT similarity, global cosine), each (B, C), of image features (M, B, D) and text features (N, C, D).

    OT: sum over (m, n) of T_mn cos(image_m, text_n), T the Sinkhorn plan of cost 1 - cos with uniform
    marginals (no gradient through T). Global: the cosine of the mean image and mean text features.
    """
    m, n = image.shape[0], text.shape[0]
    with torch.autocast(image.device.type, enabled=False):  # float32 even inside the training autocast
        image, text = image.float(), text.float()
        glob = F.normalize(image.mean(0), dim=-1) @ F.normalize(text.mean(0), dim=-1).T
        sim = torch.einsum("mbd,ncd->bcmn", F.normalize(image, dim=-1), F.normalize(text, dim=-1))
        with torch.no_grad():
            u = sim.new_full(sim.shape[:-1], 1.0 / m)
            v = sim.new_full((*sim.shape[:-2], n), 1.0 / n)
            plan = sinkhorn(torch.exp(-(1.0 - sim) / eps), u, v, max_iter, thresh)
        return (plan * sim).sum((-2, -1)), glob


def template_prompts(method: Method, templates: list[str]) -> list[Prompts]:
    """One `Prompts` per template: the context is the first n tokens after SOS, n the words of the first
    template, initialised from each template's own embedding there (plotpp.py:85-99, :119-133)."""
    ctx, n_ctx = method.ctx, len(templates[0].split())
    model, out = ctx.backbone.model, []
    for template in templates:
        prompts = build_prompts(ctx.backbone, ctx.classnames, n_ctx, template, ctx.device, ctx.generator(1))
        with torch.no_grad():
            init = model.token_embedding(ctx.backbone.tokenize([template]).to(ctx.device))[0, 1:1 + n_ctx]
        out.append(context_window(prompts, n_ctx, init.float()))
    return out


def random_prompts(method: Method) -> list[Prompts]:
    """N prompts "X X X X <class>." with their own N(0, 0.02) contexts (plotpp.py:104-109)."""
    ctx, gen = method.ctx, method.ctx.generator(1)
    return [build_prompts(ctx.backbone, ctx.classnames, method.config.n_ctx, RANDOM, ctx.device, gen)
            for _ in range(method.config.n_text)]


@register_method("plot_pp")
class PlotPP(Method):
    """N text prompts and M vision prompts per class matched by Sinkhorn optimal transport; CLIP frozen."""

    Config = PlotPPConfig
    input_kind = "images"
    paper = "Chen et al., PLOT: Prompt Learning with Optimal Transport for Vision-Language Models, ICLR 2023"
    summary = "PLOT++: 4 text x 4 vision prompts matched by Sinkhorn OT, vision-only then joint stage"

    @classmethod
    def supports(cls, backbone: BackboneInfo) -> str | None:
        return backbone_support(backbone)

    def _build(self, templates: list[str] | None) -> None:
        cfg, ctx = self.config, self.ctx
        reason = tower_support(ctx.backbone.model)
        if reason:
            raise ConfigError(f"plot_pp cannot run on {ctx.backbone.spec.name}: {reason}")
        self.templates = templates
        self.prompts = random_prompts(self) if templates is None else template_prompts(self, templates)
        self.context = nn.Parameter(torch.stack([p.init for p in self.prompts]))
        width = ctx.backbone.model.visual.transformer.width
        noise = torch.randn(cfg.n_vision, cfg.n_ctx_vision, width, generator=ctx.generator(2)) * INIT_STD
        self.vision = nn.Parameter(noise.to(ctx.device))

    def _templates(self) -> list[str] | None:
        if self.config.init == RANDOM:
            return None
        return TEMPLATES.get(self.ctx.dataset, TEMPLATES[DEFAULT_DATASET])[:self.config.n_text]

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build(self._templates())
        epochs = cfg.epochs or coop_epochs(ctx.shots, ctx.dataset)
        self.config = cfg = dataclasses.replace(cfg, epochs=epochs)  # the stored config records what ran
        bb = ctx.backbone
        batches = fewshot_image_batches(train, train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale),
                                        cfg.batch_size, ctx.generator())
        steps = dassl_steps(len(train), cfg.batch_size)
        if cfg.two_stage:
            with torch.no_grad(), ctx.autocast():
                fixed = self.text_features()
            train_epochs(ctx, cfg.optimizer([self.vision]), batches, self._loss(lambda: fixed, trade_off=True),
                         epochs, steps, cfg.schedule(epochs), "train plot_pp (stage 1: vision prompts)")
        train_epochs(ctx, cfg.optimizer([self.context, self.vision]), batches,
                     self._loss(self.text_features, trade_off=False), epochs, steps, cfg.schedule(epochs),
                     "train plot_pp (stage 2: joint)")
        self._finish()

    def _loss(self, text: Callable[[], torch.Tensor], trade_off: bool) -> Callable:
        def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.scores(self.image_features(images), text(), trade_off), labels)
        return loss

    def text_features(self) -> torch.Tensor:
        """(N, C, D) unnormalised features of the N prompts of every class."""
        model = self.ctx.backbone.model
        return torch.stack([text_forward(model, assemble_prompts(p, c), p.eot, normalize=False).float()
                            for p, c in zip(self.prompts, self.context, strict=True)])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(M, B, D) unnormalised features of the images, once per vision prompt."""
        m, b = self.vision.shape[0], images.shape[0]
        prompts = self.vision.repeat_interleave(b, dim=0)  # image-major within each prompt
        pooled = vision_tokens(self.ctx.backbone.model, images.repeat(m, 1, 1, 1), prompts)[0]
        return pooled.float().view(m, b, -1)

    def scores(self, image: torch.Tensor, text: torch.Tensor, trade_off: bool = False) -> torch.Tensor:
        """Logits (B, C): scaled OT similarity, plus the global cosine with `trade_off` (stage 1)."""
        cfg = self.config
        ot, glob = ot_scores(image, text, cfg.eps, cfg.max_iter, cfg.thresh)
        return cfg.logit_scale * (ot + glob if trade_off else ot)

    def _finish(self) -> None:
        self.context.requires_grad_(False)
        self.vision.requires_grad_(False)
        with torch.no_grad(), self.ctx.autocast():
            self.text = self.text_features()

    def retarget(self) -> None:
        """Unseen classes: the learned contexts (with the fitted templates' fixed words) before their names."""
        learned = self.context
        self.prompts = (random_prompts(self) if self.templates is None
                        else template_prompts(self, self.templates))
        self.context = learned
        self._finish()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(self.image_features(x), self.text)

    def trainable_params(self) -> int:
        return self.context.numel() + self.vision.numel()

    def inference_overhead(self) -> int:
        return self.trainable_params()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"context": self.context.detach(), "vision": self.vision.detach()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build(self._templates())
        with torch.no_grad():
            self.context.copy_(tensors["context"])
            self.vision.copy_(tensors["vision"])
        self._finish()

