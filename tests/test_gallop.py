"""GalLoP (methods/gallop.py): the loss, its gradients and the inference scores equal the official code's on the
same random weights and inputs (fixture made outside the project, tests/fixtures/gallop/README.md), the
top-k reduction and prompt dropout as the official tools compute them, the official defaults and the
trainable-parameter count on ViT-B/16."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from parity import parity_model_backbone
from test_method_contract import fitted, runner  # noqa: F401  (the module-scoped runner fixture)
from test_prompts2025 import assert_grads
from test_sweep import results_by_key, sweep_args

from fsbench.cli import main
from fsbench.config import method_config
from fsbench.errors import ConfigError
from fsbench.method import Context
from fsbench.methods.gallop import (
    GalLoP,
    GalLoPConfig,
    GalLoPPrompts,
    dropout_index,
    gallop_loss,
    local_features,
    topk_reduce,
    value_path,
)
from fsbench.protocols import ClassSet
from fsbench.towers import vision_tokens

FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "gallop" / "official_loss.pt"
CPU = torch.device("cpu")
NAMES = {"global_prompt": "global_prompts", "local_prompts": "local_prompts",
         "local_proj.linear.weight": "local_proj.weight"}


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(FIXTURE, weights_only=False)


@pytest.fixture(scope="module")
def parity_method(official, tiny) -> GalLoP:
    """fsbench's GalLoP on the seeded random CLIP the official code ran on, with the official initial values."""
    bb = parity_model_backbone(official, tiny, image_size=64)
    names = official["classnames"]
    classes = ClassSet("oxford_pets", "oxford_pets", tuple(range(len(names))), tuple(names), ("a photo of a {}.",))
    method = GalLoP(method_config(GalLoP, {"logit_scale": official["logit_scale"]}),
                    Context(bb, classes, CPU, seed=1, shots=1))
    method._build()
    params = dict(method.learner.named_parameters())
    with torch.no_grad():
        for official_name, name in NAMES.items():
            params[name].copy_(official["init"][official_name])
    return method


def test_initial_prompts_are_the_official_template_embedding(official, parity_method):
    """Before the fixture's perturbation, every prompt is "A photo of a" (gallop.py:356-370): the perturbed
    official values are within 0.1 of fsbench's template embedding, all 4 x 4 tokens of both prompt sets."""
    init = parity_method.prompts.init
    assert init.shape == (4, 64)
    for name in ("global_prompt", "local_prompts"):
        assert (official["init"][name] - init).abs().max() < 0.1


def test_loss_gradients_and_scores_equal_the_official_code(official, parity_method):
    method = parity_method
    method.learner.zero_grad()
    loss = method.loss(official["images"], official["labels"], keep=official["keep"])
    loss.backward()
    assert math.isclose(loss.item(), official["loss"], rel_tol=1e-5)
    params = dict(method.learner.named_parameters())
    assert set(official["grads"]) == set(NAMES)
    assert_grads({k: params[NAMES[k]].grad for k in official["grads"]}, official["grads"])
    with torch.no_grad():
        method.text = method.text_features()
        probs = torch.softmax(method.logits(official["images"]), dim=-1)
        glob, local = method.cosines(official["images"], method.text)
    torch.testing.assert_close(glob, official["global_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local, official["local_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, official["probs"], rtol=1e-5, atol=1e-6)


def test_value_path_is_the_block_without_attention_mixing(tiny):
    """With one token the attention is the value projection itself: the value path equals the block."""
    block = tiny.model.visual.transformer.resblocks[-1]
    x = torch.randn(3, 1, tiny.model.visual.transformer.width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(value_path(block, x), block(x), rtol=1e-5, atol=1e-6)


def test_local_features_keep_the_pooled_image_feature(tiny):
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, local = local_features(tiny.model, images)
        want = vision_tokens(tiny.model, images)[0]
    n_patches = tiny.model.visual.positional_embedding.shape[0] - 1
    assert torch.equal(pooled, want) and local.shape == (2, n_patches, tiny.model.visual.transformer.width)


def test_topk_reduce_means_each_prompts_own_k_capped_at_the_patches():
    logits = torch.arange(2 * 6 * 3 * 2, dtype=torch.float).reshape(2, 6, 3, 2)  # patch values increase
    out = topk_reduce(logits, [2, 10])
    assert out.shape == (2, 3, 2)
    assert torch.equal(out[..., 0], logits[:, 4:, :, 0].mean(1))  # the 2 largest
    assert torch.equal(out[..., 1], logits[..., 1].mean(1))  # k = 10 > 6 patches: all of them
    assert torch.equal(topk_reduce(logits, [3]), logits[:, 3:].mean(1))


def test_prompt_dropout_keeps_one_of_four_global_prompts_per_image():
    keep = dropout_index(8, 4, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (8, 1) and keep.min() >= 0 and keep.max() < 4
    assert dropout_index(8, 4, 0.0, torch.Generator().manual_seed(0)).shape == (8, 4)
    glob = torch.randn(8, 3, 4)
    labels = torch.zeros(8, dtype=torch.long)
    chosen = glob.gather(-1, keep[:, None, :].expand(-1, 3, -1)).mean(-1)
    want = torch.nn.functional.cross_entropy(10.0 * chosen, labels)
    assert torch.equal(gallop_loss(glob, None, labels, 10.0, [5], keep), want)


def test_defaults_are_the_official_recipe():
    cfg = GalLoPConfig()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.warmup_epochs) == (0.002, 0.9, 1e-2, 0)
    assert (cfg.n_global, cfg.n_local, cfg.topk, cfg.dropout) == (4, 4, [5, 10, 15, 20], 0.75)
    assert (cfg.batch_size, cfg.epochs, cfg.init) == (None, 0, "a photo of a")
    with pytest.raises(ConfigError, match="one per local prompt"):
        GalLoPConfig(topk=[5, 10])
    with pytest.raises(ConfigError, match="batch_size"):
        GalLoPConfig(batch_size=0)


def test_vit_b16_trainable_count_is_the_official_one():
    """606,208: the official GalLoP on a random ViT-B/16 (tests/fixtures/gallop/README.md)."""
    learner = GalLoPPrompts(torch.zeros(4, 512), 4, 4, 768)
    assert sum(p.numel() for p in learner.parameters()) == 606_208


def test_fit_records_the_resolved_schedule_and_batch(runner, tiny, synthetic):  # noqa: F811
    """epochs 0 / batch_size None resolve to the official script's values, and the stored config says what ran."""
    method = fitted("gallop", runner, tiny, synthetic)
    assert (method.config.epochs, method.config.batch_size) == (2, 32)  # epochs from FAST; batch: the default 32
    assert method.config.checkpoint_text == "off"  # "auto": on for ImageNet and SUN397 only
    assert method.trainable_params() == sum(p.numel() for p in method.learner.parameters())
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_sweep_on_the_tiny_backbone(tmp_path, synthetic_root, monkeypatch):
    """Issue 22's acceptance command for gallop: `fsbench sweep --methods gallop --backbones test-tiny --datasets
    synthetic --shots 1,2 --seeds 1` (2 epochs)."""
    monkeypatch.chdir(tmp_path)  # no ./bench.toml: built-in defaults
    args = [*sweep_args(tmp_path, synthetic_root), "--methods", "gallop", "--shots", "1,2", "--seeds", "1",
            "--set", "gallop.epochs=2"]
    assert main(args) == 0
    results = results_by_key(tmp_path / "results")
    assert set(results) == {("gallop", s, 1) for s in (1, 2)}
    assert all(r.error is None and r.config["batch_size"] == 32 for r in results.values())


def test_text_checkpointing_gives_the_same_loss_and_gradients(official, parity_method):
    """checkpoint_text "on" (the official ImageNet / SUN397 scripts' memory saving) changes no number."""
    method, out = parity_method, []
    for mode in ("off", "on"):
        method.config = dataclasses.replace(method.config, checkpoint_text=mode)
        method.learner.zero_grad()
        loss = method.loss(official["images"], official["labels"], keep=official["keep"])
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in method.learner.parameters()]))
    method.config = dataclasses.replace(method.config, checkpoint_text="auto")
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=0)
    # one prompt per text batch instead of four: float32 rounding only (as against the official code)
    assert_grads(dict(enumerate(out[1][1])), dict(enumerate(out[0][1])))
