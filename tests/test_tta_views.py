"""TPT's view generator and confidence selection (fsbench/tta_views.py): seeded views independent of the global
RNGs, the ImageNet/fine-grained AugMix rule, the selection and the marginal entropy. Equality with the official
code on the same seeds and inputs is tests/test_tpt.py's (fixtures under tests/fixtures/tpt/)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fsbench.tta_views import VIEWS, TTAViews, augmix_for, avg_entropy, confidence_order, select_confident, view_seed

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _image(h: int = 40, w: int = 56) -> Image.Image:
    return Image.fromarray(np.random.RandomState(3).randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_views_are_the_original_then_seeded_random_views_whatever_the_global_rngs():
    views = TTAViews(32, MEAN, STD, views=5)
    first = views(_image(), seed=7)
    assert first.shape == (6, 3, 32, 32) and first.dtype == torch.float32
    torch.manual_seed(0)
    np.random.seed(0)
    again = views(_image(), seed=7)
    torch.rand(100)
    np.random.rand(100)
    assert torch.equal(views(_image(), seed=7), again) and torch.equal(first, again)
    other = views(_image(), seed=8)
    assert torch.equal(other[0], first[0]), "the original is not random"
    assert not torch.equal(other[1:], first[1:])
    assert all(not torch.equal(first[i], first[j]) for i in range(1, 6) for j in range(i + 1, 6))


def test_the_original_is_resize_and_centre_crop_unless_given():
    base = TTAViews(32, MEAN, STD, views=1)(_image(), seed=1)[0]
    want = TF.center_crop(TF.resize(_image(), 32, InterpolationMode.BICUBIC), 32)
    assert torch.equal(base, TF.normalize(TF.to_tensor(want), list(MEAN), list(STD)))
    own = TTAViews(32, MEAN, STD, views=1, original=lambda im: torch.zeros(3, 32, 32))(_image(), seed=1)
    assert torch.equal(own[0], torch.zeros(3, 32, 32))
    assert torch.equal(own[1], TTAViews(32, MEAN, STD, views=1)(_image(), seed=1)[1])


def test_unseeded_call_takes_the_seed_torch_was_last_seeded_with():
    views = TTAViews(16, MEAN, STD, views=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(1, "synthetic", 4))
        got = views(_image())
    assert torch.equal(got, views(_image(), seed=view_seed(1, "synthetic", 4)))
    assert view_seed(1, "synthetic", 4) != view_seed(1, "synthetic", 5) != view_seed(2, "synthetic", 4)


def test_augmix_changes_the_crops_and_only_them():
    plain = TTAViews(32, MEAN, STD, views=4, augmix=False)(_image(), seed=5)
    mixed = TTAViews(32, MEAN, STD, views=4, augmix=True)(_image(), seed=5)
    assert torch.equal(plain[0], mixed[0])
    assert not torch.allclose(plain[1:], mixed[1:])
    assert augmix_for("dtd") and augmix_for("synthetic") and not augmix_for("imagenet")
    assert VIEWS == 63


def test_select_confident_keeps_the_lowest_entropy_share_at_least_one():
    logits = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 9.0, 0.0],
                           [0.0, 0.0, 2.0], [3.0, 3.0, 0.0], [0.0, 0.0, 7.0], [0.5, 0.0, 0.0],
                           [0.0, 4.0, 0.0], [0.2, 0.1, 0.0]])
    assert confidence_order(logits).tolist()[:4] == [3, 6, 1, 8]
    sel, idx = select_confident(logits, 0.3)
    assert idx.tolist() == [3, 6, 1] and torch.equal(sel, logits[idx])
    assert select_confident(logits, 0.05)[1].tolist() == [3]  # int(10 * 0.05) = 0: one view kept


def test_avg_entropy_is_the_entropy_of_the_mean_probability():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 3
    p = logits.softmax(-1).mean(0)
    assert math.isclose(avg_entropy(logits).item(), -(p * p.log()).sum().item(), rel_tol=1e-6)
    assert math.isclose(avg_entropy(torch.zeros(3, 4)).item(), math.log(4), rel_tol=1e-6)
    peaked = torch.tensor([[1e4, 0.0], [1e4, 0.0]])  # log-space: no 0 * log 0
    assert avg_entropy(peaked).item() == 0.0
