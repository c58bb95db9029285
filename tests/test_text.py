"""Truncated and length-bucketed text features equal open_clip's full 77-token `encode_text`."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
from torch import nn

from fsbench.backbones import Backbone, BackboneSpec, build_backbone, resolve_factory
from fsbench.text import bucket_tokens, encode_buckets, encode_tokens, length_buckets, truncate_tokens

PROMPTS = ["a photo of a tench.", "x", "a photo of a great white shark.",
           "a photo of a class whose name is long enough to need many tokens, with commas, and more words."]
BACKBONES = ["test-tiny", pytest.param("ViT-B/16", marks=pytest.mark.slow)]


@functools.cache
def models(name: str) -> tuple[Backbone, nn.Module]:
    """fsbench's backbone (unfused attention) and open_clip's own model with the same weights."""
    spec = BackboneSpec(name, pretrained="none")
    return build_backbone(spec), resolve_factory(spec.name)(spec).eval()


@functools.cache
def full_features(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PROMPTS' tokens and their features from open_clip's `encode_text` on all 77 positions."""
    backbone, plain = models(name)
    tokens = backbone.tokenize(PROMPTS)
    with torch.no_grad():
        return tokens, plain.encode_text(tokens, normalize=True)


@pytest.mark.parametrize("name", BACKBONES)
def test_truncated_text_equals_full_77_token_text(name: str) -> None:
    tokens, full = full_features(name)
    assert truncate_tokens(tokens).shape[1] < tokens.shape[1] == 77
    with torch.no_grad():
        fast = encode_tokens(models(name)[0].model, tokens)
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("max_buckets", [1, 2, 3])
def test_bucketed_text_equals_full_77_token_text(name: str, max_buckets: int) -> None:
    tokens, full = full_features(name)
    with torch.no_grad():
        fast = encode_buckets(models(name)[0].model, bucket_tokens(tokens, max_buckets))
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=2e-5)


def test_bucketed_gradients_equal_truncated_gradients(tiny: Backbone) -> None:
    tokens = tiny.tokenize(PROMPTS)
    weight = torch.randn(len(PROMPTS), tiny.embed_dim, generator=torch.Generator().manual_seed(0))
    grads = []
    for encode in (lambda m: encode_tokens(m, tokens), lambda m: encode_buckets(m, bucket_tokens(tokens, 3))):
        model = copy.deepcopy(tiny.model).requires_grad_(True)
        (encode(model) * weight).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.transformer.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _brute_force(lengths: list[int], k: int) -> int:
    values = sorted(set(lengths))
    best = None
    for n in range(1, min(k, len(values)) + 1):
        for cuts in itertools.combinations(values[:-1], n - 1):
            bounds, lower, cost = [*cuts, values[-1]], 0, 0
            for b in bounds:
                cost += b * sum(lower < v <= b for v in lengths)
                lower = b
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_length_buckets_minimise_padded_tokens(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (40,), generator=g).tolist()
    for k in (1, 2, 3, 4):
        bounds = length_buckets(lengths, k)
        assert len(bounds) <= k and bounds[-1] == max(lengths) and bounds == sorted(bounds)
        lower, cost = 0, 0
        for b in bounds:
            cost += b * sum(lower < v <= b for v in lengths)
            lower = b
        assert cost == _brute_force(lengths, k)


def test_imagenet_prompts_need_a_fraction_of_the_tokens(tiny: Backbone) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    tokens = tiny.tokenize([f"a photo of a {c}." for c in IMAGENET_CLASSNAMES])
    buckets = bucket_tokens(tokens, 4)
    assert truncate_tokens(tokens).numel() == 18_000 and buckets.tokens == 9_536
    for g in buckets.groups:  # each group is cut right after its own longest prompt
        assert int(g.argmax(dim=-1).max()) + 1 == g.shape[1]
    rows = torch.cat([nn.functional.pad(g, (0, 77 - g.shape[1])) for g in buckets.groups])[buckets.inverse]
    assert torch.equal(rows, tokens)
