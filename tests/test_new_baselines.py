"""The defining maths of CLAP, GDA and ProLIP (methods/clap.py, gda.py, prolip.py) on the tiny CLIP.

CLAP and ProLIP with no training are zero-shot CLIP; CLAP's per-class multipliers, GDA's class
means, shared-covariance precision and discriminant equal direct numpy / scipy computations;
ProLIP's pre-projection features, projected with CLIP's own projection, are CLIP's features.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import multivariate_normal
from torch import nn

from fsbench.backbones import BackboneSpec
from fsbench.config import method_config
from fsbench.errors import ConfigError
from fsbench.images import Views, image_loader, item_seed
from fsbench.method import METHODS, Context, FeatureSource, FewShotData
from fsbench.methods.clap import outer_step, zero_shot_multipliers
from fsbench.methods.gda import class_means, gda_classifier, search_alpha, shrunk_precision
from fsbench.methods.prolip import check_projection, pre_projection
from fsbench.methods.taskres import base_text_features, official_classnames
from fsbench.methods.tip_adapter import augment_transform

CPU, SEED, SHOTS, N_TEST = torch.device("cpu"), 1, 2, 12


@pytest.fixture(scope="module")
def runner(tmp_path_factory, make_runner):
    return make_runner(tmp_path_factory.mktemp("new-baselines"))


@pytest.fixture(scope="module")
def support(runner, tiny, synthetic) -> tuple[FewShotData, FewShotData]:
    """The (train, val) few-shot sets of (synthetic, 2 shots, seed 1) with their cached features."""
    split = runner.planner.splits.get(synthetic, SHOTS, SEED)
    out = []
    for name, index in (("train", split.train), ("val", split.val)):
        items = [synthetic.split(name)[i] for i in index]
        labels = torch.tensor([it.label for it in items], dtype=torch.long)
        feats = runner.executor.features.split(tiny, synthetic, name, index).x
        out.append(FewShotData(items, labels, synthetic.image_root, feats, tuple(index), name))
    return out[0], out[1]


@pytest.fixture(scope="module")
def test_set(runner, tiny, synthetic) -> dict[str, torch.Tensor]:
    """The first test images: cached features, preprocessed pixels and labels."""
    feats = runner.executor.features.split(tiny, synthetic, "test").x[:N_TEST]
    loader = image_loader(synthetic.test[:N_TEST], synthetic.image_root, tiny.preprocess, N_TEST, CPU, workers=0)
    images, labels = next(iter(loader))
    return {"features": feats, "images": images, "labels": labels}


def fit(name: str, runner, tiny, synthetic, support, **overrides):
    cls = METHODS.get(name)
    ctx = Context(tiny, synthetic, CPU, SEED, SHOTS, features=FeatureSource(runner.executor.features, tiny, synthetic))
    method = cls(method_config(cls, overrides), ctx)
    torch.manual_seed(SEED)
    method.fit(*support)
    return method


def _base(clap, support) -> torch.Tensor:
    """CLAP's zero-shot prototypes (raw text embeddings) for the support set's classes."""
    items = list(zip(support[0].labels.tolist(), support[0].items, strict=True))
    return base_text_features(clap, official_classnames(clap.ctx.dataset, clap.ctx.classnames, items))


def zero_shot_logits(runner, tiny, synthetic, support, features: torch.Tensor) -> torch.Tensor:
    return fit("zero_shot", runner, tiny, synthetic, support).logits(features)


# ---- CLAP ----------------------------------------------------------------------------------------

def test_clap_without_training_is_zero_shot(runner, tiny, synthetic, support, test_set):
    clap = fit("clap", runner, tiny, synthetic, support, epochs=0)
    expected = zero_shot_logits(runner, tiny, synthetic, support, test_set["features"])
    torch.testing.assert_close(clap.logits(test_set["features"]), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(clap.prototypes, _base(clap, support))  # ZS initialisation, raw prototypes


def test_clap_multipliers_are_the_zero_shot_accuracy_per_class(runner, tiny, synthetic, support):
    clap = fit("clap", runner, tiny, synthetic, support, epochs=1, augment_views=0)
    x, y = support[0].features.numpy(), support[0].labels.numpy()
    text = _base(clap, support).numpy()
    logits = 100 * x @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    expected = np.array([probs[y == c, c].mean() for c in range(len(synthetic.classnames))])
    np.testing.assert_allclose(clap.multipliers.numpy(), expected, rtol=1e-5, atol=1e-6)
    t = torch.tensor(logits)
    corrected = zero_shot_multipliers(t, support[0].labels, len(expected), "corrected").numpy()
    np.testing.assert_allclose(corrected, expected * len(expected) / expected.sum(), rtol=1e-5)
    constant = zero_shot_multipliers(t, support[0].labels, len(expected), "constant").numpy()
    np.testing.assert_allclose(constant, np.full_like(expected, expected.mean()), rtol=1e-5)
    assert (zero_shot_multipliers(t, support[0].labels, len(expected), "balanced") == 1).all()


def test_clap_constraint_holds_prototypes_near_zero_shot(runner, tiny, synthetic, support):
    """With the same data and seed, the class-adaptive penalty keeps the prototypes closer to the
    zero-shot ones than the unconstrained probe (ZS-LP), and a larger weight (balanced: lambda = 1 >=
    the zero-shot accuracies) closer still."""
    common = dict(epochs=20, augment_views=0, lr=1.0, warmup_epochs=0)
    dist = {}
    for constraint, multipliers in (("none", "zero_shot"), ("l2", "zero_shot"), ("l2", "balanced")):
        clap = fit("clap", runner, tiny, synthetic, support, constraint=constraint, multipliers=multipliers, **common)
        dist[constraint, multipliers] = (clap.prototypes - _base(clap, support)).norm().item()
    assert dist["l2", "balanced"] < dist["l2", "zero_shot"] < dist["none", "zero_shot"]


def test_clap_outer_step_is_the_phr_update():
    distance = torch.tensor([0.5, 2.0, 0.0])
    lam, rho = torch.tensor([0.3, 0.1, 0.7]), torch.zeros(3)
    lam1, rho1 = outer_step(distance, lam, rho)
    torch.testing.assert_close(lam1, lam)  # rho starts at 0: the multipliers are kept
    torch.testing.assert_close(rho1, distance)
    lam2, rho2 = outer_step(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-5.0, 0.1, 0.7]), rho1)
    torch.testing.assert_close(lam2, torch.tensor([0.0, 2.1, 0.7]))  # max(0, lambda + rho * d)
    torch.testing.assert_close(rho2, torch.ones(3))


def test_clap_trains_on_augmented_views(runner, tiny, synthetic, support):
    before = runner.executor.features.encoded_images
    clap = fit("clap", runner, tiny, synthetic, support, epochs=1, augment_views=3)
    assert runner.executor.features.encoded_images - before == 3 * len(support[0])  # 3 views per image, encoded once
    fit("clap", runner, tiny, synthetic, support, epochs=1, augment_views=3)
    assert runner.executor.features.encoded_images - before == 3 * len(support[0])  # cached for the next run
    assert torch.isfinite(clap.prototypes).all()


# ---- GDA -----------------------------------------------------------------------------------------

def test_gda_estimates_equal_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    y = np.repeat(np.arange(4), 15)
    xt, yt = torch.tensor(x), torch.tensor(y)
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(class_means(xt, yt, 4).numpy(), means, rtol=1e-12)
    centred = x - means[y]
    cov = np.cov(centred, rowvar=False)
    expected = 8 * np.linalg.pinv((60 - 1) * cov + np.trace(cov) * np.eye(8))
    np.testing.assert_allclose(shrunk_precision(torch.tensor(centred)).numpy(), expected, rtol=1e-9)


def test_gda_logits_are_the_gaussian_discriminant(runner, tiny, synthetic, support, test_set):
    """logits - 100 f T^T = alpha * (log N(f; mu_c, Sigma) + log 1/C) up to a per-image constant,
    Sigma = P^-1 (scipy), and the zero-shot part is zero-shot CLIP's logits."""
    gda = fit("gda", runner, tiny, synthetic, support, augment_views=3, alpha=0.5)
    f = test_set["features"]
    zs = zero_shot_logits(runner, tiny, synthetic, support, f)
    part = ((gda.logits(f) - zs) / 0.5).double().numpy()
    views = runner.executor.features.items(tiny, synthetic, "train", _tip_views(tiny, 3), support[0].index,
                                  tag="tip-adapter-views-seed1", seed=_tip_seed).x  # GDA's samples
    x, y = views.flatten(0, 1).double().numpy(), support[0].labels.repeat_interleave(3).numpy()
    n_cls = len(synthetic.classnames)
    means = np.stack([x[y == c].mean(0) for c in range(n_cls)])
    cov = np.cov(x - means[y], rowvar=False)
    sigma = np.linalg.inv(x.shape[1] * np.linalg.inv((len(x) - 1) * cov + np.trace(cov) * np.eye(x.shape[1])))
    logpdf = np.stack([multivariate_normal(means[c], sigma).logpdf(f.double().numpy()) for c in range(n_cls)], 1)
    expected = logpdf + np.log(1 / n_cls)
    np.testing.assert_allclose(part - part[:, :1], expected - expected[:, :1], rtol=1e-3, atol=1e-3)


def _tip_views(tiny, views: int) -> Views:
    return Views(augment_transform(tiny, [0.5, 1.0]), views)


def _tip_seed(item) -> int:
    return item_seed(1, item.path)


def test_gda_classifier_bias_and_weights():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.2, 0.8]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    w, b = gda_classifier(x, y, 2)
    mu = class_means(x, y, 2)
    p = shrunk_precision(x - mu[y])
    torch.testing.assert_close(w, mu @ p)
    torch.testing.assert_close(b, np.log(0.5) - 0.5 * torch.einsum("cd,de,ce->c", mu, p, mu))


def test_gda_alpha_search_keeps_the_first_best():
    zs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    gda = torch.tensor([[0.0, 2.0], [0.0, 0.1]])
    labels = torch.tensor([1, 0])
    # alpha 1 gets both right (0.5 + 1 * 0.1 < 1); 10 makes the second wrong; 0.01 the first wrong
    assert search_alpha(zs, gda, labels, [0.01, 1.0, 2.0, 10.0], 0.1) == 1.0
    assert search_alpha(zs, gda, torch.tensor([1, 1]), [0.01], 0.1) == 0.1  # nothing above 0: the default


def test_gda_reuses_tip_adapter_views(runner, tiny, synthetic, support):
    fit("tip_adapter", runner, tiny, synthetic, support)
    before = runner.executor.features.encodes
    gda = fit("gda", runner, tiny, synthetic, support)  # the same 10 views per image
    assert runner.executor.features.encodes == before
    assert gda.config.alphas and float(gda.alpha) in gda.config.alphas + [gda.config.default_alpha]


# ---- ProLIP --------------------------------------------------------------------------------------

def test_pre_projection_times_proj_is_clip(tiny, test_set):
    with torch.no_grad():
        z = pre_projection(tiny.model, test_set["images"])
        torch.testing.assert_close(z @ tiny.model.visual.proj, tiny.model.encode_image(test_set["images"]))


def test_cached_pre_projection_features_project_to_the_cached_features(runner, tiny, synthetic, support):
    """The pre-projection path of the cache, through CLIP's own projection, gives the cached features."""
    index = support[0].index
    z = runner.executor.features.items(tiny, synthetic, "train", tiny.preprocess, index, tag="prolip-pre-projection",
                              encode=pre_projection).x
    assert z.shape == (len(index), tiny.model.visual.proj.shape[0])
    projected = F.normalize(z @ tiny.model.visual.proj.detach(), dim=-1)
    torch.testing.assert_close(projected, support[0].features, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tag"):
        runner.executor.features.items(tiny, synthetic, "train", tiny.preprocess, index, encode=pre_projection)


def test_prolip_without_training_is_zero_shot(runner, tiny, synthetic, support, test_set):
    prolip = fit("prolip", runner, tiny, synthetic, support, epochs=0, augment_views=2)
    torch.testing.assert_close(prolip.proj, tiny.model.visual.proj.detach())
    expected = zero_shot_logits(runner, tiny, synthetic, support, test_set["features"])
    with torch.no_grad():
        got = prolip.logits(pre_projection(tiny.model, test_set["images"]))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_prolip_penalty_holds_the_projection(runner, tiny, synthetic, support):
    """A large penalty keeps the projection much nearer CLIP's than no penalty (same data, lr, steps);
    the default penalty is 1 / shots."""
    proj0 = tiny.model.visual.proj.detach()
    dist = {}
    for penalty in (0.0, 1e4):
        prolip = fit("prolip", runner, tiny, synthetic, support, epochs=30, augment_views=2, lr=1e-2, penalty=penalty)
        dist[penalty] = (prolip.proj - proj0).norm().item()
    assert dist[1e4] < 0.1 * dist[0.0]
    assert prolip.trainable_params() == proj0.numel()


def test_prolip_scores_unseen_classes(runner, tiny, synthetic, support, test_set):
    prolip = fit("prolip", runner, tiny, synthetic, support, epochs=2, augment_views=2)
    prolip.ctx.classes = prolip.ctx.classes.subset([0, 2, 4])
    prolip.retarget()
    with torch.no_grad():
        assert prolip.logits(pre_projection(tiny.model, test_set["images"])).shape == (N_TEST, 3)


def test_prolip_needs_a_vit_projection():
    stub = SimpleNamespace(model=SimpleNamespace(visual=nn.Identity()), spec=BackboneSpec("RN50"))
    with pytest.raises(ConfigError, match="prolip needs an open_clip ViT"):
        check_projection(stub)


# ---- configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, overrides, key", [
    ("clap", {"lr": -1.0}, "clap.lr"),
    ("clap", {"constraint": "l1"}, "clap.constraint"),
    ("clap", {"multipliers": "equal"}, "clap.multipliers"),
    ("clap", {"crop_scale": [0.9, 0.1]}, "clap.crop_scale"),
    ("gda", {"alphas": []}, "gda.alphas"),
    ("gda", {"augment_views": -1}, "gda.augment_views"),
    ("gda", {"alpha": 0.0}, "gda.alpha"),
    ("prolip", {"penalty": -1.0}, "prolip.penalty"),
    ("prolip", {"epochs": -2}, "prolip.epochs"),
    ("prolip", {"adam_eps": 0.0}, "prolip.adam_eps"),
])
def test_bad_config_is_one_line_naming_the_key(name, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        method_config(METHODS.get(name), overrides)
    assert "\n" not in str(err.value)


def test_prolip_encodes_the_test_split_once(tmp_path, make_runner, synthetic):
    """Pre-projection test features are cached like any frozen features: a second seed encodes no test image."""
    from fsbench.spec import RunSpec

    runner = make_runner(tmp_path, ["prolip.epochs=2", "prolip.augment_views=2"])
    runner.run(RunSpec("prolip", "test-tiny", "synthetic", 1, 1))
    before = runner.executor.features.encoded_images
    result, _ = runner.run(RunSpec("prolip", "test-tiny", "synthetic", 1, 2))
    assert result.status == "ok" and result.n_test == len(synthetic.test)
    assert runner.executor.features.encoded_images - before < len(synthetic.test)  # only seed 2's few-shot views
