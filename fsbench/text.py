"""Text-side CLIP forward that skips the padding after the pooled token, where that is exact.

A text tower reads its class feature at one position (open_clip's `text_global_pool`). When the
tower is causal and that position is the end-of-text token (`argmax` pooling: OpenAI CLIP,
MetaCLIP, DFN, EVA-CLIP; `eos` pooling: MetaCLIP 2), positions after the longest prompt's EOT
cannot change any feature, so the 77-token sequence is cut there: identical features for a
fraction of the compute (proved in tests/test_text.py and tests/test_backbone_families.py).
Bidirectional towers that pool the last position (SigLIP, SigLIP 2) see every padding token:
they always run the full, fixed-length sequence (`TextPooling.truncatable` is False).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def text_tower(model: nn.Module) -> nn.Module | None:
    """The module holding the text tower's `token_embedding`, `transformer`, `ln_final`, ...

    open_clip's `CLIP` keeps them on the model itself; `CustomTextCLIP` (SigLIP, EVA-CLIP) on
    `model.text`, which is a Hugging Face model wrapper for towers such as XLM-RoBERTa.
    """
    return model if hasattr(model, "token_embedding") else getattr(model, "text", None)


@dataclass(frozen=True)
class TextPooling:
    """Where a text tower reads its class feature, and whether it may skip trailing tokens."""

    pool: str  # open_clip pool_type: argmax | eos | last | first; "hf" for a Hugging Face tower
    causal: bool  # causal attention mask
    eos_id: int | None = None  # the token `eos` pooling looks for
    class_token: bool = False  # CoCa's appended class token (attends to every position)

    @property
    def embeds(self) -> bool:
        """True for open_clip's own text transformer (token embeddings fsbench can feed)."""
        return self.pool in ("argmax", "eos", "last", "first")

    @property
    def truncatable(self) -> bool:
        """Cutting after the pooled position is exact: causal, pooled at a token that is kept."""
        return self.causal and not self.class_token and self.pool in ("argmax", "eos")

    def index(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position read for each row of a (N, L) token batch."""
        if self.pool == "argmax":  # open_clip: the end-of-text token has the largest id
            return tokens.argmax(dim=-1)
        if self.pool == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        last = tokens.shape[-1] - 1 if self.pool == "last" else 0
        return torch.full(tokens.shape[:1], last, dtype=torch.long, device=tokens.device)

    def select(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, D) of hidden states `x` (N, L, D), as open_clip's `text_global_pool`."""
        if self.pool == "last":
            return x[:, -1]
        if self.pool == "first":
            return x[:, 0]
        if self.pool not in ("argmax", "eos"):
            raise ValueError(f"text pooling {self.pool!r} is not supported by fsbench's text path")
        return x[torch.arange(x.shape[0], device=x.device), index]


def text_pooling(model: nn.Module) -> TextPooling:
    """How `model`'s text tower pools (open_clip `CLIP`, `CustomTextCLIP` or a Hugging Face tower)."""
    tower = text_tower(model)
    if tower is None or not hasattr(tower, "token_embedding"):
        return TextPooling("hf", causal=False)
    pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
    eos = getattr(tower, "text_eos_id", None) if tower is model else getattr(tower, "eos_id", None)
    return TextPooling(pool, getattr(tower, "attn_mask", None) is not None, eos,
                       getattr(tower, "cls_emb", None) is not None)


@dataclass(frozen=True)
class PromptLayout:
    """Where a tokenizer puts a prompt's words: after `bos` begin tokens, up to the end token.

    OpenAI's BPE writes `[SOS] words [EOT] 0...` (bos 1), XLM-V `<s> words </s> <pad>...` (bos 1),
    SigLIP's T5 and Gemma tokenizers `words </s> <pad>...` (bos 0). Prompt learners (CoOp) put their
    context vectors right after the begin tokens.
    """

    bos: int
    eos_id: int

    def words(self, row: torch.Tensor) -> int:
        """Number of word tokens in one tokenised prompt (N,)."""
        ends = torch.nonzero(row[self.bos:] == self.eos_id)
        return int(ends[0, 0]) if len(ends) else row.shape[0] - self.bos


def prompt_layout(tokenize: Callable[[list[str]], torch.Tensor]) -> PromptLayout:
    """Read the layout off the tokenizer: a shared first token of "a" and "b" is a begin token."""
    a, b = tokenize(["a", "b"])
    bos = int(a[0] == b[0])
    return PromptLayout(bos, int(tokenize([""])[0, bos]))


def truncate_tokens(tokens: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
    """Cut a (N, L) token batch after the last pooled position where that is exact for `model`.

    Without `model` the batch is taken to be OpenAI-CLIP tokens (EOT has the largest id) for a
    causal tower, as before. With `model`, a tower that is not `truncatable` gets the batch whole.
    """
    pooling = TextPooling("argmax", causal=True) if model is None else text_pooling(model)
    if not pooling.truncatable:
        return tokens
    length = int(pooling.index(tokens).max().item()) + 1
    return tokens[:, :length]


Hook = Callable[[int, torch.Tensor], torch.Tensor]


def run_blocks(transformer: nn.Module, x: torch.Tensor, hook: Hook | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run a batch-first (N, L, W) sequence through the blocks; `hook(i, x)` before block i (deep
    prompts insert or replace tokens there). Without a hook: the transformer's own forward.

    (fsbench's `SplitAttention` requires batch-first towers, open_clip's layout since 2.24.)
    """
    if hook is None:
        return transformer(x, attn_mask=attn_mask)
    for i, block in enumerate(transformer.resblocks):
        x = block(hook(i, x), attn_mask=attn_mask)
    return x


def encode_token_embeddings(model: nn.Module, x: torch.Tensor, eot_index: torch.Tensor,
                            normalize: bool = True, hook: Hook | None = None) -> torch.Tensor:
    """Run the text transformer on token embeddings `x` (N, L, D); pool as the tower does.

    The one text path of prompt methods (CoOp family, MaPLe, PLOT++: `fsbench.towers.text_forward`
    is this function), which build `x` themselves; `hook(i, x)` runs before block i.
    `eot_index` is the position argmax/eos pooling reads (ignored by `last`/`first` pooling).
    Causal towers need the causal `SplitAttention` of `fsbench.attention` (any L <= context
    length); bidirectional ones must be given the full context length.
    """
    tower, pooling = text_tower(model), text_pooling(model)
    n = x.shape[1]
    x = x + tower.positional_embedding[:n].to(x.dtype)
    mask = tower.attn_mask[:n, :n] if pooling.causal else None
    x = run_blocks(tower.transformer, x, hook, mask)
    x = pooling.select(tower.ln_final(x), eot_index)
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def encode_tokens(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Text features of tokenised prompts, on the truncated sequence where that is exact."""
    pooling = text_pooling(model)
    if not pooling.embeds:  # a Hugging Face tower: its own forward
        return model.encode_text(tokens, normalize=normalize)
    tokens = truncate_tokens(tokens, model)
    x = text_tower(model).token_embedding(tokens)
    return encode_token_embeddings(model, x, pooling.index(tokens), normalize)


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


def bucket_tokens(tokens: torch.Tensor, max_buckets: int = 4, model: nn.Module | None = None) -> TokenBuckets:
    """Group a (N, 77) token batch into at most `max_buckets` length groups (`length_buckets`).

    For ImageNet's 1,000 prompts "a photo of a {}." the text tower then runs 9,536 token
    positions instead of 18,000 (truncated to the longest) or 77,000 (full), with the same
    features: every prompt still sees all of its own tokens and none after its EOT. With
    `model` given, a tower that cannot be truncated exactly (SigLIP) gets one full-length group.
    """
    pooling = TextPooling("argmax", causal=True) if model is None else text_pooling(model)
    if not pooling.truncatable:
        return TokenBuckets([tokens], torch.arange(len(tokens), device=tokens.device))
    lengths = pooling.index(tokens) + 1
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
    """Text features of bucketed prompts, in the original row order (no host sync)."""
    tower, pooling = text_tower(model), text_pooling(model)
    parts = [encode_token_embeddings(model, tower.token_embedding(g), pooling.index(g), normalize)
             for g in buckets.groups]
    return torch.cat(parts)[buckets.inverse]
