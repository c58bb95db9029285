"""CLAP (Silva-Rodriguez, Hajimiri, Ben Ayed & Dolz, "A Closer Look at the Few-Shot Adaptation of Large
Vision-Language Models", CVPR 2024, arXiv 2312.12730): a linear probe initialised at the zero-shot
prototypes and held near them by a class-adaptive penalty, with no validation set at all.

    logits = s * norm(f) norm(W)^T,   loss = CE + mean_c lambda_c ||W_c - t_c||^2

with t_c the un-normalised zero-shot text prototype of class c and lambda_c the mean zero-shot
probability of class c on its own (augmented) support samples. Defaults follow the official code
(github.com/jusiro/CLAP; files at commit dbdf409):
- trainers/adapters.py:91-128 the prototypes t_c: mean of the raw (un-normalised) text embeddings of
  the dataset's CoOp template (on ImageNet also the 7 of IMAGENET_TEMPLATES_SELECT), with the class
  names of CoOp's split files (as TaskRes, whose code CLAP builds on: `official_classnames`);
  :148-150 W starts at t_c ("ZS" initialisation);
- :219-230 the penalty, mean over classes of lambda_c times the squared L2 distance ("l2") or
  1 - cosine ("cosine"); :232-252 lambda_c = diag(softmax(zero-shot logits)^T onehot) / class count,
  "balanced" = 1, "corrected" rescaled to sum to C, "constant" = their mean;
- :254-284 the optional augmented-Lagrangian outer step after each epoch ("adaptative"):
  lambda <- max(0, lambda + rho * d), rho <- d, with d the current squared distances;
- :142-143, 537-538 and 788-827: 20 augmented views of each support image (Dassl's
  RandomResizedCrop, scale 0.08-1, bicubic, + flip), each view a sample;
- :421-484 and :679-724 each epoch shuffles the pooled views and takes len(train loader) batches of
  256 from them: N // 256 batches when N >= 256 (Dassl drops the last batch), else one;
- train.py:91-95 INIT "ZS", CONSTRAINT "l2"; configs/trainers/SGD_lr1e-1_B256_ep300.yaml:15-23
  SGD lr 0.1 (Dassl momentum 0.9), no weight decay, 300 epochs, cosine after one warm-up epoch at
  1e-5; logits scaled by CLIP's logit scale (exp = 100 for OpenAI weights); the last epoch is kept.

Deviations: float32 throughout (the official code encodes in fp16); the views are L2-normalised
when cached (the official logits normalise them anyway, so nothing changes); each image's views are
drawn from an RNG seeded by (`view_seed`, image path), so they are encoded once per grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from fsbench.checks import check_at_least, check_crop_scale, check_fraction, check_positive
from fsbench.errors import ConfigError, RunFailed
from fsbench.images import Views, item_seed
from fsbench.method import Context, FewShotData, Method, register_method
from fsbench.methods.taskres import base_text_features, official_classnames
from fsbench.methods.tip_adapter import augment_transform
from fsbench.training import DasslSchedule, check_dassl_schedule, dassl_steps, shuffled_batches, train_epochs

CONSTRAINTS = ("l2", "cosine", "none")
MULTIPLIERS = ("zero_shot", "balanced", "corrected", "constant")


@dataclass
class CLAPFields:
    """CLAP's own fields and its SGD (no weight decay): the first part of `CLAPConfig`'s stored keys."""

    constraint: str = "l2"  # "l2" (CLAP), "cosine", or "none" (the zero-shot-initialised probe, ZS-LP)
    multipliers: str = "zero_shot"  # lambda_c: "zero_shot" (official), "balanced", "corrected", "constant"
    adaptive: bool = False  # augmented-Lagrangian outer step after each epoch (official "adaptative")
    augment_views: int = 20  # augmented views per support image; 0 = the cached un-augmented features
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # Dassl RandomResizedCrop
    view_seed: int = 1  # seeds each image's views
    lr: float = 0.1
    momentum: float = 0.9


@dataclass
class CLAPConfig(DasslSchedule, CLAPFields):
    """CLAP hyper-parameters (official code: train.py, configs/trainers/SGD_lr1e-1_B256_ep300.yaml): its own
    fields, then Dassl's schedule (`fsbench.training.DasslSchedule`), then the logit scale."""

    batch_size: int = 256
    epochs: int = 300
    logit_scale: float = 100.0

    section: ClassVar[str] = "clap"

    def __post_init__(self) -> None:
        if self.constraint not in CONSTRAINTS:
            raise ConfigError(f"clap.constraint must be one of {', '.join(CONSTRAINTS)}, got {self.constraint!r}")
        if self.multipliers not in MULTIPLIERS:
            raise ConfigError(f"clap.multipliers must be one of {', '.join(MULTIPLIERS)}, got {self.multipliers!r}")
        for name in ("lr", "logit_scale"):
            check_positive("clap", name, getattr(self, name))
        check_fraction("clap", "momentum", self.momentum)
        check_at_least("clap", "augment_views", self.augment_views, 0)
        check_dassl_schedule("clap", self)
        check_crop_scale("clap", "crop_scale", self.crop_scale)


def _encode_views(ctx: Context, fewshot: FewShotData, transform: Views, tag: str, seed: int) -> torch.Tensor:
    """(N, views, D) cached normalised features of `fewshot`'s images under `transform` (the one call
    into the run's feature cache)."""
    return ctx.features.encode(fewshot, transform, tag=tag, seed=lambda it: item_seed(seed, it.path)).x


def zero_shot_multipliers(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """(C,) penalty weights lambda_c from the zero-shot logits of the support samples (official
    `init_lagrangian_multipliers`): the mean softmax probability of each class on its own samples."""
    if mode == "balanced":
        return torch.ones(num_classes, device=logits.device)
    onehot = F.one_hot(labels, num_classes).float()
    performance = torch.diag(logits.softmax(-1).T @ onehot) / onehot.sum(0)
    if mode == "corrected":
        performance = performance * (num_classes / performance.sum())
    elif mode == "constant":
        performance = torch.full_like(performance, performance.mean().item())
    return performance


def dissimilarity(prototypes: torch.Tensor, base: torch.Tensor, constraint: str) -> torch.Tensor:
    """(C,) distance of each learned prototype to its zero-shot one: squared L2 or 1 - cosine."""
    if constraint == "cosine":
        return 1 - F.cosine_similarity(prototypes, base, dim=-1)
    return (prototypes - base).pow(2).sum(-1)


def outer_step(distance: torch.Tensor, multipliers: torch.Tensor,
               rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented-Lagrangian (PHR) update (official `outer_step`): the new multipliers are the
    PHR gradient max(0, lambda + rho * d); the new penalty parameters rho are the distances d."""
    grown = multipliers + rho * distance
    return torch.where(grown >= 0, grown, torch.zeros_like(grown)), distance.clone()


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Batches per epoch: the length of Dassl's train loader over the N support images."""
    return dassl_steps(n_images, batch_size)


@register_method("clap")
class CLAP(Method):
    """Zero-shot-initialised linear probe, penalised per class towards the zero-shot prototypes."""

    Config = CLAPConfig
    input_kind = "features"
    paper = ("Silva-Rodriguez et al., A Closer Look at the Few-Shot Adaptation of Large "
             "Vision-Language Models, CVPR 2024")
    summary = "CLAP: zero-shot-initialised linear probe with a class-adaptive penalty, no validation"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        x, y = self._support(train)
        items = list(zip(train.labels.tolist(), train.items, strict=True))
        base = base_text_features(self, official_classnames(ctx.dataset, ctx.classnames, items))
        self.prototypes = base.clone()
        self.multipliers = torch.zeros(ctx.num_classes, device=ctx.device)
        if cfg.constraint != "none":
            with torch.no_grad():
                self.multipliers = zero_shot_multipliers(self.logits(x), y, ctx.num_classes, cfg.multipliers)
        self._train(x, y, base, steps_per_epoch(len(train), cfg.batch_size))

    def _support(self, train: FewShotData) -> tuple[torch.Tensor, torch.Tensor]:
        """The training samples: every augmented view of every support image (or the cached features)."""
        cfg, dev = self.config, self.ctx.device
        if cfg.augment_views == 0:
            return train.features.to(dev).float(), train.labels.to(dev)
        tf = Views(augment_transform(self.ctx.backbone, cfg.crop_scale), cfg.augment_views)
        views = _encode_views(self.ctx, train, tf, f"clap-views-seed{cfg.view_seed}", cfg.view_seed)
        return views.flatten(0, 1).to(dev).float(), train.labels.repeat_interleave(cfg.augment_views).to(dev)

    def _train(self, x: torch.Tensor, y: torch.Tensor, base: torch.Tensor, steps: int) -> None:
        """SGD on cross-entropy + penalty; Dassl's warm-up + cosine per epoch; last epoch kept."""
        cfg, ctx = self.config, self.ctx
        w = self.prototypes.clone().requires_grad_(True)
        rho = torch.zeros_like(self.multipliers)

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(self._scores(xb, w), yb)
            if cfg.constraint != "none":
                loss = loss + (self.multipliers * dissimilarity(w, base, cfg.constraint)).mean()
            return loss

        def end_epoch(epoch: int) -> None:
            nonlocal rho
            if cfg.adaptive and cfg.constraint != "none":
                with torch.no_grad():
                    self.multipliers, rho = outer_step(dissimilarity(w, base, "l2"), self.multipliers, rho)

        # the pooled views are shuffled each epoch; `steps` batches as Dassl's loader over the support images
        train_epochs(ctx, torch.optim.SGD([w], lr=cfg.lr, momentum=cfg.momentum),
                     shuffled_batches(x, y, cfg.batch_size, ctx.generator(1), steps), loss_fn, cfg.epochs, steps,
                     cfg.lr_schedule(cfg.lr, cfg.epochs), "train clap",
                     amp=False, end_epoch=end_epoch)
        self.prototypes = w.detach()
        if not torch.isfinite(self.prototypes).all():
            raise RunFailed(f"clap: training diverged (non-finite prototypes) with lr={cfg.lr}")

    def _scores(self, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * F.normalize(x, dim=-1) @ F.normalize(prototypes, dim=-1).T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._scores(x.float(), self.prototypes)

    def trainable_params(self) -> int:
        return self.prototypes.numel()

    def inference_overhead(self) -> int:
        return self.prototypes.numel()
