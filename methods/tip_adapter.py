"""Tip-Adapter (Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV 2022, arXiv 2207.09519): a key-value cache of the few-shot training set
added to zero-shot CLIP, without training.

    logits = 100 * f W^T + alpha * exp(-beta * (1 - f K^T)) V

with K the few-shot train features, each the mean over augmented views, and V their one-hot
labels. Defaults follow the official code (github.com/gaopengcuhk/Tip-Adapter: main.py,
utils.py, configs/*.yaml): 10 augmented views (random resized crop scale 0.5-1, bicubic, + flip),
alpha and beta searched on a grid of 200 betas x 20 alphas, each from 0.1 to the dataset's
`search_scale` (`OFFICIAL` below), keeping the first best. On ImageNet the text classifier
averages the official 7-template ensemble (datasets/imagenet.py:177; `IMAGENET_ENSEMBLE`).
The per-dataset values that `fit` resolves (init_alpha, init_beta, search_scale) are written back
into `self.config`, so a result records the values that ran.

Deviations: the official code searches alpha and beta on the dataset's whole validation split
(main.py), and on the TEST set for ImageNet (main_imagenet.py); we search on the few-shot
validation set (min(K, 4) shots per class) only, and never look at test data. The cache keys
average L2-normalised view features (the feature cache stores normalised features); the
official code averages raw features. The official code draws the views from torch's RNG
seeded with 1 in its single run; here each image's views are drawn from an RNG seeded by
(`view_seed`, default 1, and the image's path), so they do not depend on the run's seed or on
which other images were drawn, and are encoded once per grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from fsbench.backbones import Backbone
from fsbench.checks import check_at_least, check_crop_scale, check_list, check_non_negative, positive
from fsbench.data.templates import ensemble_templates
from fsbench.features import Features
from fsbench.images import Views, item_seed
from fsbench.method import Context, FewShotData, Method, register_method
from fsbench.metrics import accuracy
from fsbench.training import BestOnValidation

# dataset -> (init_alpha, init_beta, search_scale [beta, alpha]). From the official configs/*.yaml
# (dtd, eurosat, fgvc, imagenet, oxford_pets read from the repository; the other six are the
# values of the repository's later config files). Datasets not listed use ImageNet's.
OFFICIAL: dict[str, tuple[float, float, list[float]]] = {
    "caltech101": (3.0, 1.0, [12.0, 5.0]),
    "dtd": (2.0, 1.0, [13.0, 13.0]),
    "eurosat": (2.0, 1.0, [12.0, 10.0]),
    "fgvc_aircraft": (5.0, 1.0, [30.0, 30.0]),
    "food101": (1.17, 1.0, [10.0, 10.0]),
    "imagenet": (1.17, 1.0, [7.0, 3.0]),
    "oxford_flowers": (10.0, 1.0, [50.0, 50.0]),
    "oxford_pets": (1.17, 1.0, [7.0, 3.0]),
    "stanford_cars": (3.0, 1.0, [20.0, 10.0]),
    "sun397": (1.17, 1.0, [12.0, 10.0]),
    "ucf101": (3.0, 1.0, [7.0, 3.0]),
}


@dataclass
class TipAdapterConfig:
    """Tip-Adapter hyper-parameters (official code and configs)."""

    augment_views: int = 10  # augmented views averaged into each cache key ("augment_epoch")
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # RandomResizedCrop
    search: bool = True  # grid-search alpha, beta on the few-shot validation set
    search_scale: list[float] | None = None  # [beta max, alpha max]; None = OFFICIAL[dataset]
    search_step: list[int] = field(default_factory=lambda: [200, 20])  # grid points [beta, alpha]
    init_alpha: float | None = None  # used without search; None = OFFICIAL[dataset]
    init_beta: float | None = None
    view_seed: int = 1  # seeds the views' crops and flips (the official main.py seeds torch with 1)
    section: ClassVar[str] = "tip_adapter"  # the name in error messages

    def __post_init__(self) -> None:
        s = self.section
        check_at_least(s, "augment_views", self.augment_views, 1)
        check_crop_scale(s, "crop_scale", self.crop_scale)
        check_list(s, "search_step", self.search_step, "integers >= 1 ([beta steps, alpha steps])",
                   lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, length=2)
        if self.search_scale is not None:
            check_list(s, "search_scale", self.search_scale, "numbers > 0 ([beta max, alpha max])", positive, 2)
        for name in ("init_alpha", "init_beta"):
            if getattr(self, name) is not None:
                check_non_negative(s, name, getattr(self, name))


def official(dataset: str) -> tuple[float, float, list[float]]:
    return OFFICIAL.get(dataset, OFFICIAL["imagenet"])


def grid(scale: float, steps: int) -> list[float]:
    """The official grid: `steps` values from 0.1 upwards in steps of (scale - 0.1) / steps."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def cache_logits(affinity: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta (1 - affinity)) V: affinity (N, NK) cosine similarities, V (NK, C) one-hot."""
    return torch.exp(-beta * (1.0 - affinity)) @ values


def search_alpha_beta(affinity: torch.Tensor, zero_shot: torch.Tensor, values: torch.Tensor,
                      labels: torch.Tensor, betas: list[float], alphas: list[float]) -> tuple[float, float]:
    """(alpha, beta) with the best accuracy of `zero_shot + alpha * cache`; the first best wins,
    betas outer and alphas inner, as in the official `search_hp`."""
    alpha_t = torch.tensor(alphas, device=affinity.device, dtype=affinity.dtype)
    best: BestOnValidation[tuple[float, float]] = BestOnValidation()
    for beta in betas:
        logits = zero_shot.unsqueeze(0) + alpha_t[:, None, None] * cache_logits(affinity, values, beta).unsqueeze(0)
        for alpha, alpha_logits in zip(alphas, logits, strict=True):  # one cache per beta, every alpha at once
            best.offer(accuracy(alpha_logits, labels), lambda a=alpha, b=beta: (a, b))
    return best.state


def augment_transform(backbone: Backbone, scale: list[float]) -> transforms.Compose:
    """Tip-Adapter's cache augmentation: RandomResizedCrop (bicubic) + horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(backbone.image_size, scale=tuple(scale),
                                     interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.ToTensor(),
        transforms.Normalize(backbone.mean, backbone.std),
    ])


def augmented_views(ctx: Context, train: FewShotData, views: int, scale: list[float],
                    view_seed: int) -> torch.Tensor:
    """(views, N, D) normalised features of `views` augmented copies of the train images.

    Each image's views come from an RNG seeded by (`view_seed`, image path), so an image has
    the same views in every run that draws it; they go through the runner's feature cache, so
    a whole shots x seeds grid of Tip-Adapter and Tip-Adapter-F encodes each image's views once.
    """
    tf = Views(augment_transform(ctx.backbone, scale), views)
    feats: Features = ctx.features.encode(train, tf, tag=f"tip-adapter-views-seed{view_seed}",
                                          seed=lambda it: item_seed(view_seed, it.path))
    return feats.x.transpose(0, 1)


@register_method("tip_adapter")
class TipAdapter(Method):
    """Training-free cache model of augmented few-shot features; alpha, beta searched on val."""

    Config = TipAdapterConfig
    input_kind = "features"
    paper = "Zhang et al., Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification, ECCV 2022"
    summary = "Tip-Adapter: training-free key-value cache of augmented shots, alpha/beta picked on val"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        self.build_cache(train)
        self.select(val)

    def build_cache(self, train: FewShotData) -> torch.Tensor:
        """Set keys, values, the zero-shot classifier and the initial alpha, beta; return the
        (views, N, D) augmented train features."""
        cfg, dev = self.config, self.ctx.device
        views = augmented_views(self.ctx, train, cfg.augment_views, cfg.crop_scale, cfg.view_seed).to(dev)
        self.keys = F.normalize(views.mean(0), dim=-1)
        self.values = F.one_hot(train.labels, self.ctx.num_classes).float().to(dev)
        self.text = self.ctx.text_weights(ensemble_templates(self.ctx.dataset, self.ctx.templates)).to(dev)
        init_alpha, init_beta, _ = official(self.ctx.dataset)
        self.alpha = init_alpha if cfg.init_alpha is None else cfg.init_alpha
        self.beta = init_beta if cfg.init_beta is None else cfg.init_beta
        self.config = dataclasses.replace(cfg, init_alpha=self.alpha, init_beta=self.beta)
        return views

    def select(self, val: FewShotData) -> None:
        """Grid-search alpha and beta on the few-shot validation set (unless `search` is off)."""
        cfg, dev = self.config, self.ctx.device
        if not cfg.search:
            return
        scale = cfg.search_scale or official(self.ctx.dataset)[2]
        self.config = dataclasses.replace(cfg, search_scale=list(scale))
        x = val.features.to(dev).float()
        self.alpha, self.beta = search_alpha_beta(
            self.affinity(x), 100.0 * x @ self.text.T, self.values, val.labels.to(dev),
            grid(scale[0], cfg.search_step[0]), grid(scale[1], cfg.search_step[1]))

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.keys.T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return 100.0 * x @ self.text.T + self.alpha * cache_logits(self.affinity(x), self.values, self.beta)

    def inference_overhead(self) -> int:
        return self.keys.numel() + self.values.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "text": self.text,
                "alpha": torch.tensor(self.alpha, dtype=torch.float64),
                "beta": torch.tensor(self.beta, dtype=torch.float64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.keys, self.values, self.text = tensors["keys"], tensors["values"], tensors["text"]
        self.alpha, self.beta = tensors["alpha"].item(), tensors["beta"].item()
