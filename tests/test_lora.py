"""CLIP-LoRA maths: identity at B = 0, merge equivalence, the paper's parameter count."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fsbench.backbones import BackboneSpec, build_backbone
from fsbench.config import method_config
from fsbench.errors import ConfigError
from fsbench.methods.lora import CLIPLoRA, LoRAConfig
from fsbench.tuners import LoRALinear, inject_lora, layer_indices


def _inputs(backbone, n_images=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_images, 3, backbone.image_size, backbone.image_size, generator=g)
    tokens = backbone.tokenize(["a photo of a cat.", "a dog", "a centered satellite photo of a river."])
    return images, tokens


def _outputs(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_zero_b_reproduces_base_model_exactly(tiny):
    images, tokens = _inputs(tiny)
    base = _outputs(tiny.model, images, tokens)
    model = copy.deepcopy(tiny.model)
    layers = inject_lora(model, LoRAConfig(matrices=["q", "k", "v", "o"]))
    model.train()  # dropout active on the LoRA branch: with B = 0 it must still change nothing
    adapted = _outputs(model, images, tokens)
    assert len(layers) == 4 * 2 * 2  # 4 matrices x 2 blocks x 2 towers
    for a, b in zip(base, adapted, strict=True):
        assert torch.equal(a, b)


def test_merged_weights_reproduce_unmerged_outputs(tiny):
    images, tokens = _inputs(tiny)
    model = copy.deepcopy(tiny.model)
    layers = inject_lora(model, LoRAConfig(rank=4, alpha=2.0))
    g = torch.Generator().manual_seed(1)
    for layer in layers:
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.1
    model.eval()
    unmerged = _outputs(model, images, tokens)
    for layer in layers:
        layer.merge()
    merged = _outputs(model, images, tokens)
    base = _outputs(tiny.model, images, tokens)
    for u, m, b in zip(unmerged, merged, base, strict=True):
        torch.testing.assert_close(m, u, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(u, b, atol=1e-4)  # the update really changes the model
    for layer in layers:
        layer.unmerge()
    for u, back in zip(unmerged, _outputs(model, images, tokens), strict=True):
        torch.testing.assert_close(back, u, rtol=1e-5, atol=1e-5)


def test_scaling_is_alpha_over_sqrt_rank():
    layer = LoRALinear(torch.nn.Linear(8, 8), rank=4, alpha=1.0, dropout=0.0)
    assert layer.scaling == pytest.approx(0.5)


@pytest.mark.slow
def test_vit_b16_trainable_parameter_count_matches_the_paper():
    """Rank 2 on q, k, v of all 12+12 blocks: 12*3*2*(768+768) + 12*3*2*(512+512) = 184,320."""
    backbone = build_backbone(BackboneSpec("ViT-B/16", pretrained="none"))
    layers = inject_lora(backbone.model, LoRAConfig())
    assert len(layers) == 72
    assert sum(p.numel() for layer in layers for p in (layer.lora_A, layer.lora_B)) == 184_320


def test_positions_equal_the_official_index_sets_at_depth_12():
    official = {"bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11],
                "half-up": [6, 7, 8, 9, 10, 11], "half-bottom": [0, 1, 2, 3, 4, 5],
                "all": list(range(12)), "top1": [11], "top3": [9, 10, 11]}
    for position, expected in official.items():
        assert layer_indices(position, 12) == expected
    assert layer_indices("all", 24) == list(range(24))


def test_encoder_option_adapts_only_that_tower(tiny):
    model = copy.deepcopy(tiny.model)
    inject_lora(model, LoRAConfig(encoder="vision"))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert names and all(n.startswith("visual.") for n in names)


def test_defaults_are_the_official_recipe():
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.lr, cfg.weight_decay) == (2, 1.0, 0.25, 2e-4, 1e-2)
    assert cfg.batch_size == 32
    assert (cfg.iters_per_shot, cfg.eta_min, cfg.matrices, cfg.encoder, cfg.position) == (
        500, 1e-6, ["q", "k", "v"], "both", "all")
    assert cfg.betas == [0.9, 0.999] and cfg.logit_scale == 100.0 and cfg.crop_scale == [0.08, 1.0]


@pytest.mark.parametrize("overrides", [{"rank": 0}, {"matrices": ["x"]}, {"encoder": "audio"},
                                       {"position": "middle"}, {"rank": "two"}, {"ranks": 2}])
def test_bad_lora_options_are_config_errors(overrides):
    with pytest.raises(ConfigError):
        method_config(CLIPLoRA, overrides)


def test_config_fields_are_the_documented_names():
    names = {f.name for f in dataclasses.fields(LoRAConfig)}
    assert {"rank", "alpha", "dropout", "lr", "weight_decay", "batch_size", "iters_per_shot",
            "matrices", "encoder", "position"} <= names



def test_set_reaches_every_piece_of_a_composed_config():
    cfg = method_config(CLIPLoRA, {"rank": 4, "lr": 1e-3, "matrices": ["q"], "text_buckets": 2})
    assert (cfg.rank, cfg.lr, cfg.matrices, cfg.text_buckets) == (4, 1e-3, ["q"], 2)
    with pytest.raises(ConfigError, match="lora.iters_per_shot"):
        method_config(CLIPLoRA, {"iters_per_shot": 0})
    with pytest.raises(ConfigError, match="lora.text_buckets"):
        method_config(CLIPLoRA, {"text_buckets": 0})


def test_clip_lora_schedule_is_an_option_of_the_one_loop(tiny, synthetic):
    """`train_iterations` runs the official loop (CLIP-LoRA lora.py:73-126): `total` updates, CosineAnnealingLR
    stepped after each; the same weights, bit for bit, as that loop written out, one progress tick per update."""
    from fsbench.method import Context
    from fsbench.training import train_iterations

    x, y, total = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0] * 2), 120
    batches = lambda: iter(lambda: (x, y), None)  # noqa: E731

    def model_and_opt():
        torch.manual_seed(0)
        lin = torch.nn.Linear(6, 3)
        return lin, torch.optim.AdamW(lin.parameters(), lr=2e-4, weight_decay=1e-2)

    official, opt = model_and_opt()
    sched, lrs = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=1e-6), []
    for count, (xb, yb) in enumerate(batches()):
        lrs.append(opt.param_groups[0]["lr"])
        loss = F.cross_entropy(official(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if count + 1 == total:
            break
    ticks = []
    track = lambda it, n, desc: (ticks.append(i) or i for i in it)  # noqa: E731
    ctx = Context(tiny, synthetic, torch.device("cpu"), 0, 1, track=track)
    ours, opt = model_and_opt()
    train_iterations(ctx, opt, batches(), lambda xb, yb: F.cross_entropy(ours(xb), yb), total, 1e-6, "train x")
    assert torch.equal(ours.weight, official.weight) and torch.equal(ours.bias, official.bias)
    assert ticks == list(range(total))
    curve = ctx.curves.export()["train x"]
    assert curve["steps"] == total and curve["lr"] == lrs  # 120 points: under the 256-point downsampling

