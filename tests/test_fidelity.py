"""Fidelity to the official code (issue 14): CLIP-Adapter's ratio picked on validation, CoOp's
linear-probe C search, the ImageNet 7-template ensembles, TaskRes's underscore class names,
Dassl's drop-last step counts, and the resolved per-dataset values written back into the config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fsbench.config import method_config
from fsbench.data.base import Item
from fsbench.data.templates import IMAGENET_ENSEMBLE, ensemble_templates
from fsbench.method import METHODS, Context, FewShotData
from fsbench.methods import clip_adapter, linear_probe, taskres, tip_adapter
from fsbench.methods.clip_adapter import dassl_batches, dassl_steps
from fsbench.protocols import ClassSet

CPU = torch.device("cpu")
NAMES = ("american bulldog", "apple pie", "abbey")


def classes(dataset: str, names=NAMES, template: str = "a photo of a {}.") -> ClassSet:
    return ClassSet(dataset, dataset, tuple(range(len(names))), tuple(names), (template,))


def fewshot(n_per_class: int, n_classes: int, dim: int, seed: int, split: str = "train",
            folders: tuple[str, ...] = ()) -> FewShotData:
    """Random unit features, `n_per_class` per class, with items in `folders[label]` if given."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    items = [Item(f"{folders[int(c)] if folders else 'c'}/img{i}.jpg", int(c)) for i, c in enumerate(labels)]
    feats = F.normalize(torch.randn(len(labels), dim, generator=gen), dim=-1)
    return FewShotData(items, labels, CPU, feats, tuple(range(len(labels))), split)


def build(name: str, tiny, class_set: ClassSet, shots: int = 2, **overrides):
    cls = METHODS.get(name)
    return cls(method_config(cls, overrides), Context(tiny, class_set, CPU, 1, shots))


# 1. CLIP-Adapter: the residual ratio is selected on the few-shot validation set only


def test_clip_adapter_ratio_is_the_best_on_validation(tiny, monkeypatch):
    method = build("clip_adapter", tiny, classes("dtd"), epochs=2, ratios=[0.2, 0.6])
    train, val = fewshot(2, 3, tiny.embed_dim, 1), fewshot(2, 3, tiny.embed_dim, 2, "val")
    seen, real = [], clip_adapter.CLIPAdapter.val_accuracy_of

    def recording(self, ratio, data):
        seen.append((ratio, data, real(self, ratio, data)))
        return seen[-1][2]

    monkeypatch.setattr(clip_adapter.CLIPAdapter, "val_accuracy_of", recording)
    requested = method.config
    method.fit(train, val)
    assert [r for r, _, _ in seen] == [0.2, 0.6] and all(data is val for _, data, _ in seen)
    best = max(seen, key=lambda s: s[2])  # max keeps the first best, as fit does
    assert method.config.ratio == best[0] and method.val_accuracy == best[2]
    assert method.config.epochs == 2 and requested.ratio is None  # the caller's config is not mutated


def test_clip_adapter_with_a_fixed_ratio_does_not_look_at_validation(tiny, monkeypatch):
    method = build("clip_adapter", tiny, classes("dtd"), ratio=0.2, epochs=1)
    monkeypatch.setattr(clip_adapter.CLIPAdapter, "val_accuracy_of", lambda *a: pytest.fail("val read"))
    method.fit(fewshot(1, 3, tiny.embed_dim, 1), fewshot(1, 3, tiny.embed_dim, 2, "val"))
    assert method.config.ratio == 0.2 and method.config.epochs == 1


# 2. Linear probe: CoOp's C search (lpclip/linear_probe.py) and the penalty it optimises


def test_c_search_is_coops_grid_then_bisection():
    calls = []

    def accuracy(c: float) -> float:  # unimodal in log10(C), peak at 10^2.3
        calls.append(c)
        return -(math.log10(c) - 2.3) ** 2

    final = linear_probe.search_c(accuracy, [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6], steps=3)
    assert calls[:7] == [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    ends = [(round(math.log10(a), 6), round(math.log10(b), 6)) for a, b in zip(calls[7::2], calls[8::2], strict=True)]
    # best grid C = 100 -> [10, 1000]; right wins -> [100, 1000]; left wins -> [100, 10^2.5]; right wins
    assert ends == [(1.0, 3.0), (2.0, 3.0), (2.0, 2.5)]
    assert final == pytest.approx(10 ** 2.5)


def test_c_search_ties_go_left_and_grid_ties_to_the_first():
    assert linear_probe.search_c(lambda c: 0.5, [1e2, 1.0], steps=1) == pytest.approx(10.0)  # 1e2 / 10


def test_linear_probe_defaults_are_coops_protocol():
    cfg = linear_probe.LinearProbeConfig()
    assert cfg.c_grid == [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6] and cfg.search_steps == 8
    assert cfg.max_iter == 1000 and cfg.init == "zeros" and cfg.weight_decays == []


@pytest.mark.parametrize("centre", ["zeros", "text"])
def test_fit_logistic_reaches_the_penalised_optimum(centre):
    """First-order optimality of mean CE + lambda/2 ||W - W0||^2, lambda = 1 / (C N): scikit-learn's
    C * sum CE + ||W||^2 / 2 for W0 = 0, whatever the start."""
    gen = torch.Generator().manual_seed(0)
    x, y = F.normalize(torch.randn(12, 8, generator=gen), dim=-1), torch.arange(3).repeat(4)
    w0 = torch.zeros(3, 8) if centre == "zeros" else 5 * torch.randn(3, 8, generator=gen)
    lam = 1 / (1.0 * len(y))
    w, b = linear_probe.fit_logistic(x, y, w0, lam, max_iter=1000)
    w, b = w.requires_grad_(True), b.requires_grad_(True)
    (F.cross_entropy(x @ w.T + b, y) + 0.5 * lam * ((w - w0) ** 2).sum()).backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_zero_shot_init_with_a_strong_penalty_is_zero_shot(tiny):
    names = tuple(f"class {i}" for i in range(3))
    train, val = fewshot(2, 3, tiny.embed_dim, 1), fewshot(2, 3, tiny.embed_dim, 2, "val")
    probe = build("linear_probe", tiny, classes("dtd", names), init="zero_shot", weight_decays=[1e6], max_iter=50)
    probe.fit(train, val)
    zero_shot = build("zero_shot", tiny, classes("dtd", names))
    zero_shot.fit(train, val)
    assert torch.equal(probe.logits(val.features).argmax(-1), zero_shot.logits(val.features).argmax(-1))
    torch.testing.assert_close(probe.w, 100.0 * zero_shot.weights, atol=1e-3, rtol=1e-4)


def test_linear_probe_search_picks_the_c_of_the_last_round(tiny, monkeypatch):
    seen = []
    real = linear_probe.search_c
    monkeypatch.setattr(linear_probe, "search_c", lambda f, grid, steps: seen.append(real(f, grid, steps)) or seen[-1])
    probe = build("linear_probe", tiny, classes("dtd"), max_iter=20, search_steps=2)
    train = fewshot(2, 3, tiny.embed_dim, 1)
    probe.fit(train, fewshot(2, 3, tiny.embed_dim, 2, "val"))
    assert probe.c == seen[0] and probe.weight_decay == pytest.approx(1 / (seen[0] * len(train)))


# 3. ImageNet: the 7-template ensemble of the official Tip-Adapter, LP++ and TaskRes code


def test_ensemble_templates():
    assert len(IMAGENET_ENSEMBLE) == 7 and IMAGENET_ENSEMBLE[0] == "itap of a {}."
    assert ensemble_templates("imagenet", ["a photo of a {}."]) == list(IMAGENET_ENSEMBLE)
    assert ensemble_templates("imagenet", ["a photo of a {}."], keep_dataset=True)[-1] == "a photo of a {}."
    assert ensemble_templates("dtd", ["{} texture."]) == ["{} texture."]


def recorded_prompts(tiny, monkeypatch) -> list[str]:
    prompts: list[str] = []
    real = tiny.tokenize
    monkeypatch.setattr(tiny, "tokenize", lambda texts: prompts.extend(texts) or real(texts))
    return prompts


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f", "lp_plus_plus", "taskres"])
@pytest.mark.parametrize("dataset", ["imagenet", "dtd"])
def test_imagenet_text_classifier_averages_the_official_templates(name, dataset, tiny, monkeypatch):
    train, val = fewshot(2, 3, tiny.embed_dim, 1), fewshot(2, 3, tiny.embed_dim, 2, "val")
    views = torch.stack([train.features] * 2)
    monkeypatch.setattr(tip_adapter, "augmented_views", lambda *a, **k: views)
    quick = {"tip_adapter": {"search_step": [4, 2]}, "tip_adapter_f": {"epochs": 1, "search_step": [4, 2]},
             "lp_plus_plus": {"epochs": 1}, "taskres": {"epochs": 1}}[name]
    method = build(name, tiny, classes(dataset, ("goldfish", "tench", "hen"), "{} texture."), **quick)
    prompts = recorded_prompts(tiny, monkeypatch)
    method.fit(train, val)
    used = {p for p in prompts if "tench" in p}
    expected = {t.format("tench") for t in ensemble_templates(dataset, ["{} texture."], keep_dataset=name == "taskres")}
    assert used == expected and len(expected) == {"imagenet": 8 if name == "taskres" else 7, "dtd": 1}[dataset]


# 6. TaskRes keeps CoOp's underscores in its base prompts


def test_official_classnames_restore_underscores():
    assert taskres.official_classnames("oxford_pets", ["american bulldog"]) == ["american_bulldog"]
    assert taskres.official_classnames("ucf101", ["Apply Eye Makeup"]) == ["Apply_Eye_Makeup"]
    items = [(0, Item("a/apartment_building/outdoor/sun_1.jpg", 0)), (1, Item("a/abbey/sun_2.jpg", 1))]
    assert taskres.official_classnames("sun397", ["outdoor apartment building", "abbey", "bar"], items) == [
        "outdoor apartment_building", "abbey", "bar"]
    assert taskres.official_classnames("dtd", ["banded"]) == ["banded"]
    assert taskres.sun397_name("u/underwater/coral_reef") == "coral_reef underwater"


def test_taskres_base_prompts_keep_underscores(tiny, monkeypatch):
    method = build("taskres", tiny, classes("oxford_pets", ("american bulldog", "abyssinian", "boxer")), epochs=1)
    prompts = recorded_prompts(tiny, monkeypatch)
    method.fit(fewshot(1, 3, tiny.embed_dim, 1), fewshot(1, 3, tiny.embed_dim, 2, "val"))
    assert "a photo of a american_bulldog." in prompts and not any("american bulldog" in p for p in prompts)


# 7. Dassl drops the last partial batch once the set holds a whole batch


def test_dassl_drop_last_step_counts():
    assert [dassl_steps(n, 4) for n in (3, 4, 7, 8, 9)] == [1, 1, 1, 2, 2]
    batches = dassl_batches(torch.arange(7.0)[:, None], torch.arange(7), 4, torch.Generator().manual_seed(0))
    assert [len(next(batches)[1]) for _ in range(3)] == [4, 4, 4]  # one full batch per epoch, never 3
    small = dassl_batches(torch.arange(3.0)[:, None], torch.arange(3), 4, torch.Generator())
    assert sorted(next(small)[1].tolist()) == [0, 1, 2]


@pytest.mark.parametrize(("name", "module"), [("clip_adapter", clip_adapter), ("taskres", taskres)])
def test_clip_adapter_and_taskres_train_dassl_step_counts(name, module, tiny, monkeypatch):
    steps = []
    real = module.train_epochs
    monkeypatch.setattr(module, "train_epochs", lambda *a: steps.append(a[5]) or real(*a))
    fixed = {"ratio": 0.2} if name == "clip_adapter" else {}
    method = build(name, tiny, classes("dtd"), epochs=1, batch_size=4, **fixed)
    method.fit(fewshot(3, 3, tiny.embed_dim, 1), fewshot(1, 3, tiny.embed_dim, 2, "val"))  # 9 samples
    assert steps == [2]  # 9 // 4, the partial batch of 1 dropped (fsbench used to run 3 steps)


# 10. The per-dataset / per-shot values resolved in `fit` are written back into the config


@pytest.mark.parametrize(("name", "dataset", "shots", "expected"), [
    ("clip_adapter", "dtd", 2, {"epochs": 100}),
    ("taskres", "imagenet", 8, {"scale": 0.5, "lr": 2e-4, "epochs": 200}),
    ("taskres", "oxford_flowers", 1, {"scale": 1.0, "lr": 2e-3, "epochs": 100}),
    ("tip_adapter", "fgvc_aircraft", 1, {"init_alpha": 5.0, "init_beta": 1.0, "search_scale": [30.0, 30.0]}),
    ("tip_adapter_f", "eurosat", 1, {"epochs": 100, "init_alpha": 2.0, "search_scale": [12.0, 10.0]}),
])
def test_resolved_values_are_recorded(name, dataset, shots, expected, tiny, monkeypatch):
    train, val = fewshot(1, 3, tiny.embed_dim, 1), fewshot(1, 3, tiny.embed_dim, 2, "val")
    monkeypatch.setattr(tip_adapter, "augmented_views", lambda *a, **k: train.features[None])
    monkeypatch.setattr(clip_adapter, "train_epochs", lambda *a: None)  # the schedule, not the training, is tested
    monkeypatch.setattr(taskres, "train_epochs", lambda *a: None)
    quick = {"clip_adapter": {"ratio": 0.2}, "tip_adapter": {"search_step": [2, 2]},
             "tip_adapter_f": {"search_step": [2, 2], "batch_size": 256}}.get(name, {})
    method = build(name, tiny, classes(dataset), shots=shots, **quick)
    requested = method.config
    method.fit(train, val)
    assert {k: getattr(method.config, k) for k in expected} == expected
    assert all(getattr(requested, k) in (None, 0) for k in expected)  # the caller's object is untouched


@pytest.mark.parametrize(("name", "dataset"), [("clip_adapter", "dtd"), ("taskres", "sun397")])
def test_reloaded_state_gives_the_same_logits(name, dataset, tiny):
    """The chosen ratio and SUN397's path-derived base travel with the saved tensors."""
    names = ("outdoor apartment building", "abbey", "bar")
    train = fewshot(2, 3, tiny.embed_dim, 1, folders=("a/apartment_building/outdoor", "a/abbey", "b/bar"))
    val = fewshot(1, 3, tiny.embed_dim, 2, "val")
    method = build(name, tiny, classes(dataset, names), epochs=2, ratios=[0.2, 0.8]) if name == "clip_adapter" \
        else build(name, tiny, classes(dataset, names), epochs=2)
    method.fit(train, val)
    again = build(name, tiny, classes(dataset, names))
    again.load_state_tensors({k: v.clone() for k, v in method.state_tensors().items()})
    torch.testing.assert_close(again.logits(val.features), method.logits(val.features))
