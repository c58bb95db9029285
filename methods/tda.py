"""TDA (Karmanov, Guan, Lu, El Saddik & Xing, "Efficient Test-Time Adaptation of Vision-Language Models",
CVPR 2024, arXiv 2403.18293): training-free online test-time adaptation of zero-shot CLIP with a positive
and a negative key-value cache of the test images seen so far.

Per test image, in the order the protocol shows them (github.com/kdiAAA/TDA at e697fb0, `tda_runner.py` :67-103,
`utils.py`; file:line below are of that commit):
- `utils.py:64-91` zero-shot logits `100 f W^T` of the image's L2-normalised feature f, their softmax
  entropy H in nats (`softmax_entropy`, :24-25), the class probabilities and the prediction p (argmax);
  with several views of one image (`views > 1`): the `int(0.1 V)` views of lowest entropy are kept (:77-78),
  f is their mean feature (not renormalised), the logits their mean logits, H the entropy of their mean
  probabilities (`avg_entropy`, :28-33), the probabilities their mean;
- `tda_runner.py:84` the positive cache takes (f, H) for class p; `update_cache` (:29-40): a class list
  under its shot capacity appends, a full one replaces its last (highest-entropy) entry when H is strictly
  lower, and the list is sorted by H (stable);
- `tda_runner.py:86-87` the negative cache does the same, with the image's probabilities, only when the
  normalised entropy H / log2(C) (`get_entropy`, utils.py:19-21: nats over log2) lies strictly inside
  `neg_entropy`;
- `tda_runner.py:89-93` and `compute_cache_logits` (:43-65): both caches are updated BEFORE the image is
  scored, then `logits = 100 f W^T + a+ exp(-b+ (1 - f K+^T)) L+ - a- exp(-b- (1 - f K-^T)) M-`, with L+ the
  one-hot classes of the positive keys and M- the negative entries' probabilities masked to 1 where
  `neg_mask[0] < prob < neg_mask[1]`, else 0; an empty cache adds nothing.

Defaults: `configs/*.yaml` (every file: positive capacity 3 at :6, negative capacity 2, alpha 0.117, beta 1.0,
entropy band (0.2, 0.5), mask band (0.03, 1.0) at :13-21; positive alpha and beta per dataset at :7-8,
`POSITIVE`). The text classifier is `clip_classifier(classnames, dataset.template)` (utils.py:44-61: per class
the normalised mean of the normalised template embeddings, fsbench's `Context.text_weights`) with the official
template lists (`official_templates`). `fit` ignores the shots; `logits` (any protocol that shows no unlabelled
test data) is that zero-shot classifier alone; `online_logits` adapts; `fresh` empties both caches.

Views (`views`, `online_transform`): 63 AugMix views + the original on ImageNet-A/-V2/-R/-Sketch as the official
`get_ood_preprocess` (utils.py:94-105, :132-135), made by the shared `fsbench.tta_views` and seeded per image; the
cached feature alone on ImageNet and the ten other datasets (:128-130, :137-139).

Deviations (docs/methods.md, "tda"): float32 (the official code runs CLIP and the caches in fp16); the
order of the test images is the protocol's seeded order (the official loader shuffles with torch's RNG seeded
with 1, tda_runner.py:116-117, utils.py:130/135/139); with V views at least one is kept (the official
`int(0.1 V)` is 0 below 10 views); datasets without an official config use ImageNet's values and the dataset's
own template; the logit scale is 100 on every backbone family (the official code runs OpenAI CLIP only).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fsbench.checks import check_at_least, check_fraction, check_non_negative, check_positive
from fsbench.data.templates import IMAGENET_ENSEMBLE
from fsbench.errors import ConfigError
from fsbench.method import Context, FewShotData, Method, register_method
from fsbench.tta_views import VIEWS, TTAViews, backbone_views

# fsbench dataset -> (official config file, positive alpha, positive beta): configs/<file>.yaml:7-8
POSITIVE: dict[str, tuple[str, float, float]] = {
    "caltech101": ("caltech101", 5.0, 5.0),
    "dtd": ("dtd", 2.0, 3.0),
    "eurosat": ("eurosat", 4.0, 8.0),
    "fgvc_aircraft": ("fgvc", 2.0, 2.0),
    "food101": ("food101", 1.0, 1.0),
    "imagenet": ("imagenet", 2.0, 5.0),
    "imagenet_a": ("imagenet_a", 2.0, 5.0),
    "imagenet_r": ("imagenet_r", 1.0, 8.0),
    "imagenet_sketch": ("imagenet_s", 2.363, 7.45),
    "imagenet_v2": ("imagenet_v", 1.0, 8.0),
    "oxford_flowers": ("oxford_flowers", 1.0, 5.0),
    "oxford_pets": ("oxford_pets", 2.0, 7.0),
    "stanford_cars": ("stanford_cars", 1.0, 7.0),
    "sun397": ("sun397", 2.0, 3.0),
    "ucf101": ("ucf101", 3.0, 8.0),
}

# the datasets whose official pipeline scores 63 AugMix views + the original (utils.py:132-135: 'A', 'V', 'R', 'S')
VIEW_DATASETS = frozenset({"imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"})

# CLIP's 80 ImageNet prompts (openai/CLIP, Prompt_Engineering_for_ImageNet.ipynb), in the order of TDA's
# datasets/imagenet_r.py:7-86 and datasets/imagenet_sketch.py:6-85
CLIP_80: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

# Datasets whose official template is not their CoOp one: the 7-template ensemble (datasets/imagenet.py:173-179,
# imagenet_a.py:7-15, imagenetv2.py:6-12, caltech101.py:7-13, stanford_cars.py:7-13, sun397.py:8-14) or CLIP's 80.
# The other seven official datasets use CoOp's template, as fsbench's (dtd.py:7, eurosat.py:7, fgvc.py:6,
# food101.py:6, oxford_flowers.py:7, oxford_pets.py:6, ucf101.py:8).
TEMPLATES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("imagenet", "imagenet_a", "imagenet_v2", "caltech101", "stanford_cars", "sun397"),
                    IMAGENET_ENSEMBLE),
    **dict.fromkeys(("imagenet_r", "imagenet_sketch"), CLIP_80),
}


def official_templates(dataset: str, own: list[str]) -> list[str]:
    """The templates TDA's official code ensembles for `dataset` (`own`: the dataset's CoOp template(s))."""
    return list(TEMPLATES.get(dataset, own))


def _check_band(name: str, value: object) -> None:
    """[lower, upper], two finite numbers with lower < upper (the official `entropy_threshold`, `mask_threshold`)."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and value[0] < value[1]):
        raise ConfigError(f"tda.{name} must be [lower, upper], two numbers with lower < upper, got {value!r}")


@dataclass
class TDAConfig:
    """TDA hyper-parameters (official configs/*.yaml; the same in every file but the positive alpha/beta)."""

    pos_enabled: bool = True  # positive cache (configs/*.yaml:5)
    pos_capacity: int = 3  # shots per class (configs/*.yaml:6)
    pos_alpha: float | None = None  # None = the dataset's config (configs/<dataset>.yaml:7; `POSITIVE`)
    pos_beta: float | None = None  # None = the dataset's config (configs/<dataset>.yaml:8)
    neg_enabled: bool = True  # negative cache (configs/*.yaml:12)
    neg_capacity: int = 2  # shots per class (configs/*.yaml:13)
    neg_alpha: float = 0.117  # configs/*.yaml:14
    neg_beta: float = 1.0  # configs/*.yaml:15
    # the normalised entropy H / log2(C) an image needs, strictly inside, to join the negative cache (:16-18)
    neg_entropy: list[float] = field(default_factory=lambda: [0.2, 0.5])
    # a negative entry's class probabilities count (as 1) strictly inside this band, else 0 (:19-21)
    neg_mask: list[float] = field(default_factory=lambda: [0.03, 1.0])
    select: float = 0.1  # with several views of an image: the fraction of lowest-entropy views kept (utils.py:78)
    # augmented views of each test image besides the original (`fsbench.tta_views`, AugMix'ed): None = the
    # official pipeline's, 63 on ImageNet-A/-V2/-R/-Sketch (utils.py:94-105, :132-135) and 0 elsewhere (:128-130,
    # :137-139); 0 = the cached feature of the image alone
    views: int | None = None
    logit_scale: float = 100.0  # of the zero-shot logits (utils.py:74)

    def __post_init__(self) -> None:
        for name in ("pos_capacity", "neg_capacity"):
            check_at_least("tda", name, getattr(self, name), 1)
        for name in ("pos_alpha", "pos_beta", "neg_alpha", "neg_beta", "logit_scale"):
            if getattr(self, name) is not None:
                check_non_negative("tda", name, getattr(self, name))
        _check_band("neg_entropy", self.neg_entropy)
        _check_band("neg_mask", self.neg_mask)
        check_positive("tda", "select", self.select)
        check_fraction("tda", "select", self.select, one=True)
        if self.views is not None:
            check_non_negative("tda", "views", self.views)


@dataclass
class Observation:
    """What one test image gives the caches and the scores (`get_clip_logits`, utils.py:64-91)."""

    feature: torch.Tensor  # (D,) the cache key: the image's feature, or the mean of its confident views'
    logits: torch.Tensor  # (C,) zero-shot logits (mean over the confident views)
    entropy: float  # H in nats: of the softmax (one view) or of the mean probabilities (several views)
    probs: torch.Tensor  # (C,) class probabilities (mean over the confident views)
    pred: int  # argmax of `logits`


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row's softmax (utils.py:24-25)."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the rows' softmax, computed in log space (`avg_entropy`, utils.py:28-33)."""
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    mean = (logp.logsumexp(dim=0) - math.log(logp.shape[0])).clamp(min=torch.finfo(logp.dtype).min)
    return -(mean * mean.exp()).sum(-1)


def observe(views: torch.Tensor, text: torch.Tensor, scale: float = 100.0, select: float = 0.1) -> Observation:
    """Zero-shot view of ONE test image from its (V, D) L2-normalised view features (utils.py:64-91).

    One view: its logits, entropy, probabilities and prediction. Several: the `max(1, int(V * select))` views of
    lowest entropy (utils.py:77-78; the official `int(V * 0.1)`, 6 of its 64) are averaged: feature, logits and
    probabilities; the entropy is that of their mean probabilities.
    """
    logits = scale * views @ text.T
    if len(views) == 1:
        return Observation(views[0], logits[0], float(softmax_entropy(logits)[0]), logits.softmax(-1)[0],
                           int(logits[0].argmax()))
    keep = torch.argsort(softmax_entropy(logits))[:max(1, int(len(views) * select))]
    chosen = logits[keep]
    mean = chosen.mean(0)
    return Observation(views[keep].mean(0), mean, float(mean_entropy(chosen)), chosen.softmax(-1).mean(0),
                       int(mean.argmax()))


class ClassCache:
    """TDA's cache: per class at most `capacity` entries (key, entropy[, probabilities]), sorted by entropy.

    Slots are preallocated, (classes, capacity, D); class c's entries fill its first `len(entropy[c])` slots, in
    the order of the official per-class lists (`update_cache`, tda_runner.py:29-40).
    """

    def __init__(self, classes: int, capacity: int, dim: int, device: torch.device, probs: bool):
        self.capacity = capacity
        self.keys = torch.zeros(classes, capacity, dim, device=device)
        self.probs = torch.zeros(classes, capacity, classes, device=device) if probs else None
        self.filled = torch.zeros(classes, capacity, dtype=torch.bool, device=device)
        self.entropy: list[list[float]] = [[] for _ in range(classes)]
        self.size = 0  # entries held, all classes

    def __len__(self) -> int:
        return self.size

    def update(self, obs: Observation) -> None:
        """Append under capacity; else replace the last (highest-entropy) entry if the new one's entropy is strictly
        lower (tda_runner.py:33-37); then a stable sort of the class by entropy (:38)."""
        c, ent = obs.pred, self.entropy[obs.pred]
        if len(ent) < self.capacity:
            slot = len(ent)
            ent.append(obs.entropy)
            self.filled[c, slot] = True
            self.size += 1
        elif obs.entropy < ent[-1]:
            slot = self.capacity - 1
            ent[slot] = obs.entropy
        else:
            return
        self.keys[c, slot] = obs.feature
        if self.probs is not None:
            self.probs[c, slot] = obs.probs
        order = sorted(range(len(ent)), key=ent.__getitem__)  # Python's stable sort, as the official `sorted`
        if order != list(range(len(ent))):
            index = torch.tensor(order, device=self.keys.device)
            self.keys[c, :len(ent)] = self.keys[c, index]
            if self.probs is not None:
                self.probs[c, :len(ent)] = self.probs[c, index]
            self.entropy[c] = [ent[i] for i in order]

    def weights(self, feature: torch.Tensor, beta: float) -> torch.Tensor:
        """exp(-(beta - beta f K^T)) of every slot, 0 for empty ones (compute_cache_logits, :63-64): (slots,)."""
        affinity = self.keys.flatten(0, 1) @ feature
        return ((-1) * (beta - beta * affinity)).exp() * self.filled.flatten()

    def class_logits(self, feature: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """The positive cache's term: alpha exp(...) one-hot(class) (:61-65), (C,)."""
        return alpha * self.weights(feature, beta).view(self.filled.shape).sum(-1)

    def masked_logits(self, feature: torch.Tensor, alpha: float, beta: float, band: list[float]) -> torch.Tensor:
        """The negative cache's term: alpha exp(...) 1[band[0] < prob < band[1]] (:57-59, :63-65), (C,)."""
        probs = self.probs.flatten(0, 1)
        values = ((probs > band[0]) & (probs < band[1])).to(probs.dtype)
        return alpha * (self.weights(feature, beta) @ values)

    def scalars(self) -> int:
        """Scalars held: D per key, 1 per entropy, C per probability vector."""
        per_entry = self.keys.shape[-1] + 1 + (self.probs.shape[-1] if self.probs is not None else 0)
        return len(self) * per_entry


def normalised_entropy(entropy: float, classes: int) -> float:
    """H / log2(C) in float32, as the official `get_entropy` (utils.py:19-21) divides the nats by log2."""
    return float(torch.tensor(entropy, dtype=torch.float32) / math.log2(classes))


def resolved(config: TDAConfig, dataset: str) -> TDAConfig:
    """`config` with the positive cache's alpha and beta of `dataset`'s official config where they are None
    (configs/<dataset>.yaml:7-8; ImageNet's for datasets without one)."""
    _, alpha, beta = POSITIVE.get(dataset, POSITIVE["imagenet"])
    views = (VIEWS if dataset in VIEW_DATASETS else 0) if config.views is None else config.views
    return dataclasses.replace(config, pos_alpha=alpha if config.pos_alpha is None else config.pos_alpha,
                               pos_beta=beta if config.pos_beta is None else config.pos_beta, views=views)


@register_method("tda")
class TDA(Method):
    """Training-free online test-time adaptation: zero-shot CLIP plus positive and negative caches of test images."""

    Config = TDAConfig
    input_kind = "features"
    test_time = "online"
    paper = "Karmanov et al., Efficient Test-Time Adaptation of Vision-Language Models, CVPR 2024"
    summary = "TDA: zero-shot CLIP + positive/negative caches of the test stream, training-free, online"

    def __init__(self, config: TDAConfig, ctx: Context):
        super().__init__(config, ctx)
        self._usage = {"scalars": 0}  # the most the caches held on any evaluation set, shared by `fresh` copies

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        """Training-free: the shots are ignored. Resolves the dataset's alpha/beta, builds the text classifier."""
        self.config = resolved(self.config, self.ctx.dataset)
        self.retarget()

    def retarget(self) -> None:
        """The text classifier of the current classes with the official templates; empty caches."""
        self.text = self.ctx.text_weights(official_templates(self.ctx.dataset, self.ctx.templates)).to(self.ctx.device)
        self.reset()

    def reset(self) -> None:
        """Empty positive and negative caches (one evaluation set's state)."""
        classes, dim = self.text.shape
        dev, cfg = self.text.device, self.config
        self.pos = ClassCache(classes, cfg.pos_capacity, dim, dev, probs=False)
        self.neg = ClassCache(classes, cfg.neg_capacity, dim, dev, probs=True)

    def fresh(self) -> TDA:
        """A copy with empty caches for one evaluation set (the official run starts each dataset empty,
        tda_runner.py:69); the context and the usage record are shared."""
        clone = copy.deepcopy(self, {id(self.ctx): self.ctx, id(self._usage): self._usage})
        clone.reset()
        return clone

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-shot scores (N, C): what TDA gives without unlabelled test data (inductive protocols)."""
        return self.config.logit_scale * x.float() @ self.text.T

    def online_transform(self) -> TTAViews | None:
        """With `views`: the original and `views` AugMix'ed views of each raw test image (the official
        `get_ood_preprocess`, utils.py:94-105: `AugMixAugmenter(..., n_views=63, augmix=True)`); else None
        (the cached feature of each image)."""
        if not self.config.views:
            return None
        return backbone_views(self.ctx.backbone, self.config.views, "always", self.ctx.classes.lineage)

    @torch.no_grad()
    def online_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of a batch of test images, one at a time in order: (N, D) features, (N, V, D) features of
        V views of each, or (N, V, 3, S, S) views (`online_transform`), encoded here."""
        if x.dim() == 5:
            n, v = x.shape[:2]
            x = F.normalize(self.ctx.backbone.model.encode_image(x.flatten(0, 1)).float(), dim=-1).view(n, v, -1)
        views = x.float().to(self.text.device)
        views = views.unsqueeze(1) if views.dim() == 2 else views
        return torch.stack([self.step(v) for v in views])

    def step(self, views: torch.Tensor) -> torch.Tensor:
        """One test image, (V, D) normalised view features: update the caches, then score it (tda_runner.py:80-93)."""
        cfg = self.config
        obs = observe(views, self.text, cfg.logit_scale, cfg.select)
        if cfg.pos_enabled:
            self.pos.update(obs)
        lower, upper = cfg.neg_entropy
        if cfg.neg_enabled and lower < normalised_entropy(obs.entropy, len(self.text)) < upper:
            self.neg.update(obs)
        out = obs.logits.clone()
        if cfg.pos_enabled and len(self.pos):
            out += self.pos.class_logits(obs.feature, cfg.pos_alpha, cfg.pos_beta)
        if cfg.neg_enabled and len(self.neg):
            out -= self.neg.masked_logits(obs.feature, cfg.neg_alpha, cfg.neg_beta, cfg.neg_mask)
        self._usage["scalars"] = max(self._usage["scalars"], self.pos.scalars() + self.neg.scalars())
        return out

    def inference_overhead(self) -> int:
        """Scalars the caches held, at most, on any evaluation set so far (0 before any test-time scoring)."""
        return int(self._usage["scalars"])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"text": self.text}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.text = tensors["text"]
        self.reset()
