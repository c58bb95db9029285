"""Method-specific maths of the zoo: limits that reduce to zero-shot CLIP, the papers' defaults,
the schedules, the validation-only searches, and the one-encode-per-backbone feature cache."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fsbench.config import BenchConfig, apply_sets, method_config
from fsbench.engine import Runner
from fsbench.errors import ConfigError, RunFailed
from fsbench.features import FeatureCache
from fsbench.method import METHODS, Context, FeatureSource, zero_shot_weights
from fsbench.methods import tip_adapter
from fsbench.methods.lora import LoRAConfig
from fsbench.methods.lp_plus_plus import class_sums, init_blending, lr_blending, lr_prototypes
from fsbench.methods.tip_adapter import grid, search_alpha_beta
from fsbench.prompts import build_prompts, encode_prompts, frozen_image_features
from fsbench.spec import RunSpec
from fsbench.text import encode_tokens
from fsbench.training import coop_epochs, dassl_lr, shuffled_batches, train_epochs

SEED = 1
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runner(tmp_path_factory, make_runner):
    return make_runner(tmp_path_factory.mktemp("zoo"))


def setup(name: str, runner: Runner, tiny, synthetic, shots: int = 2, **overrides):
    """(method, train, val) as the engine builds them, not yet fitted."""
    cls = METHODS.get(name)
    train, val = runner.executor.fewshot(cls, tiny, synthetic, runner.planner.splits.get(synthetic, shots, SEED))
    torch.manual_seed(SEED)
    ctx = Context(tiny, synthetic, CPU, SEED, shots, features=FeatureSource(runner.executor.features, tiny, synthetic))
    return cls(method_config(cls, overrides), ctx), train, val


def zero_shot_logits(tiny, synthetic, x: torch.Tensor) -> torch.Tensor:
    return 100.0 * x @ zero_shot_weights(tiny, synthetic.classnames, synthetic.templates, CPU).T


def test_tip_adapter_with_alpha_zero_is_zero_shot(runner, tiny, synthetic):
    method, train, val = setup("tip_adapter", runner, tiny, synthetic, search=False, init_alpha=0.0)
    method.fit(train, val)
    x = runner.executor.features.split(tiny, synthetic, "test").x
    torch.testing.assert_close(method.logits(x), zero_shot_logits(tiny, synthetic, x))


def test_tip_adapter_cache_is_the_mean_of_the_augmented_views(runner, tiny, synthetic):
    method, train, val = setup("tip_adapter", runner, tiny, synthetic, augment_views=3)
    method.fit(train, val)
    views = tip_adapter.augmented_views(method.ctx, train, 3, [0.5, 1.0], view_seed=1)
    assert views.shape == (3, len(train), tiny.embed_dim)
    assert not torch.allclose(views[0], views[1])  # different random crops
    torch.testing.assert_close(method.keys, F.normalize(views.mean(0), dim=-1))
    assert torch.equal(method.values, F.one_hot(train.labels, len(synthetic.classnames)).float())


class SpyCache(FeatureCache):
    """A feature cache that records which splits it is asked for."""

    def __init__(self, inner: FeatureCache):
        super().__init__(inner.root.parent, inner.device, inner.batch_size, inner.workers)
        self.splits: list[str] = []

    def items(self, backbone, data, split, transform, index=None, tag="", seed=None, progress=None, encode=None):
        self.splits.append(split)
        return super().items(backbone, data, split, transform, index, tag, seed, progress, encode)


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_alpha_beta_search_reads_validation_only(name, runner, tiny, synthetic, monkeypatch):
    method, train, val = setup(name, runner, tiny, synthetic, **({"epochs": 2} if name == "tip_adapter_f" else {}))
    spy = SpyCache(runner.executor.features)
    method.ctx.features = FeatureSource(spy, tiny, synthetic)
    searched = []
    real = tip_adapter.search_alpha_beta

    def recording(affinity, zero_shot, values, labels, betas, alphas):
        searched.append((len(affinity), labels.clone()))
        return real(affinity, zero_shot, values, labels, betas, alphas)

    monkeypatch.setattr(tip_adapter, "search_alpha_beta", recording)
    method.fit(train, val)
    assert spy.splits == ["train"]  # the augmented train views; the test split is never read
    assert len(searched) == 1 and searched[0][0] == len(val) and torch.equal(searched[0][1], val.labels)
    scale = tip_adapter.official("synthetic")[2]
    assert method.beta in grid(scale[0], 200) and method.alpha in grid(scale[1], 20)


def test_search_grid_is_the_official_one_and_first_best_wins():
    assert grid(7, 200)[:2] == [0.1, 0.1 + 6.9 / 200] and len(grid(3, 20)) == 20
    # one sample, two classes: the cache votes for class 1 against zero-shot's class 0
    affinity, values = torch.tensor([[1.0]]), torch.tensor([[0.0, 1.0]])
    zero_shot, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    alpha, beta = search_alpha_beta(affinity, zero_shot, values, labels, [0.5, 2.0], [0.5, 2.0, 3.0])
    assert (alpha, beta) == (2.0, 0.5)  # first (beta, alpha) whose alpha > 1 flips the prediction


def test_tip_adapter_views_are_encoded_once_per_image(tmp_path, make_runner, tiny, synthetic):
    """Tip-Adapter and -F share the cached views; a later draw encodes only its new images, and
    an image's views are the same whichever run encoded them."""
    runner = make_runner(tmp_path)
    quick = {"augment_views": 2, "search_step": [20, 5]}
    views = {}
    for name, shots, seed, overrides in (("tip_adapter", 2, 1, quick), ("tip_adapter_f", 2, 1, {**quick, "epochs": 1}),
                                         ("tip_adapter", 4, 2, quick)):
        split = runner.planner.splits.get(synthetic, shots, seed)
        cls = METHODS.get(name)
        train, val = runner.executor.fewshot(cls, tiny, synthetic, split)
        before = runner.executor.features.encoded_images
        source = FeatureSource(runner.executor.features, tiny, synthetic)
        method = cls(method_config(cls, overrides), Context(tiny, synthetic, CPU, seed, shots, features=source))
        new = set(split.train) - views.keys()
        got = tip_adapter.augmented_views(method.ctx, train, 2, [0.5, 1.0], view_seed=1)
        assert runner.executor.features.encoded_images - before == 2 * len(new)
        for j, i in enumerate(split.train):
            if i in views:
                torch.testing.assert_close(got[:, j], views[i], rtol=0, atol=0)
            views[i] = got[:, j]
    # encoded from scratch in another cache, in another order: the same views
    fresh = FeatureCache(tmp_path / "other", CPU, workers=0)
    order = sorted(views, reverse=True)
    tf = tip_adapter.Views(tip_adapter.augment_transform(tiny, [0.5, 1.0]), 2)
    again = fresh.items(tiny, synthetic, "train", tf, order, tag="x",
                        seed=lambda it: tip_adapter.item_seed(1, it.path)).x
    for j, i in enumerate(order):
        torch.testing.assert_close(again[j], views[i], rtol=1e-5, atol=1e-6)


def test_feature_cache_encodes_only_missing_rows(tmp_path, tiny, synthetic):
    cache = FeatureCache(tmp_path, CPU, batch_size=7, workers=0)
    whole = FeatureCache(tmp_path / "whole", CPU, workers=0).split(tiny, synthetic, "train")
    a = cache.split(tiny, synthetic, "train", [5, 3, 9])
    assert cache.encoded_images == 3
    b = cache.split(tiny, synthetic, "train", [9, 1, 5, 120])
    assert cache.encoded_images == 5 and cache.encodes == 2
    torch.testing.assert_close(a.x, whole.x[[5, 3, 9]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.x, whole.x[[9, 1, 5, 120]], rtol=1e-5, atol=1e-6)
    assert torch.equal(b.y, whole.y[[9, 1, 5, 120]])
    reopened = FeatureCache(tmp_path, CPU, workers=0)  # from disk, nothing encoded
    assert torch.equal(reopened.split(tiny, synthetic, "train", [120, 3]).x, torch.cat([b.x[3:], a.x[1:2]]))
    assert reopened.encoded_images == 0
    assert reopened.split(tiny, synthetic, "val", []).x.shape == (0, tiny.embed_dim)


def test_coop_learns_only_n_ctx_context_vectors(runner, tiny, synthetic):
    method, train, val = setup("coop", runner, tiny, synthetic, epochs=2)
    frozen = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    method.fit(train, val)
    width = tiny.model.token_embedding.weight.shape[1]
    assert method.context.shape == (16, width) and method.trainable_params() == 16 * width
    assert not torch.equal(method.context.detach(), method.prompts.init)  # it trained
    assert all(torch.equal(v, frozen[k]) for k, v in tiny.model.state_dict().items())
    # a backward pass reaches the context and nothing in the encoders
    feats = frozen_image_features(tiny, torch.randn(2, 3, tiny.image_size, tiny.image_size))
    loss = (feats @ encode_prompts(tiny.model, method.prompts, method.context).T).sum()
    loss.backward()
    assert method.context.grad is not None and method.context.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.model.parameters())


def test_coop_prompt_with_init_words_reproduces_the_hand_written_prompt(tiny, synthetic):
    prompts = build_prompts(tiny, synthetic.classnames, 16, "a photo of a", CPU, torch.Generator())
    assert prompts.init.shape[0] == 4  # n_ctx comes from the init words
    assert prompts.eot.tolist() == [1 + 4 + len(tiny.tokenize([c])[0].nonzero()) - 2 + 1
                                    for c in synthetic.classnames]  # SOS, ctx, class tokens, "."
    learned = encode_prompts(tiny.model, prompts, prompts.init)
    written = encode_tokens(tiny.model, tiny.tokenize([f"a photo of a {c}." for c in synthetic.classnames]))
    torch.testing.assert_close(learned, written)


def test_cocoop_with_a_silent_meta_net_is_the_init_prompt(runner, tiny, synthetic):
    method, _, _ = setup("cocoop", runner, tiny, synthetic)
    method._build()  # context initialised from "a photo of a", fresh meta-net
    assert method.meta[0].out_features == max(1, tiny.embed_dim // 16)
    torch.nn.init.zeros_(method.meta[2].weight)
    torch.nn.init.zeros_(method.meta[2].bias)
    images = torch.randn(3, 3, tiny.image_size, tiny.image_size)
    text = zero_shot_weights(tiny, synthetic.classnames, ["a photo of a {}."], CPU)
    feats = frozen_image_features(tiny, images)  # eval_input = "features": logits score frozen features
    torch.testing.assert_close(method.logits(feats), 100.0 * feats @ text.T)


def test_taskres_with_a_zero_residual_is_zero_shot(runner, tiny, synthetic):
    method, _, _ = setup("taskres", runner, tiny, synthetic)
    method.load_state_tensors({"residual": torch.zeros(len(synthetic.classnames), tiny.embed_dim)})
    x = runner.executor.features.split(tiny, synthetic, "test").x
    torch.testing.assert_close(method.logits(x), zero_shot_logits(tiny, synthetic, x))
    assert method.scale == 0.5


def test_clip_adapter_with_ratio_zero_is_zero_shot(runner, tiny, synthetic):
    method, train, val = setup("clip_adapter", runner, tiny, synthetic, ratio=0.0, epochs=2)
    method.fit(train, val)
    x = runner.executor.features.split(tiny, synthetic, "test").x
    torch.testing.assert_close(method.logits(x), zero_shot_logits(tiny, synthetic, x))
    assert method.adapter[0].bias is None and method.adapter[0].out_features == tiny.embed_dim // 4


def test_lp_plus_plus_initialisation_steps_and_blending(runner, tiny, synthetic):
    method, train, val = setup("lp_plus_plus", runner, tiny, synthetic, shots=4, epochs=0)
    method.fit(train, val)
    x, y, n_cls = train.features, train.labels, len(synthetic.classnames)
    text = zero_shot_weights(tiny, synthetic.classnames, synthetic.templates, CPU)
    sums = torch.stack([x[y == c].sum(0) for c in range(n_cls)])
    torch.testing.assert_close(method.w, sums)
    tl = x @ text.T
    alpha0 = 250.0 * torch.stack([tl[y == c, c].mean() for c in range(n_cls)]).mean()  # own-class similarity
    torch.testing.assert_close(method.alpha, torch.full((n_cls,), alpha0.item()))
    blended = x @ (method.w + method.alpha[:, None] * text).T + method.b  # class weights W_c + alpha_c t_c
    torch.testing.assert_close(method.logits(x), blended)
    assert math.isclose(lr_prototypes(x), 4 * len(x) / torch.linalg.svdvals(x.double())[0].item() ** 2, rel_tol=1e-6)
    assert math.isclose(lr_blending(tl), len(x) / (4 * (tl ** 2).sum(0).max().item()), rel_tol=1e-6)
    torch.testing.assert_close(class_sums(x, y, n_cls), sums)
    assert math.isclose(init_blending(tl, y, n_cls, 250.0), alpha0.item(), rel_tol=1e-5)


def test_dassl_schedule_warm_up_then_cosine():
    lrs = [dassl_lr(e, 0.002, 10, 1, 1e-5) for e in range(10)]
    assert lrs[0] == 1e-5 and lrs[1] == 0.002  # ConstantWarmupScheduler hands over at the base rate
    assert lrs[2] == pytest.approx(0.001 * (1 + math.cos(math.pi / 10)))
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def test_a_non_finite_loss_fails_the_run(tiny, synthetic):
    w = torch.nn.Parameter(torch.zeros(1))
    batches = shuffled_batches(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2, torch.Generator())
    with pytest.raises(RunFailed, match="non-finite loss in epoch 1 of 3"):
        train_epochs(Context(tiny, synthetic, CPU, SEED, 1), torch.optim.SGD([w], lr=0.1), batches,
                     lambda x, y: w.sum() * float("nan"), 3, 2, lambda epoch: 0.1, "test")


def test_coop_per_shot_schedule():
    assert [coop_epochs(k, "dtd") for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert {coop_epochs(k, "imagenet") for k in (1, 16)} == {50}


PAPER_DEFAULTS = {
    "coop": {"n_ctx": 16, "init": "random", "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 32,
             "epochs": 0, "warmup_epochs": 1, "warmup_lr": 1e-5, "crop_scale": [0.08, 1.0]},
    "cocoop": {"n_ctx": 4, "init": "a photo of a", "lr": 0.002, "batch_size": 1, "epochs": 10, "warmup_epochs": 1,
               "warmup_lr": 1e-5, "momentum": 0.9, "weight_decay": 5e-4},
    "tip_adapter": {"augment_views": 10, "crop_scale": [0.5, 1.0], "search": True, "search_step": [200, 20],
                    "search_scale": None},
    "tip_adapter_f": {"augment_views": 10, "lr": 1e-3, "eps": 1e-4, "weight_decay": 1e-2, "batch_size": 256,
                      "epochs": 0},
    "clip_adapter": {"reduction": 4, "ratio": None, "ratios": [0.2, 0.4, 0.6, 0.8], "lr": 0.002,
                     "batch_size": 32, "epochs": 0, "momentum": 0.9,
                     "weight_decay": 5e-4, "warmup_epochs": 1, "warmup_lr": 1e-5},
    "lp_plus_plus": {"epochs": 300, "alpha_every": 10, "alpha_init_scale": 250.0, "momentum": 0.9},
    "taskres": {"scale": None, "lr": None, "weight_decay": 5e-4, "betas": [0.9, 0.999], "batch_size": 256,
                "epochs": 0, "warmup_epochs": 1, "warmup_lr": 1e-5},
}


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_defaults_are_the_papers(name):
    config = dataclasses.asdict(METHODS.get(name).Config())
    assert {k: config[k] for k in PAPER_DEFAULTS[name]} == PAPER_DEFAULTS[name]


def test_per_dataset_official_values():
    from fsbench.methods import taskres

    assert tip_adapter.official("imagenet") == (1.17, 1.0, [7.0, 3.0])
    assert tip_adapter.official("dtd")[2] == [13.0, 13.0] and tip_adapter.official("fgvc_aircraft")[0] == 5.0
    assert taskres.official("imagenet", 4) == (0.5, 2e-4, 100)
    assert taskres.official("oxford_flowers", 16) == (1.0, 2e-3, 200)


def test_peft_lora_with_zero_b_is_the_base_model(runner, tiny, synthetic):
    method, _, _ = setup("peft", runner, tiny, synthetic)
    method.prepare()
    method.model.train()  # dropout active on the LoRA branch: with B = 0 it must still change nothing
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    tokens = tiny.tokenize(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        assert torch.equal(method.model.encode_image(images), tiny.model.encode_image(images))
        assert torch.equal(method.model.encode_text(tokens), tiny.model.encode_text(tokens))
    lora_layers = [m for m in method.model.modules() if hasattr(m, "lora_B")]
    assert len(lora_layers) == 3 * 2 * 2  # q, k, v x 2 blocks x 2 towers
    assert lora_layers[0].scaling["default"] == pytest.approx(1 / math.sqrt(2))  # CLIP-LoRA's alpha / sqrt(r)
    lora = METHODS.get("lora")(LoRAConfig(), method.ctx)
    lora.prepare()
    assert method.trainable_params() == lora.trainable_params()  # the default peft config is CLIP-LoRA


def test_peft_configs_from_json_and_tables(tiny, synthetic):
    cls = METHODS.get("peft")
    ia3 = {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "c_fc"], "feedforward_modules": ["c_fc"]}
    cfg = apply_sets(BenchConfig(), ['peft.config={"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", '
                                     '"c_fc"], "feedforward_modules": ["c_fc"]}', "peft.encoder=vision"])
    from_json = method_config(cls, cfg.methods["peft"])
    from_table = method_config(cls, {"config": ia3, "encoder": "vision"})
    for config in (from_json, from_table):
        method = cls(config, Context(tiny, synthetic, CPU, SEED, 1))
        method.prepare()
        assert method.trainable_params() == 2 * (64 + 64 + 64)  # 2 vision blocks: k, v outputs, c_fc input


def test_peft_recipe_defaults_are_lora_recipe_defaults():
    peft_fields = {f.name for f in dataclasses.fields(METHODS.get("peft").Config)}
    shared = [f.name for f in dataclasses.fields(LoRAConfig) if f.name in peft_fields]
    assert {"lr", "weight_decay", "betas", "batch_size", "iters_per_shot", "eta_min", "crop_scale"} <= set(shared)
    assert all(getattr(METHODS.get("peft").Config(), n) == getattr(LoRAConfig(), n) for n in shared)


@pytest.mark.parametrize(("config", "message"), [
    ('{"peft_type": "NOPE"}', "unknown peft_type 'NOPE'"),
    ('{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}', "prompt learning"),
    ('{"r": 2}', "peft_type"),
    ("{not json", "not valid JSON"),
    ('{"peft_type": "LORA", "rank": 2}', "rank"),
])
def test_bad_peft_configs_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        method_config(METHODS.get("peft"), {"config": config})


def test_missing_peft_is_a_one_line_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install fsbench\[peft\]"):
        method_config(METHODS.get("peft"), {})


FROZEN_FEATURE_METHODS = ["zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "clip_adapter",
                          "lp_plus_plus", "taskres"]
VIEWS = 2  # augmented views per shot: fewer than the paper's 10 to keep the test short
QUICK = {"linear_probe.max_iter": 10, "linear_probe.weight_decays": "[0.01]", "tip_adapter.augment_views": VIEWS,
         "tip_adapter_f.augment_views": VIEWS, "tip_adapter.search_step": "[20, 5]",
         "tip_adapter_f.search_step": "[20, 5]", "tip_adapter_f.epochs": 2, "clip_adapter.epochs": 2,
         "taskres.epochs": 2, "lp_plus_plus.epochs": 10}


@pytest.mark.slow
def test_frozen_encoder_methods_encode_each_image_once(tmp_path, make_runner):
    """All frozen-encoder methods x 5 shot counts x 3 seeds: every image the grid draws, every
    test image and every drawn image's augmented views go through the encoder exactly once."""
    runner = make_runner(tmp_path, [f"{k}={v}" for k, v in QUICK.items()])
    shots, seeds = [1, 2, 4, 8, 16], [1, 2, 3]
    backbone = runner.executor.backbone(RunSpec("zero_shot", "test-tiny", "synthetic", 1, 1))
    encoded, encode = [], backbone.model.encode_image

    def counting(images: torch.Tensor, **kwargs) -> torch.Tensor:
        encoded.append(len(images))
        return encode(images, **kwargs)

    backbone.model.encode_image = counting
    try:
        for name in FROZEN_FEATURE_METHODS:
            for k in shots:
                for s in seeds:
                    result, _ = runner.run(RunSpec(name, "test-tiny", "synthetic", k, s))
                    assert result.status == "ok", result.error
    finally:
        del backbone.model.encode_image
    data = runner.planner.dataset("synthetic")
    drawn = [runner.planner.splits.get(data, k, s) for k in shots for s in seeds]
    train = set().union(*(d.train for d in drawn))
    val = set().union(*(d.val for d in drawn))
    encoded_images = runner.executor.features.encoded_images
    assert sum(encoded) == encoded_images == len(train) * (1 + VIEWS) + len(val) + len(data.test)
