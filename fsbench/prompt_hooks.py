"""Tower hooks that put learned tokens into the blocks of a CLIP tower (`fsbench.towers` runs the towers
block by block and calls `hook(i, x)` before block i).

- `deep_prompts_hook(deep, start)`: before blocks 1 .. len(deep), the P tokens from `start` become that
  block's learned prompt `deep[i - 1]` (P, W): the deep prompts of independent vision-language prompting
  (PromptSRC, Khattak et al. ICCV 2023, github.com/muzairkhattak/PromptSRC bb95c77 clip/model.py:229-252:
  text prompts after SOS, vision prompts the last P tokens). MaPLe's coupled deep prompts are the same
  replacement (methods/maple.py).
- `block_tokens_hook(block, tokens, start, weight)`: before one block, a blend `weight * tokens + (1 - weight)
  * x` at positions start .. start + P, with per-sequence tokens (N, P, W) (TCP's class-aware tokens, Yao et
  al. CVPR 2024, github.com/htyao89/Textual-based_Class-aware_prompt_tuning bd97bec
  trainers/clip_text/model.py:262-278).

Gradients flow to the inserted tokens, none to the replaced positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fsbench.text import Hook
from fsbench.towers import replace_tokens


def deep_prompts_hook(deep: Sequence[torch.Tensor] | torch.Tensor, start: int) -> Hook:
    """Before block i in 1 .. len(deep), positions start .. start + P are replaced by `deep[i - 1]` (P, W);
    a negative `start` counts from the end (-P: the last P tokens)."""
    def hook(i: int, x: torch.Tensor) -> torch.Tensor:
        return replace_tokens(x, start, deep[i - 1]) if 0 < i <= len(deep) else x
    return hook


def block_tokens_hook(block: int, tokens: torch.Tensor, start: int, weight: float = 1.0) -> Hook:
    """Before block `block`, positions start .. start + P become `weight * tokens + (1 - weight) * x` there;
    `tokens` (P, W) or one set per sequence (N, P, W)."""
    def hook(i: int, x: torch.Tensor) -> torch.Tensor:
        if i != block:
            return x
        if weight == 1.0:
            return replace_tokens(x, start, tokens)
        old = x[:, start:start + tokens.shape[-2]]
        return replace_tokens(x, start, weight * tokens.to(x.dtype) + (1.0 - weight) * old)
    return hook
