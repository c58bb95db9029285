"""GDA (Wang, Liang, Sheng, He, Wang & Tan, "A Hard-to-Beat Baseline for Training-free CLIP-based
Adaptation", ICLR 2024, openreview.net/forum?id=Js5PJPHDyY): Gaussian discriminant analysis on the
frozen image features, ensembled with zero-shot CLIP, without training.

    logits = 100 f T^T + alpha (f W^T + b),   W_c = P mu_c,   b_c = log(1/C) - mu_c^T P mu_c / 2

with mu_c the class means of the L2-normalised support features and P the precision of their shared
covariance. Defaults follow the official code (github.com/mrflogs/ICLR24, main_few_shots.py at commit
560fe21):
- :24-29 and :45-53 each support image gives `augment_epoch` = 10 views (configs/few_shots/*.yaml:10),
  RandomResizedCrop scale 0.5-1 (bicubic) + flip, each view L2-normalised and used as a sample; on
  ImageNet the views come from datasets/imagenet.py:209-214 instead (:129-132), scale 0.08-1
  (`OFFICIAL_CROP_SCALE`);
- :139 the zero-shot term `clip_classifier(dataset.classnames, dataset.template)` (utils.py:18-35, the
  normalised mean of the normalised template embeddings): the dataset's CoOp template, and on ImageNet
  the 7-template ensemble of datasets/imagenet.py:180-186 (`self.template`, :219; `IMAGENET_ENSEMBLE`);
- :56 mu_c = mean of the class's samples; :59-60 the "KS" shrinkage estimate of the precision,
  P = D * pinv((M - 1) S + tr(S) I), with S the unbiased covariance of the M class-centred samples
  and D the feature dimension; :62-64 uniform priors 1/C, W and b as above;
- :68-79 alpha is searched over [1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100] on validation: the first
  alpha with the best validation accuracy wins (strictly better than the previous best), and alpha
  stays 0.1 if none scores above 0; :71 the logits above.

Deviations: alpha is searched on the few-shot validation set (min(K, 4) shots per class); the
official code searches it on the dataset's whole validation split, and on the TEST set for ImageNet
(:137). The estimate is computed in float64 (the official one in fp16/fp32 on GPU). Outside ImageNet the
views are Tip-Adapter's (same transform, same per-image seeds), so a grid running both encodes them once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fsbench.checks import check_at_least, check_crop_scale, check_list, check_positive
from fsbench.data.templates import ensemble_templates
from fsbench.method import FewShotData, Method, register_method
from fsbench.methods.tip_adapter import augmented_views
from fsbench.metrics import accuracy
from fsbench.training import best_on_validation


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GDAConfig:
    """GDA hyper-parameters (official main_few_shots.py and configs/few_shots/*.yaml)."""

    augment_views: int = 10  # augmented views per support image ("augment_epoch"); 0 = un-augmented features
    crop_scale: list[float] | None = None  # RandomResizedCrop, bicubic; None = official: OFFICIAL_CROP_SCALE
    view_seed: int = 1  # seeds each image's views (shared with Tip-Adapter's cache)
    alphas: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0])
    default_alpha: float = 0.1  # kept when no alpha gets a validation accuracy above 0
    alpha: float | None = None  # a fixed ensemble weight instead of the search
    logit_scale: float = 100.0  # of the zero-shot term

    def __post_init__(self) -> None:
        check_at_least("gda", "augment_views", self.augment_views, 0)
        if self.crop_scale is not None:
            check_crop_scale("gda", "crop_scale", self.crop_scale)
        check_list("gda", "alphas", self.alphas, "finite numbers", _finite)
        for name in ("default_alpha", "logit_scale"):
            check_positive("gda", name, getattr(self, name))
        if self.alpha is not None:
            check_positive("gda", "alpha", self.alpha)


# the official augmented views' crop scale: main_few_shots.py:25, and datasets/imagenet.py:210 on ImageNet
OFFICIAL_CROP_SCALE = {"imagenet": [0.08, 1.0]}
DEFAULT_CROP_SCALE = [0.5, 1.0]


def official_crop_scale(dataset: str) -> list[float]:
    """RandomResizedCrop's scale of the official GDA views on `dataset`."""
    return list(OFFICIAL_CROP_SCALE.get(dataset, DEFAULT_CROP_SCALE))


def class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) mean feature of each class."""
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    return onehot.T @ x / onehot.sum(0).clamp(min=1)[:, None]


def shrunk_precision(centred: torch.Tensor) -> torch.Tensor:
    """(D, D) precision of class-centred samples (M, D): D * pinv((M - 1) S + tr(S) I) with S their
    unbiased covariance (official "KS estimator", main_few_shots.py:59-60)."""
    cov = torch.cov(centred.T)
    eye = torch.eye(centred.shape[1], dtype=centred.dtype, device=centred.device)
    return centred.shape[1] * torch.linalg.pinv((centred.shape[0] - 1) * cov + cov.trace() * eye)


def gda_classifier(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear discriminant (W (C, D), b (C,)) of Gaussians with a shared covariance and uniform priors."""
    means = class_means(x, y, num_classes)
    precision = shrunk_precision(x - means[y])
    weight = means @ precision
    bias = math.log(1.0 / num_classes) - 0.5 * (weight * means).sum(-1)
    return weight, bias


def search_alpha(zero_shot: torch.Tensor, gda: torch.Tensor, labels: torch.Tensor, alphas: list[float],
                 default: float) -> float:
    """The first alpha with the best accuracy of `zero_shot + alpha * gda`, strictly above 0 (official)."""
    return best_on_validation(alphas, lambda alpha: accuracy(zero_shot + alpha * gda, labels), initial=default,
                              floor=0.0)


@register_method("gda")
class GDA(Method):
    """Training-free Gaussian discriminant analysis on frozen features, ensembled with zero-shot."""

    Config = GDAConfig
    input_kind = "features"
    paper = "Wang et al., A Hard-to-Beat Baseline for Training-free CLIP-based Adaptation, ICLR 2024"
    summary = "GDA: shared-covariance Gaussian classifier on features + zero-shot, alpha picked on val"
    version = 2  # issue 25: ImageNet: the official 7-template zero-shot term and 0.08-1 crop scale

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        if self.config.crop_scale is None:
            self.config = dataclasses.replace(self.config, crop_scale=official_crop_scale(self.ctx.dataset))
        cfg, dev = self.config, self.ctx.device
        x, y = self._support(train)
        weight, bias = gda_classifier(x.double(), y, self.ctx.num_classes)
        self.weight, self.bias = weight.float(), bias.float()
        self.text = self.ctx.text_weights(ensemble_templates(self.ctx.dataset, self.ctx.templates)).to(dev)
        alpha = cfg.alpha
        if alpha is None:
            vx = val.features.to(dev).float()
            alpha = search_alpha(self._zero_shot(vx), self._gda(vx), val.labels.to(dev), cfg.alphas,
                                 cfg.default_alpha)
        self.alpha = torch.tensor(float(alpha), dtype=torch.float64)

    def _support(self, train: FewShotData) -> tuple[torch.Tensor, torch.Tensor]:
        """Every augmented view of every support image as a sample (or the cached features)."""
        cfg, dev = self.config, self.ctx.device
        if cfg.augment_views == 0:
            return train.features.to(dev).float(), train.labels.to(dev)
        views = augmented_views(self.ctx, train, cfg.augment_views, cfg.crop_scale, cfg.view_seed)  # (V, N, D)
        return views.flatten(0, 1).to(dev).float(), train.labels.repeat(cfg.augment_views).to(dev)

    def _zero_shot(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * x @ self.text.T

    def _gda(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self._zero_shot(x) + self.alpha.item() * self._gda(x)

    def trainable_params(self) -> int:
        return 0  # estimated in closed form, not trained

    def inference_overhead(self) -> int:
        return self.weight.numel() + self.bias.numel()
