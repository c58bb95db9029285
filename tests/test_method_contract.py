"""The contract every registered method meets, on the tiny CLIP and the synthetic dataset (CPU).

For each name in the registry: `fit` then `logits` give finite (N, C) scores; the shared frozen
backbone is unchanged; two fits under the same seed give identical logits; the cost counters
are non-negative integers; and saving then reloading what it learned gives identical logits.
Training methods run with the small settings of `FAST` (their defaults are tested against the
papers in tests/test_methods_zoo.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fsbench.adapters import load_adapter, save_adapter
from fsbench.config import method_config
from fsbench.engine import Runner
from fsbench.images import image_loader
from fsbench.method import METHODS, Context, FeatureSource, Method
from fsbench.spec import RunSpec

SEED, SHOTS, N_TEST = 1, 1, 6
FAST = {
    "coop": {"epochs": 2},  # one warm-up epoch, one at the full rate
    "coop_4ctx": {"epochs": 2},
    "kgcoop": {"epochs": 2},
    "prograd": {"epochs": 2},
    "cocoop": {"epochs": 1, "batch_size": 5},
    "lora": {"iters_per_shot": 2},
    "peft": {"iters_per_shot": 2},
    "clip_svd": {"iters_per_shot": 2},
    "lora_dora": {"iters_per_shot": 2},
    "lora_pissa": {"iters_per_shot": 2},
    "lora_vera": {"iters_per_shot": 2},
    "clipfit": {"epochs": 2},
    "two_stage": {"iters_per_shot": 4},
    "linear_probe": {"max_iter": 20},
    "clip_adapter": {"epochs": 5},
    "taskres": {"epochs": 5},
    "tip_adapter_f": {"epochs": 3},
    "lp_plus_plus": {"epochs": 20},
    "maple": {"epochs": 2},  # depth 9 is capped at test-tiny's 2 blocks
    "plot_pp": {"epochs": 2},  # per stage
    "gallop": {"epochs": 2},
    "promptsrc": {"epochs": 2},  # depth 9 is capped at test-tiny's 2 blocks
    "tcp": {"epochs": 2},
    "dept_coop": {"epochs": 2},
    "dept_kgcoop": {"epochs": 2},
    "dept_maple": {"epochs": 2},
}


@pytest.fixture(scope="module")
def runner(tmp_path_factory, make_runner):
    return make_runner(tmp_path_factory.mktemp("contract"))


@pytest.fixture(scope="module")
def test_inputs(runner, tiny, synthetic):
    """A batch of test inputs in both forms: cached features and preprocessed images."""
    feats = runner.executor.features.split(tiny, synthetic, "test").x[:N_TEST]
    loader = image_loader(synthetic.test[:N_TEST], synthetic.image_root, tiny.preprocess, N_TEST,
                          torch.device("cpu"), workers=0)
    images, _ = next(iter(loader))
    return {"features": feats, "images": images}


def fitted(name: str, runner: Runner, tiny, synthetic) -> Method:
    """A method fitted as the engine fits it (seeded, with the runner's few-shot data)."""
    cls = METHODS.get(name)
    config = method_config(cls, FAST.get(name, {}))
    split = runner.planner.splits.get(synthetic, SHOTS, SEED)
    train, val = runner.executor.fewshot(cls, tiny, synthetic, split)
    torch.manual_seed(SEED)
    features = FeatureSource(runner.executor.features, tiny, synthetic)
    ctx = Context(tiny, synthetic, torch.device("cpu"), SEED, SHOTS, features=features)
    method = cls(config, ctx)
    method.fit(train, val)
    return method


@torch.no_grad()
def scores(method: Method, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the test inputs in the form the runner hands the method at evaluation."""
    if method.eval_encoder is not None:  # other cached features: encode the images as the runner's cache does
        _, encode = method.eval_encoder
        with torch.no_grad():
            return method.logits(encode(method.ctx.backbone.model, inputs["images"]).float()).float()
    return method.logits(inputs[method.eval_input or method.input_kind]).float()


@pytest.mark.parametrize("name", METHODS.names())
def test_fit_logits_frozen_backbone_determinism_and_reload(name, runner, tiny, synthetic, test_inputs, tmp_path):
    frozen = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    first = fitted(name, runner, tiny, synthetic)
    logits = scores(first, test_inputs)
    assert logits.shape == (N_TEST, len(synthetic.classnames))
    assert torch.isfinite(logits).all()
    second = fitted(name, runner, tiny, synthetic)
    assert torch.equal(scores(second, test_inputs), logits), "two fits under one seed differ"
    after = tiny.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items()), "fit changed the shared backbone"
    assert not any(p.requires_grad for p in tiny.model.parameters())
    for count in (first.trainable_params(), first.inference_overhead()):
        assert isinstance(count, int) and count >= 0
    spec = RunSpec(name, "test-tiny", synthetic.name, SHOTS, SEED)
    reloaded = load_adapter(save_adapter(first, tmp_path, spec), first.ctx)
    assert torch.equal(scores(reloaded, test_inputs), logits), "save + reload changed the logits"


@pytest.mark.parametrize("name", METHODS.names())
def test_registered_metadata(name):
    cls = METHODS.get(name)
    assert cls.name == name and cls.input_kind in ("features", "images")
    assert cls.paper and cls.summary and len(cls.summary) <= 100
    assert dataclasses.is_dataclass(cls.Config) and cls.__doc__
    method_config(cls, {})  # the defaults are a valid config
