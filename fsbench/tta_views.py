"""Augmented views of one test image and the confidence selection of test-time prompt tuning (TPT, Shu et al.,
NeurIPS 2022), shared by the test-time methods (`tpt`, `zero`, and `tda`, which caches on TPT's views).

Follows github.com/azshue/TPT at 63ecbac:

- `TTAViews` makes, from one PIL image, the original (Resize + CenterCrop, bicubic, then ToTensor + Normalize;
  tpt_classification.py:165-170) followed by `views` random views (63 by default: `-b 64` minus the original,
  tpt_classification.py:171 and scripts/test_tpt.sh). A view is a RandomResizedCrop (scale 0.08-1, bilinear) +
  horizontal flip of the raw image (data/datautils.py:62-66 `get_preaugment`); with `augmix` it is then AugMix'ed
  (data/datautils.py:68-84 `augmix`): three chains of 1-3 operations drawn from autocontrast, equalize,
  posterize, rotate, solarize, shear x/y, translate x/y at severity 1 (data/augmix_ops.py:141-144, the AugMix
  operations of Hendrycks et al., ICLR 2020), mixed with Dirichlet(1, 1, 1) weights, then blended with the
  crop with a Beta(1, 1) weight. TPT AugMixes the fine-grained sets and not the ImageNet family
  (`augmix=len(set_id) > 1`, tpt_classification.py:171-172): `augmix_for(lineage)`.
- `select_confident(logits, top)` keeps the `top` share of views with the lowest softmax entropy
  (tpt_classification.py:41-44 `select_confident_samples`); `avg_entropy(logits)` is the entropy of the views'
  mean probability, the marginal entropy TPT minimises (tpt_classification.py:46-51).

Use (what `Method.online_transform` returns; the runner seeds each image, see `fsbench.execute`):

    views = backbone_views(backbone, VIEWS, "auto", ctx.classes.lineage)
    x = views(pil_image, seed=view_seed(seed, dataset, position))  # (1 + 63, 3, S, S), the original first
    confident, idx = select_confident(logits_of_x, top=0.1)      # TPT; loss = avg_entropy(confident)

Randomness is explicit: a view's draws come from a `numpy.random.RandomState` and a `torch.Generator` seeded
with the image's seed (`view_seed(run seed, dataset, test position)`), never the global RNGs, so a result does
not depend on the order images are met in, on loader workers or on other code. The draws are made in the
official order (torch: crop box then flip, as torchvision's RandomResizedCrop and RandomHorizontalFlip; numpy:
Dirichlet, Beta, then per chain its length, and per operation its choice and parameters), so seeding the
official code's global RNGs with the same seed gives the same views (tests/fixtures/tpt/).

Deviations: the crops and the affine operations' output size are the backbone's input size (TPT hard-codes
224, data/datautils.py:64 and data/augmix_ops.py:21; the same for the 224 px CLIPs); `select_confident` keeps
at least one view (the official `int(n * top)` keeps none below 1 / top views, which only small test
configurations reach).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fsbench.augment import RATIO, crop_params
from fsbench.backbones import Backbone
from fsbench.checks import check_at_least, check_fraction, check_positive
from fsbench.errors import ConfigError
from fsbench.images import item_seed

__all__ = ["AUGMIX_CHOICES", "VIEWS", "TTAViews", "augmix_for", "avg_entropy", "backbone_views", "check_views",
           "confidence_order", "select_confident", "view_seed"]

VIEWS = 63  # augmented views besides the original: TPT's batch of 64 (tpt_classification.py:171, test_tpt.sh)
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default (data/datautils.py:64)
IMAGENET_LINEAGE = "imagenet"  # ImageNet and its variants (fsbench.protocols.ClassSet.lineage)
AUGMIX_CHOICES = ("auto", "always", "never")  # a method config's `augmix`: "auto" = `augmix_for` the class set


def view_seed(seed: int, dataset: str, position: int) -> int:
    """The seed of one test image's views: the run's seed, the dataset and the image's test-split position."""
    return item_seed("tta_views", seed, dataset, position)


def augmix_for(lineage: str) -> bool:
    """TPT's rule: AugMix for the fine-grained datasets, plain crops for the ImageNet family
    (tpt_classification.py:171-172 `augmix=len(set_id) > 1`, the ImageNet sets being I/A/V/R/K)."""
    return lineage != IMAGENET_LINEAGE


def check_views(section: str, views: int, top: float, augmix: str) -> None:
    """Range checks of a view method's config: `views` >= 0, `top` in (0, 1], `augmix` in AUGMIX_CHOICES."""
    check_at_least(section, "views", views, 0)
    check_fraction(section, "top", top, one=True)
    check_positive(section, "top", top)
    if augmix not in AUGMIX_CHOICES:
        raise ConfigError(f"{section}.augmix must be one of {', '.join(AUGMIX_CHOICES)}, got {augmix!r}")


def backbone_views(backbone: Backbone, views: int, augmix: str, lineage: str) -> TTAViews:
    """The views of a method on `backbone`: its input size and normalisation, its preprocess for the original;
    AugMix per `augmix` ("auto": `augmix_for(lineage)`, "always", "never")."""
    mix = augmix_for(lineage) if augmix == "auto" else augmix == "always"
    return TTAViews(backbone.image_size, tuple(backbone.mean), tuple(backbone.std), views, mix,
                    original=backbone.preprocess)


# ---- AugMix operations (data/augmix_ops.py:24-144); `rng` is the image's RandomState ------------------------
def _level(rng: np.random.RandomState, severity: float) -> float:
    return rng.uniform(low=0.1, high=severity)  # augmix_ops.py:52-53 sample_level


def _int_level(rng: np.random.RandomState, severity: float, maxval: float) -> int:
    return int(_level(rng, severity) * maxval / 10)  # augmix_ops.py:24-35 int_parameter


def _signed(rng: np.random.RandomState, value: float) -> float:
    return -value if rng.uniform() > 0.5 else value


def _affine(img: Image.Image, size: int, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)


def _autocontrast(img, rng, severity, size):
    return ImageOps.autocontrast(img)


def _equalize(img, rng, severity, size):
    return ImageOps.equalize(img)


def _posterize(img, rng, severity, size):
    return ImageOps.posterize(img, 4 - _int_level(rng, severity, 4))


def _rotate(img, rng, severity, size):
    degrees = _signed(rng, _int_level(rng, severity, 30))
    return img.rotate(degrees, resample=Image.Resampling.BILINEAR)


def _solarize(img, rng, severity, size):
    return ImageOps.solarize(img, 256 - _int_level(rng, severity, 256))


def _shear_x(img, rng, severity, size):
    return _affine(img, size, (1, _signed(rng, _level(rng, severity) * 0.3 / 10), 0, 0, 1, 0))


def _shear_y(img, rng, severity, size):
    return _affine(img, size, (1, 0, 0, _signed(rng, _level(rng, severity) * 0.3 / 10), 1, 0))


def _translate_x(img, rng, severity, size):
    return _affine(img, size, (1, 0, _signed(rng, _int_level(rng, severity, size / 3)), 0, 1, 0))


def _translate_y(img, rng, severity, size):
    return _affine(img, size, (1, 0, 0, 0, 1, _signed(rng, _int_level(rng, severity, size / 3))))


# the official list and order (augmix_ops.py:141-144): a chain picks by index into it
AUGMIX_OPS: tuple[Callable, ...] = (_autocontrast, _equalize, _posterize, _rotate, _solarize, _shear_x, _shear_y,
                                    _translate_x, _translate_y)


@dataclass(frozen=True)
class TTAViews:
    """PIL image -> (1 + views, 3, size, size): the original, then `views` seeded random views (see the module).

    Attributes:
        size: crop size (the backbone's input size).
        mean, std: normalisation of the backbone.
        views: random views besides the original.
        augmix: AugMix the crops (TPT on the fine-grained sets) or not (ImageNet family; ZERO always).
        severity: AugMix severity (1, data/datautils.py:89).
        original: the transform of the first view (PIL -> tensor); None = Resize + CenterCrop (bicubic) +
            ToTensor + Normalize, as TPT (tpt_classification.py:165-170).
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    views: int = VIEWS
    augmix: bool = True
    severity: int = 1
    original: Callable | None = None

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        """The views of `image`, drawn from `seed`; None = the seed torch's RNG was last seeded with
        (`fsbench.images.ImageItems` seeds it per item, from `view_seed`)."""
        seed = torch.initial_seed() if seed is None else seed
        gen, rng = torch.Generator().manual_seed(seed), np.random.RandomState(seed % 2 ** 32)
        first = (self.original or self._base)(image)
        return torch.stack([first] + [self.view(image, gen, rng) for _ in range(self.views)])

    def _base(self, image: Image.Image) -> torch.Tensor:
        image = TF.center_crop(TF.resize(image, self.size, InterpolationMode.BICUBIC), self.size)
        return self.preprocess(image)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """ToTensor + Normalize."""
        return TF.normalize(TF.to_tensor(image), list(self.mean), list(self.std))

    def crop(self, image: Image.Image, gen: torch.Generator) -> Image.Image:
        """RandomResizedCrop(size) (bilinear) + RandomHorizontalFlip, torchvision's draws from `gen`."""
        top, left, h, w = crop_params(image.height, image.width, CROP_SCALE, RATIO, gen)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR)
        return TF.hflip(image) if torch.rand(1, generator=gen).item() < 0.5 else image

    def view(self, image: Image.Image, gen: torch.Generator, rng: np.random.RandomState) -> torch.Tensor:
        """One random view: the crop, AugMix'ed when `augmix` (data/datautils.py:68-84)."""
        crop = self.crop(image, gen)
        x = self.preprocess(crop)
        if not self.augmix:
            return x
        w = np.float32(rng.dirichlet([1.0, 1.0, 1.0]))
        m = np.float32(rng.beta(1.0, 1.0))
        mix = torch.zeros_like(x)
        for i in range(3):
            aug = crop.copy()
            for _ in range(rng.randint(1, 4)):
                aug = AUGMIX_OPS[rng.choice(len(AUGMIX_OPS))](aug, rng, self.severity, self.size)
            mix += w[i] * self.preprocess(aug)
        return m * x + (1 - m) * mix


def confidence_order(logits: torch.Tensor) -> torch.Tensor:
    """View indices (V,) from the lowest softmax entropy to the highest (tpt_classification.py:42-43)."""
    logits = logits.float()
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    return torch.argsort(entropy, descending=False)


def select_confident(logits: torch.Tensor, top: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The `top` share of views (rows of `logits` (V, C)) with the lowest entropy, and their indices
    (TPT's `select_confident_samples`, tpt_classification.py:41-44; at least one view)."""
    idx = confidence_order(logits)[:max(1, int(logits.shape[0] * top))]
    return logits[idx], idx


def avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean of the views' softmax probabilities (rows of `logits` (V, C)), computed in log
    space as TPT does (tpt_classification.py:46-51)."""
    logits = logits.float()
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    avg = logp.logsumexp(dim=0) - math.log(logp.shape[0])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * torch.exp(avg)).sum(dim=-1)

