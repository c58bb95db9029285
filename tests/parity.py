"""The model every parity fixture was made on: a seeded random open_clip CLIP, as the official code built it."""

from __future__ import annotations

import math

import open_clip
import torch

from fsbench.attention import split_attention
from fsbench.backbones import Backbone, BackboneSpec


def parity_model_backbone(data: dict, tiny: Backbone, image_size: int = 32) -> Backbone:
    """The CLIP of a fixture's `parity_config` (torch seed 0, QuickGELU) the official code was run on, checked
    against the fixture's `checksum`, unfused and frozen as `build_backbone` does, with `tiny`'s real BPE
    tokenizer, preprocessing and normalisation (`image_size` px, embedding 64: the fixtures' sizes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**data["parity_config"], quick_gelu=True)
    checksum = float(sum(v.double().sum() for v in model.state_dict().values()))
    assert math.isclose(checksum, data["checksum"], rel_tol=1e-12), "torch's seeded init changed: remake fixtures"
    split_attention(model)
    model.requires_grad_(False).eval()
    return Backbone(BackboneSpec("test-tiny"), model, tiny.tokenizer, tiny.preprocess, image_size, tiny.mean, tiny.std,
                    64)
