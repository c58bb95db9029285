"""Unfused attention for open_clip: separate q/k/v/out projections and fused SDPA kernels.

open_clip 3.x uses `nn.MultiheadAttention`, whose q, k and v live in one `in_proj_weight`.
Adapters (LoRA, peft) need each projection as its own `nn.Linear`, so `split_attention`
swaps every such module for `SplitAttention`, which computes the same function with
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Self-attention with `q_proj`, `k_proj`, `v_proj`, `out_proj` as separate linears.

    Drop-in for open_clip's batch-first `nn.MultiheadAttention` call
    `attn(x, x, x, need_weights=False, attn_mask=mask)[0]`. With `causal=True` (the text
    tower) the given mask is ignored and the causal kernel is used, which also allows
    sequences shorter than the model's context length.
    """

    def __init__(self, embed_dim: int, num_heads: int, causal: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, causal: bool) -> SplitAttention:
        """Copy the weights of a fused `nn.MultiheadAttention` (no copy of data is shared)."""
        if not mha.batch_first or not mha._qkv_same_embed_dim:
            raise ValueError("only batch-first self-attention with equal q/k/v dims is supported")
        d = mha.embed_dim
        new = cls(d, mha.num_heads, causal).to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        b = b.detach() if b is not None else torch.zeros(3 * d, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(w[i * d:(i + 1) * d])
                proj.bias.copy_(b[i * d:(i + 1) * d])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if key is not None and key is not query or value is not None and value is not query:
            raise ValueError("SplitAttention is self-attention only")
        b, n, d = query.shape
        h = self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(query)), heads(self.v_proj(query))
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = attn_mask[..., :n, :n].to(q.dtype) if attn_mask is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out), None


def split_attention(model: nn.Module) -> int:
    """Replace every `nn.MultiheadAttention` in an open_clip CLIP by `SplitAttention`.

    The text tower (`model.transformer`) is causal; the vision tower is not. Returns the
    number of modules replaced.
    """
    count = 0
    towers = [(model.visual, False)]
    if hasattr(model, "transformer"):
        causal = getattr(model, "attn_mask", None) is not None
        towers.append((model.transformer, causal))
    for tower, causal in towers:
        for parent in list(tower.modules()):
            attn = getattr(parent, "attn", None)
            if isinstance(attn, nn.MultiheadAttention):
                parent.attn = SplitAttention.from_mha(attn, causal)
                count += 1
    return count
