"""DePT (Zhang et al., "DePT: Decoupled Prompt Tuning", CVPR 2024, arXiv 2309.07439) as the plug-in it is:
a channel-wise transform (cwT) of the image and text features and a linear classifier head beside the
prompt method's cosine logits, trained jointly; on the fitted classes the two logits are fused, on unseen
classes only the prompt method's logits remain. Registered per base method, so that a result names both
parts: `dept_coop` (DePT on CoOp), `dept_kgcoop` (DePT on KgCoOp) and `dept_maple` (DePT on MaPLe).

    f, v = the base method's unnormalised image / class text features
    sim = s cos(f, v)                      (the base method's logits)
    lp  = W cwT_img(f) + b                 (linear head over the fitted classes)
    loss = (1 - w) CE(sim, y) + w CE(W [cwT_txt(v_y); cwT_img(f)] + b, [y; y])  (+ KgCoOp's 2.0 x penalty)
    test (fitted classes): (1 - w) sim + w lp;  unseen classes: sim

Official code: github.com/Koorye/DePT (commit d4ff416):
- trainers/elp_coop.py:19-48 the cwT modules (`FiLM`, trainers/elp_maple.py:18-40: scale ones, bias zeros, per
  channel) on image and text features and the head `Linear(D, n_classes)`; :57-75 training loss and test-time
  fusion; :77-84 unseen classes: similarity logits only; :103-124 the head is trained on the fitted class's
  text feature and the image feature of each sample (labels repeated); :126-133 the loss weights;
- trainers/elp_kgcoop.py:116-130 on KgCoOp the loss adds W x (1 - mean cos(v, v_handcrafted));
- train.py:67-102 defaults: LINEAR_PROBE.WEIGHT 0.7, TYPE "linear", TEST_TIME_FUSION true, FILM.LINEAR_PROBE
  true; OPTIM LR 0.0035, MAX_EPOCH 10, STAGED_LR with LR_EXP 6.5 on the NEW_LAYERS ("linear_probe", "film"):
  the head and cwT train at 0.0035 x 6.5, the prompts at 0.0035 (trainers/optim.py:36-83); COOP.N_CTX 16,
  CTX_INIT "" (random), COOP.W 2.0 (KgCoOp's weight in DePT);
- configs/trainers/ExtrasLinearProbeCoOp/vit_b16_ep10_bs4_lr35.yaml and ExtrasLinearProbeKgCoOp/
  vit_b16_ep10_ctxv1_bs4_lr35.yaml: batch 4 (:3), SGD lr 0.0035 (:16-17), 10 epochs (:18), cosine after one
  constant warm-up epoch at 1e-5 for every parameter group (:19-22), random resized crop + flip (:13); KgCoOp:
  4 tokens from "a photo of a", W 2.0 (:31-38).

Deviations: the official code builds the head only for base classes (base-to-new) or ImageNet (cross-dataset
source); under fsbench's few-shot protocol the fitted classes play the base classes' part. bf16 autocast on
GPU (official fp16); parameters from generators seeded by the run's seed; the test split's unnormalised image
features are cached once per backbone (`eval_encoder`; DePT on MaPLe re-encodes the test images through its
prompted vision tower). DePT on MaPLe follows trainers/elp_maple.py:43-150 (the same head, loss and fusion on
MaPLe's prompted features; ExtrasLinearProbeMaPLe/vit_b16_c2_ep10_batch4_2ctx.yaml: 2 tokens, depth 9, 10
epochs, batch 4) on fsbench's MaPLe prompts (methods/maple.py); its loss, gradients and fused logits equal the
official code's on a random CLIP with ViT-B/16's widths (the official MaPLe projection is hard-coded 512 -> 768;
tests/fixtures/dept/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.augment import train_transform
from fsbench.checks import check_at_least, check_crop_scale, check_fraction, check_non_negative, check_positive
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, Method, register_method
from fsbench.methods.maple import maple_learner, maple_prompts
from fsbench.prompts import Prompts, assemble_prompts, build_prompts
from fsbench.text import encode_token_embeddings
from fsbench.towers import DeepPrompted, TextPrompted, text_forward, vision_tokens
from fsbench.training import DasslRecipe, dassl_lr, dassl_steps, fewshot_image_batches, train_epochs


@dataclass
class DePTCoOpConfig(DasslRecipe):
    """DePT on CoOp (train.py:67-102, ExtrasLinearProbeCoOp/vit_b16_ep10_bs4_lr35.yaml)."""

    lr: float = 0.0035  # the prompts' lr; the head and cwT train at lr x lr_mult
    batch_size: int = 4
    epochs: int = 10
    n_ctx: int = 16  # CoOp's context vectors (ignored when `init` gives words)
    init: str = "random"  # CTX_INIT "": N(0, 0.02); or initialisation words
    lp_weight: float = 0.7  # w: weight of the head's loss and logits against the similarity's
    lr_mult: float = 6.5  # LR_EXP: lr multiplier of the head and cwT (after the warm-up)
    cwt: bool = True  # FILM.LINEAR_PROBE: channel-wise transforms before the head
    fusion: bool = True  # TEST_TIME_FUSION: fitted classes scored by (1 - w) sim + w lp (false: lp only)
    kg_weight: float = 0.0  # KgCoOp's consistency weight (0: CoOp)
    logit_scale: float = 100.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])

    section: ClassVar[str] = "dept_coop"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self.section, "epochs", self.epochs, 1)
        check_at_least(self.section, "n_ctx", self.n_ctx, 1)
        check_fraction(self.section, "lp_weight", self.lp_weight, one=True)
        check_positive(self.section, "lr_mult", self.lr_mult)
        check_non_negative(self.section, "kg_weight", self.kg_weight)
        check_positive(self.section, "logit_scale", self.logit_scale)
        check_crop_scale(self.section, "crop_scale", self.crop_scale)
        if not self.init.strip():
            raise ConfigError(f'{self.section}.init must be "random" or initialisation words such as "a photo of a"')


@dataclass
class DePTKgCoOpConfig(DePTCoOpConfig):
    """DePT on KgCoOp (ExtrasLinearProbeKgCoOp/vit_b16_ep10_ctxv1_bs4_lr35.yaml:31-38)."""

    n_ctx: int = 4
    init: str = "a photo of a"
    kg_weight: float = 2.0

    section: ClassVar[str] = "dept_kgcoop"


@dataclass
class DePTMaPLeConfig(DePTCoOpConfig):
    """DePT on MaPLe (ExtrasLinearProbeMaPLe/vit_b16_c2_ep10_batch4_2ctx.yaml:31-36)."""

    n_ctx: int = 2  # the first n_ctx tokens of `init` are learned (MaPLe's context)
    init: str = "a photo of a"
    depth: int = 9  # MaPLe's prompt depth (capped at the shallower tower)
    coupling: bool = True  # MaPLe's projected vision prompts

    section: ClassVar[str] = "dept_maple"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self.section, "depth", self.depth, 1)


class ChannelTransform(nn.Module):
    """cwT: x * scale + bias per channel, scale ones and bias zeros at start (trainers/elp_maple.py:18-40)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.to(x.dtype) * x + self.bias.to(x.dtype)


class DePTHead(nn.Module):
    """The decoupled part: cwT of image and text features and the linear head over the fitted classes."""

    def __init__(self, dim: int, n_classes: int, cwt: bool, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(dim, n_classes)
        self.image = ChannelTransform(dim) if cwt else nn.Identity()
        self.text = ChannelTransform(dim) if cwt else nn.Identity()


def dept_loss(sim: torch.Tensor, head: DePTHead, text: torch.Tensor, image: torch.Tensor, labels: torch.Tensor,
              lp_weight: float) -> torch.Tensor:
    """(1 - w) CE(sim) + w CE(head([cwT_txt(v_y); cwT_img(f)]), [y; y]) (trainers/elp_coop.py:103-133)."""
    feats = torch.cat([head.text(text)[labels], head.image(image)])
    lp = head.linear(feats)
    return (1 - lp_weight) * F.cross_entropy(sim, labels) + lp_weight * F.cross_entropy(lp, torch.cat([labels, labels]))


def unnormalised_image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, D) image features before L2 normalisation (what the head reads; cached by the runner)."""
    return model.encode_image(images)


class DePT(TextPrompted, Method):
    """DePT's head beside a CoOp-family prompt; subclasses name the base method."""

    Config = DePTCoOpConfig
    input_kind = "images"
    eval_input = "features"  # the image tower is frozen: logits score cached unnormalised features
    eval_encoder = ("unnormalised-image", unnormalised_image_features)

    def _build(self) -> None:
        cfg, ctx = self.config, self.ctx
        self.prompts = self.make_prompts()
        self.context = nn.Parameter(self.prompts.init.clone().float())
        self.head = DePTHead(ctx.backbone.embed_dim, ctx.num_classes, cfg.cwt, ctx.seed).to(ctx.device)
        self.fitted_classes = ctx.classes
        self.handcrafted = ctx.text_weights().to(ctx.device) if cfg.kg_weight > 0 else None

    def make_prompts(self) -> Prompts:
        cfg, ctx = self.config, self.ctx
        return build_prompts(ctx.backbone, ctx.classnames, cfg.n_ctx, cfg.init, ctx.device, ctx.generator(1))

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build()
        bb = ctx.backbone
        batches = fewshot_image_batches(train, train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale),
                                        cfg.batch_size, ctx.generator())
        groups = [{"params": self.prompt_parameters(), "base_lr": cfg.lr},
                  {"params": list(self.head.parameters()), "base_lr": cfg.lr * cfg.lr_mult}]
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        def set_lrs(epoch: int) -> None:  # Dassl's constant warm-up for every group, then each group's cosine
            for g in opt.param_groups:
                g["lr"] = dassl_lr(epoch, g["base_lr"], cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr)

        set_lrs(0)
        train_epochs(ctx, opt, batches, self.loss, cfg.epochs, dassl_steps(len(train), cfg.batch_size), None,
                     f"train {self.name}", end_epoch=lambda e: set_lrs(e + 1))
        self._finish()

    def prompt_parameters(self) -> list[nn.Parameter]:
        """What the base method trains (the prompt's lr group)."""
        return [self.context]

    def image_raw(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unnormalised image features of the frozen image tower."""
        with torch.no_grad():
            return unnormalised_image_features(self.ctx.backbone.model, images).float()

    def eval_features(self, x: torch.Tensor) -> torch.Tensor:
        """What `logits` receives -> unnormalised image features (cached ones here)."""
        return x.float()

    def text_raw(self) -> torch.Tensor:
        """(C, D) unnormalised class text features of the learned prompts."""
        x = assemble_prompts(self.prompts, self.context)
        return encode_token_embeddings(self.ctx.backbone.model, x, self.prompts.eot, normalize=False).float()

    def similarity(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        image, text = self.image_raw(images), self.text_raw()
        loss = dept_loss(self.similarity(image, text), self.head, text, image, labels, cfg.lp_weight)
        if self.handcrafted is not None:  # trainers/elp_kgcoop.py:120-129
            score = 1.0 - F.cosine_similarity(text, self.handcrafted, dim=1, eps=1e-7).mean()
            loss = loss + cfg.kg_weight * score
        return loss

    def _finish(self) -> None:
        for p in self.prompt_parameters():
            p.requires_grad_(False)
        self.head.requires_grad_(False)
        with torch.no_grad(), self.ctx.autocast():
            self.text = self.text_raw()

    def retarget(self) -> None:
        """Unseen classes: the learned prompt in front of their names, similarity logits only (:77-84)."""
        self.prompts = self.make_prompts()
        self._finish()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of (N, D) unnormalised image features (`eval_encoder`; images for DePT on MaPLe)."""
        cfg, x = self.config, self.eval_features(x)
        sim = self.similarity(x, self.text)
        if self.ctx.classes != self.fitted_classes:
            return sim
        lp = self.head.linear(self.head.image(x))
        return (1 - cfg.lp_weight) * sim + cfg.lp_weight * lp if cfg.fusion else lp

    def trainable_params(self) -> int:
        return sum(p.numel() for p in [*self.prompt_parameters(), *self.head.parameters()])

    def inference_overhead(self) -> int:
        return self.trainable_params()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        head = {f"head.{k}": v.detach() for k, v in self.head.state_dict().items()}
        return {"context": self.context.detach(), **head}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        with torch.no_grad():
            self.context.copy_(tensors["context"])
        self.head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
        self._finish()


@register_method("dept_coop")
class DePTCoOp(DePT):
    """DePT on CoOp: 16 random context vectors + cwT and a linear head fused with the cosine logits."""

    Config = DePTCoOpConfig
    paper = "Zhang et al., DePT: Decoupled Prompt Tuning, CVPR 2024 (on CoOp, Zhou et al., IJCV 2022)"
    summary = "DePT on CoOp: channel-wise transform + linear head beside CoOp's cosine logits (w = 0.7)"


@register_method("dept_kgcoop")
class DePTKgCoOp(DePT):
    """DePT on KgCoOp: "a photo of a" context, 2.0 x KgCoOp's penalty, cwT and the fused linear head."""

    Config = DePTKgCoOpConfig
    paper = "Zhang et al., DePT: Decoupled Prompt Tuning, CVPR 2024 (on KgCoOp, Yao et al., CVPR 2023)"
    summary = "DePT on KgCoOp: channel-wise transform + linear head beside KgCoOp's cosine logits (w = 0.7)"


@register_method("dept_maple")
class DePTMaPLe(DeepPrompted, DePT):
    """DePT on MaPLe: coupled deep prompts (2 tokens, depth 9) + cwT and the fused linear head."""

    Config = DePTMaPLeConfig
    eval_input = None  # the vision tower is prompted: logits take images
    eval_encoder = None
    paper = "Zhang et al., DePT: Decoupled Prompt Tuning, CVPR 2024 (on MaPLe, Khattak et al., CVPR 2023)"
    summary = "DePT on MaPLe: channel-wise transform + linear head beside MaPLe's cosine logits (w = 0.7)"

    def _build(self) -> None:
        ctx = self.ctx
        self.learner = maple_learner(self)
        self.head = DePTHead(ctx.backbone.embed_dim, ctx.num_classes, self.config.cwt, ctx.seed).to(ctx.device)
        self.fitted_classes = ctx.classes
        self.handcrafted = None

    def make_prompts(self) -> Prompts:
        return maple_prompts(self)

    def prompt_parameters(self) -> list[nn.Parameter]:
        return list(self.learner.parameters())

    def image_raw(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) unnormalised image features with MaPLe's coupled vision prompts."""
        prompts, hook = self.learner.vision_prompts()
        return vision_tokens(self.ctx.backbone.model, images, prompts, hook)[0].float()

    def eval_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_raw(x)

    def text_raw(self) -> torch.Tensor:
        x = assemble_prompts(self.prompts, self.learner.context)
        return text_forward(self.ctx.backbone.model, x, self.prompts.eot, self.learner.text_hook(),
                            normalize=False).float()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        head = {f"head.{k}": v.detach() for k, v in self.head.state_dict().items()}
        return {**{f"learner.{k}": v.detach() for k, v in self.learner.state_dict().items()}, **head}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        self.learner.load_state_dict({k.removeprefix("learner."): v for k, v in tensors.items()
                                      if k.startswith("learner.")})
        self.head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
        self._finish()
