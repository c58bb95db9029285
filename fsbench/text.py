"""Text-side CLIP forward that skips the padding after the end-of-text token.

CLIP's text transformer is causal and the class feature is read at the end-of-text (EOT)
token, so positions after the longest prompt's EOT cannot change any feature. Truncating the
77-token sequence to that length gives identical features for a fraction of the compute
(proved in tests/test_text.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def truncate_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Cut a (N, 77) token batch after the last EOT position (EOT has the largest id)."""
    length = int(tokens.argmax(dim=-1).max().item()) + 1
    return tokens[:, :length]


def encode_token_embeddings(model: nn.Module, x: torch.Tensor, eot_index: torch.Tensor,
                            normalize: bool = True) -> torch.Tensor:
    """Run the text transformer on token embeddings `x` (N, L, D); read features at `eot_index`.

    This is the entry point for prompt-learning methods (CoOp), which build `x` themselves.
    Requires the causal `SplitAttention` of `fsbench.attention` (any L <= context length).
    """
    x = x + model.positional_embedding[: x.shape[1]].to(x.dtype)
    x = model.transformer(x)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_index]
    proj = model.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def encode_tokens(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """CLIP text features of tokenised prompts, computed on the truncated sequence."""
    tokens = truncate_tokens(tokens)
    x = model.token_embedding(tokens)
    return encode_token_embeddings(model, x, tokens.argmax(dim=-1), normalize)


def length_buckets(lengths: list[int], max_buckets: int) -> list[int]:
    """Upper bounds of at most `max_buckets` length groups with the fewest padded tokens.

    A dynamic programme over the distinct lengths (at most the context length, 77).
    """
    values = sorted(set(lengths))
    prefix = [0]
    for v in values:
        prefix.append(prefix[-1] + lengths.count(v))

    @functools.cache
    def best(j: int, k: int) -> tuple[int, tuple[int, ...]]:
        """(tokens, bounds) covering the `j` shortest distinct lengths with at most `k` groups."""
        if j == 0:
            return 0, ()
        if k == 1:
            return values[j - 1] * prefix[j], (values[j - 1],)
        options = []
        for i in range(j):  # the last group holds values[i:j]
            cost, bounds = best(i, k - 1)
            options.append((cost + values[j - 1] * (prefix[j] - prefix[i]), bounds + (values[j - 1],)))
        return min(options)

    return list(best(len(values), max(1, max_buckets))[1])


@dataclass
class TokenBuckets:
    """Prompts grouped by length, each group cut after its own longest prompt."""

    groups: list[torch.Tensor]  # (N_g, L_g) token rows per group
    inverse: torch.Tensor  # row i of the input is row inverse[i] of the concatenated groups

    @property
    def tokens(self) -> int:
        """Token positions the text tower computes (the padded cost of one pass)."""
        return sum(g.numel() for g in self.groups)


def bucket_tokens(tokens: torch.Tensor, max_buckets: int = 4) -> TokenBuckets:
    """Group a (N, 77) token batch into at most `max_buckets` length groups (`length_buckets`).

    For ImageNet's 1,000 prompts "a photo of a {}." the text tower then runs 9,536 token
    positions instead of 18,000 (truncated to the longest) or 77,000 (full), with the same
    features: every prompt still sees all of its own tokens and none after its EOT.
    """
    lengths = tokens.argmax(dim=-1) + 1
    groups, rows, lower = [], [], 0
    for bound in length_buckets(lengths.tolist(), max_buckets):
        idx = torch.nonzero((lengths > lower) & (lengths <= bound)).squeeze(1)
        groups.append(tokens[idx, :bound])
        rows.append(idx)
        lower = bound
    order = torch.cat(rows)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return TokenBuckets(groups, inverse)


def encode_buckets(model: nn.Module, buckets: TokenBuckets, normalize: bool = True) -> torch.Tensor:
    """CLIP text features of bucketed prompts, in the original row order (no host sync)."""
    parts = [encode_token_embeddings(model, model.token_embedding(g), g.argmax(dim=-1), normalize)
             for g in buckets.groups]
    return torch.cat(parts)[buckets.inverse]
