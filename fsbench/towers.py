"""Both CLIP towers run block by block, with a hook before every block: the access deep prompts need.

open_clip runs a tower as one call (`encode_image`, `encode_text`); its `forward_intermediates`
reads block outputs but cannot change them. Deep-prompt methods insert learned tokens before the
first block and replace them before each later block (MaPLe, Khattak et al. CVPR 2023,
github.com/muzairkhattak/multimodal-prompt-learning clip/model.py:287-331), and patch-token
methods read the tokens beside the pooled feature (PLOT, Chen et al. ICLR 2023). Here:

- `vision_tokens(model, images, prompts, hook)` -> (pooled, patch tokens): `prompts` (P, W) or
  (B, P, W) are appended after the positional embedding, before `ln_pre` (where MaPLe and PLOT++
  put their shallow vision prompts, plot-pp/clip/model.py:264-273); `hook(i, x)` returns the
  (B, L, W) sequence that block `i` receives.
- `text_forward(model, x, eot_index, hook)`: the text tower on token embeddings (what CoOp-style
  prompts build), pooled and projected as `encode_text`.

Without prompts and hooks both compute exactly what `model.encode_image` / `model.encode_text`
compute (tests/test_towers.py, test-tiny and ViT-B/16). They cover open_clip's own transformers
(OpenAI CLIP, MetaCLIP, DFN, and the text tower of every open_clip text transformer);
`tower_support` says why another tower (timm's SigLIP / EVA vision towers, Hugging Face text
towers) is not covered. `context_window` re-splits `fsbench.prompts.Prompts` so that only the first
n tokens after the begin token are learned (MaPLe, PLOT++).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.backbones import Backbone, BackboneInfo
from fsbench.errors import ConfigError
from fsbench.prompts import Prompts
from fsbench.text import Hook, encode_token_embeddings, run_blocks, text_pooling, text_tower

NO_VISION_HOOKS = ("its vision tower is not open_clip's VisionTransformer (timm or convolutional towers have no hooks "
                   "here)")
NO_TEXT_EMBEDS = "its text tower is a Hugging Face model (no token-embedding entry point)"


def tower_support(model: nn.Module) -> str | None:
    """None if both towers of `model` run block by block here; else one line on what does not."""
    visual = getattr(model, "visual", None)
    if not all(hasattr(visual, a) for a in ("conv1", "class_embedding", "transformer", "ln_pre")):
        return NO_VISION_HOOKS
    if not text_pooling(model).embeds:
        return NO_TEXT_EMBEDS
    return None


def require_towers(method: str, backbone: Backbone) -> nn.Module:
    """The backbone's model when both towers run block by block here; else a one-line ConfigError naming
    `method` (a deep-prompt method's first step when it builds its prompts)."""
    reason = tower_support(backbone.model)
    if reason:
        raise ConfigError(f"{method} cannot run on {backbone.spec.name}: {reason}")
    return backbone.model


TIMM_VISION_FAMILIES = ("SigLIP", "SigLIP 2", "EVA-CLIP")  # vision tower: a timm model


def backbone_support(info: BackboneInfo) -> str | None:
    """`tower_support` read off a backbone's description, without building it (`Method.supports`)."""
    if not info.vision_attention or info.family in TIMM_VISION_FAMILIES:
        return NO_VISION_HOOKS
    return text_support(info)


def text_support(info: BackboneInfo) -> str | None:
    """None if the text tower takes token embeddings (what CoOp-style prompts build); else why not."""
    return None if info.text_attention else NO_TEXT_EMBEDS


class DeepPrompted:
    """Mixin of the methods that prompt both towers block by block (MaPLe, PromptSRC, PLOT++, DePT on
    MaPLe): what they support is `backbone_support`."""

    @classmethod
    def supports(cls, backbone: BackboneInfo) -> str | None:
        return backbone_support(backbone)


class TextPrompted:
    """Mixin of the methods that prompt the text tower only (CoOp family: DePT on CoOp/KgCoOp, TCP)."""

    @classmethod
    def supports(cls, backbone: BackboneInfo) -> str | None:
        return text_support(backbone)


def vision_depth(model: nn.Module) -> int:
    """Number of blocks of the vision transformer."""
    return len(model.visual.transformer.resblocks)


def text_depth(model: nn.Module) -> int:
    """Number of blocks of the text transformer."""
    return len(text_tower(model).transformer.resblocks)


def vision_embed(visual: nn.Module, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Patch + class embeddings with positions, prompts appended, then `ln_pre`: (B, 1 + HW [+ P], W)."""
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    if prompts is not None:
        x = append_tokens(x, prompts)
    return visual.ln_pre(x)


def vision_tokens(model: nn.Module, images: torch.Tensor, prompts: torch.Tensor | None = None,
                  hook: Hook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, D), patch tokens (B, HW, W)) of the vision tower, as open_clip computes them.

    `pooled` is `encode_image`'s unnormalised feature (projected); the patch tokens are the last
    block's outputs at the patch positions after `ln_post`, unprojected (open_clip's
    `output_tokens`); appended prompt tokens are left out of them. `prompts` (P, W) or (B, P, W)
    are appended after the positional embedding; `hook(i, x)` gives the input of block `i`.
    """
    visual = model.visual
    n_patches = visual.positional_embedding.shape[0] - 1
    x = run_blocks(visual.transformer, vision_embed(visual, images, prompts), hook)
    pooled, tokens = pool_vision(visual, x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, tokens[:, :n_patches]


def pool_vision(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, tokens) of the last block's output: open_clip's `VisionTransformer._pool`, or its
    inline form before open_clip 2.26 (`ln_post` before or after the global pool)."""
    if hasattr(visual, "_pool"):
        return visual._pool(x)
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("attentional pooling needs open_clip >= 2.26 for block-by-block towers")
    if getattr(visual, "final_ln_after_pool", False):
        pooled, tokens = visual._global_pool(x)
        return visual.ln_post(pooled), tokens
    return visual._global_pool(visual.ln_post(x))


def encode_image(model: nn.Module, images: torch.Tensor, prompts: torch.Tensor | None = None,
                 hook: Hook | None = None, normalize: bool = True) -> torch.Tensor:
    """Image features (B, D) through `vision_tokens` (L2-normalised unless `normalize=False`)."""
    pooled = vision_tokens(model, images, prompts, hook)[0]
    return F.normalize(pooled, dim=-1) if normalize else pooled


def text_forward(model: nn.Module, x: torch.Tensor, eot_index: torch.Tensor, hook: Hook | None = None,
                 normalize: bool = True) -> torch.Tensor:
    """Text features (N, D) of token embeddings `x` (N, L, W), `hook(i, x)` before block i: positions added,
    the tower's causal mask, pooled at `eot_index`, `ln_final`, projection (`fsbench.text.encode_token_embeddings`,
    the one text path)."""
    return encode_token_embeddings(model, x, eot_index, normalize, hook)


def encode_text(model: nn.Module, tokens: torch.Tensor, hook: Hook | None = None,
                normalize: bool = True) -> torch.Tensor:
    """Text features of a tokenised batch (N, L) through `text_forward` (no truncation)."""
    tower, pooling = text_tower(model), text_pooling(model)
    return text_forward(model, tower.token_embedding(tokens), pooling.index(tokens), hook, normalize)


def append_tokens(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`x` (B, L, W) with `tokens` (P, W) or (B, P, W) appended at the end of the sequence."""
    tokens = tokens.to(x.dtype)
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    return torch.cat([x, tokens.expand(x.shape[0], -1, -1)], dim=1)


def replace_tokens(x: torch.Tensor, start: int, tokens: torch.Tensor) -> torch.Tensor:
    """`x` (B, L, W) with positions start .. start + P replaced by `tokens` (P, W) or (B, P, W).

    A negative `start` counts from the end (-P replaces the last P tokens). Gradients flow to
    `tokens`, none to the replaced positions (MaPLe's deep prompts, clip/model.py:299-328).
    """
    tokens = tokens.to(x.dtype)
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    n = tokens.shape[1]
    start = start % x.shape[1]
    if start + n > x.shape[1]:
        raise ValueError(f"cannot replace {n} tokens from position {start} of a length-{x.shape[1]} sequence")
    return torch.cat([x[:, :start], tokens.expand(x.shape[0], -1, -1), x[:, start + n:]], dim=1)


def context_window(prompts: Prompts, n_ctx: int, init: torch.Tensor | None = None) -> Prompts:
    """The same class prompts with the first `n_ctx` positions after the begin token as the context.

    `build_prompts` makes every token of the initialisation words learnable; MaPLe learns the first
    2 of "a photo of a" and keeps "of a" fixed in every prompt (trainers/maple.py:84-131: the context is
    `embedding[0, 1:1 + n_ctx]`, the suffix `embedding[:, 1 + n_ctx:]` of "a photo of a <class>.").
    `init` (n_ctx, W) gives the initial context (default: the first `n_ctx` initial vectors); with
    more positions than the words have, the class tokens' first positions become context (PLOT++'s
    ImageNet template "this is a", plot-pp/trainers/plotpp.py:85-133).
    """
    seq = torch.cat([prompts.init.to(prompts.suffix.dtype).expand(prompts.num_classes, -1, -1), prompts.suffix], 1)
    if init is None:
        if n_ctx > prompts.n_ctx:
            raise ValueError(f"{n_ctx} context vectors but the initialisation has {prompts.n_ctx}; pass init")
        init = prompts.init[:n_ctx]
    if init.shape[0] != n_ctx or n_ctx >= seq.shape[1]:
        raise ValueError(f"cannot make {n_ctx} of {seq.shape[1]} prompt positions the context")
    return Prompts(prompts.prefix, seq[:, n_ctx:], prompts.eot, init, prompts.tokens)
