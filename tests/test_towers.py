"""fsbench.towers: the block-by-block towers compute what open_clip computes, and their hooks act.

Without prompts or hooks, `vision_tokens` / `text_forward` equal `model.encode_image` /
`model.encode_text` bit for bit on the tiny CLIP and on the ViT-B/16 architecture (random weights).
"""

from __future__ import annotations

import pytest
import torch

from fsbench.backbones import BackboneSpec, build_backbone
from fsbench.towers import (
    append_tokens,
    encode_text,
    pool_vision,
    replace_tokens,
    text_depth,
    tower_support,
    vision_depth,
    vision_tokens,
)


@pytest.fixture(scope="module")
def vit_b16():
    """ViT-B/16's architecture with seeded random weights (no download)."""
    return build_backbone(BackboneSpec("ViT-B/16", pretrained="none"))


def _images(backbone, n: int) -> torch.Tensor:
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))


def _tokens(backbone) -> torch.Tensor:
    return backbone.tokenize(["a photo of a dog.", "a blurry photo of a large red car on a street."])


@torch.no_grad()
@pytest.mark.parametrize("which", ["tiny", "vit_b16"])
def test_unhooked_towers_equal_open_clip_exactly(which, request):
    backbone = request.getfixturevalue(which)
    model, images, tokens = backbone.model, _images(backbone, 2 if which == "tiny" else 1), _tokens(backbone)
    assert tower_support(model) is None
    pooled, patches = vision_tokens(model, images)
    assert torch.equal(pooled, model.encode_image(images))
    grid = backbone.image_size // model.visual.patch_size[0]
    assert patches.shape == (len(images), grid * grid, model.visual.transformer.width)
    model.visual.output_tokens = True  # open_clip's own patch tokens, for comparison
    try:
        assert torch.equal(patches, model.visual(images)[1])
    finally:
        model.visual.output_tokens = False
    assert torch.equal(encode_text(model, tokens, normalize=False), model.encode_text(tokens))
    assert vision_depth(model) == text_depth(model) == (2 if which == "tiny" else 12)


@torch.no_grad()
def test_hook_sees_every_block_input_and_its_changes_propagate(tiny):
    model, images = tiny.model, _images(tiny, 2)
    seen = []

    def record(i, x):
        seen.append((i, x.shape))
        return x

    pooled, _ = vision_tokens(model, images, hook=record)
    assert seen == [(0, (2, 17, 64)), (1, (2, 17, 64))]
    assert torch.equal(pooled, model.encode_image(images))
    changed, _ = vision_tokens(model, images, hook=lambda i, x: x * 1.5 if i == 1 else x)
    assert not torch.allclose(changed, pooled)


@torch.no_grad()
def test_prompts_are_appended_before_ln_pre_and_left_out_of_patch_tokens(tiny):
    model, images = tiny.model, _images(tiny, 2)
    prompts = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    shapes = []
    pooled, patches = vision_tokens(model, images, prompts, hook=lambda i, x: shapes.append(x.shape) or x)
    assert shapes[0] == (2, 17 + 3, 64) and patches.shape == (2, 16, 64)
    assert not torch.allclose(pooled, model.encode_image(images))  # the prompts are attended to
    # the same prompts given per image (B, P, W) give the same result
    per_image, _ = vision_tokens(model, images, prompts.expand(2, -1, -1))
    assert torch.equal(per_image, pooled)


@torch.no_grad()
def test_pooling_without_open_clip_pool_method_matches_it(tiny, monkeypatch):
    visual = tiny.model.visual
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(2))
    expected = visual._pool(x)
    monkeypatch.delattr(type(visual), "_pool")  # as open_clip < 2.26
    assert not hasattr(visual, "_pool")
    pooled, tokens = pool_vision(visual, x)
    assert torch.equal(pooled, expected[0]) and torch.equal(tokens, expected[1])


def test_replace_and_append_tokens():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    new = torch.full((2, 3), -1.0, requires_grad=True)
    y = replace_tokens(x, 1, new)
    assert y.shape == x.shape and (y[:, 1:3] == -1).all()
    assert torch.equal(y[:, [0, 3, 4]], x[:, [0, 3, 4]])
    assert torch.equal(replace_tokens(x, -2, new)[:, 3:], new.detach().expand(2, -1, -1))
    y.sum().backward()
    assert torch.equal(new.grad, torch.full((2, 3), 2.0))  # one row per image
    assert append_tokens(x, new).shape == (2, 7, 3)
    with pytest.raises(ValueError, match="cannot replace"):
        replace_tokens(x, 4, new)
