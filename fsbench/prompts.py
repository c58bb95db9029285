"""Learnable text prompts for the CoOp family (CoOp, CoCoOp, KgCoOp, ProGrad; MaPLe and PLOT++ build on
them): context vectors in front of each class name, "[SOS] [V1] ... [Vn] [CLASS]. [EOS]".

Follows CoOp's PromptLearner (github.com/KaiyangZhou/CoOp: trainers/coop.py:60-190): the context is
initialised from N(0, 0.02) or from the embeddings of initialisation words ("a photo of a": then the
number of context vectors is their token count), class-token position "end", context shared by all
classes (unified). The class prompts are tokenised once; only the context is spliced in per step:

    prompts = build_prompts(backbone, classnames, n_ctx=16, init="random", device=dev, generator=gen)
    context = nn.Parameter(prompts.init.clone())
    text = encode_prompts(backbone.model, prompts, context)   # (C, D), L2-normalised, differentiable
    embeds = assemble_prompts(prompts, context)               # (C, L, W) token embeddings, for custom towers

Deviations from CoOp: the number of context vectors from initialisation words is their token count
(CoOp counts words, the same for "a photo of a"); the "middle" / "front" class positions and
class-specific contexts are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.backbones import Backbone
from fsbench.text import encode_token_embeddings, text_pooling, text_tower, truncate_tokens

RANDOM = "random"  # the `init` value for N(0, 0.02) context vectors
INIT_STD = 0.02  # CoOp trainers/coop.py:85 nn.init.normal_(ctx_vectors, std=0.02)


@dataclass
class Prompts:
    """Frozen pieces of the class prompts around the context: [SOS] | context | [CLASS].[EOS]..."""

    prefix: torch.Tensor  # (C, bos, W): the begin-token embeddings (SOS; none for SigLIP)
    suffix: torch.Tensor  # (C, L - 1 - n_ctx, W): class tokens, ".", EOT (and padding)
    eot: torch.Tensor  # (C,): EOT position per class (the pooled token)
    init: torch.Tensor  # (n_ctx, W): initial context vectors
    tokens: torch.Tensor | None = None  # (C, L): the token ids (placeholders at the context slots)

    @property
    def n_ctx(self) -> int:
        return self.init.shape[0]

    @property
    def num_classes(self) -> int:
        return self.prefix.shape[0]


def init_words(init: str) -> str | None:
    """The initialisation words of `init` ("a_photo_of_a" -> "a photo of a"), None for random."""
    return None if init == RANDOM else init.replace("_", " ")


@torch.no_grad()
def build_prompts(backbone: Backbone, classnames: list[str], n_ctx: int, init: str,
                  device: torch.device, generator: torch.Generator, *, pad_words: bool = False,
                  end: str = ".") -> Prompts:
    """Tokenise "<context placeholders> <class>." per class and split the embeddings around the context.

    `init` is "random" (`n_ctx` vectors from N(0, 0.02) drawn with `generator`) or initialisation words
    (their embeddings; `n_ctx` is then their token count and the argument is ignored, as CoOp). With
    `pad_words`, `n_ctx` is kept: zero vectors, then the words' embeddings in the last slots (ProGrad,
    github.com/BeierZhu/Prompt-align ProGrad.public/trainers/prograd.py:78-95); a `ValueError` if the words
    need more than `n_ctx` tokens. `end` follows the class name ("." as CoOp; "" for GalLoP's
    "[SOS] <context> <class> [EOT]", github.com/MarcLafon/gallop f75999e gallop/vlprompt/gallop.py:222-229).
    """
    embed = text_tower(backbone.model).token_embedding  # CustomTextCLIP (SigLIP, EVA) keeps it on model.text
    bos = backbone.prompt_layout.bos  # begin tokens before the context: 1 (OpenAI BPE), 0 (SigLIP)
    words = init_words(init)
    width = embed.weight.shape[1]
    if words is None:
        ctx0 = torch.randn(n_ctx, width, generator=generator) * INIT_STD
        placeholder = " ".join(["X"] * n_ctx)
    else:
        ids = backbone.tokenize([words]).to(device)
        n_words = backbone.prompt_layout.words(ids[0])
        ctx0 = embed(ids)[0, bos:bos + n_words].float().cpu()
        placeholder = words
        if pad_words and n_ctx < n_words:
            raise ValueError(f"n_ctx = {n_ctx} is fewer than the {n_words} tokens of the init words {words!r}")
        if pad_words and n_ctx > n_words:
            ctx0 = torch.cat([torch.zeros(n_ctx - n_words, width), ctx0])
            placeholder = " ".join(["X"] * (n_ctx - n_words) + [words])
        n_ctx = ctx0.shape[0]
    texts = [f"{placeholder} {name.replace('_', ' ')}{end}" for name in classnames]
    tokens = truncate_tokens(backbone.tokenize(texts), backbone.model).to(device)
    emb = embed(tokens)
    eot = text_pooling(backbone.model).index(tokens)
    return Prompts(emb[:, :bos], emb[:, bos + n_ctx:], eot, ctx0.to(device), tokens)


def assemble_prompts(prompts: Prompts, context: torch.Tensor) -> torch.Tensor:
    """Token embeddings of the class prompts with `context` spliced in.

    `context` (n_ctx, W) gives (C, L, W); a batch of contexts (B, n_ctx, W) (e.g. CoCoOp's per-image
    contexts) gives (B, C, L, W).
    """
    lead, n_cls = context.shape[:-2], prompts.num_classes
    ctx = context.reshape(-1, 1, *context.shape[-2:]).expand(-1, n_cls, -1, -1)  # (B, C, n_ctx, W)
    b = ctx.shape[0]
    x = torch.cat([prompts.prefix.expand(b, -1, -1, -1), ctx.to(prompts.prefix.dtype),
                   prompts.suffix.expand(b, -1, -1, -1)], dim=2)
    return x.view(*lead, *x.shape[1:])


def encode_prompts(model: nn.Module, prompts: Prompts, context: torch.Tensor) -> torch.Tensor:
    """L2-normalised text features of the class prompts through the frozen text tower: context
    (n_ctx, W) gives (C, D); a batch of contexts (B, n_ctx, W) gives (B, C, D) from one call."""
    lead = context.shape[:-2]
    x = assemble_prompts(prompts, context)
    x = x.reshape(-1, *x.shape[-2:])
    eot = prompts.eot.repeat(x.shape[0] // prompts.num_classes)
    feats = encode_token_embeddings(model, x, eot)
    return feats.view(*lead, prompts.num_classes, feats.shape[-1])


@torch.no_grad()
def frozen_image_features(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """(N, D) L2-normalised features of preprocessed images through the frozen image tower, float32
    (what the prompt methods score against, and what the feature cache holds)."""
    return F.normalize(backbone.model.encode_image(images).float(), dim=-1)


class LearnedModule:
    """What prompt methods that keep everything they learn in one module, `self.learner`, share (MaPLe,
    PromptSRC, TCP): freezing it and caching the class text features after training (`_finish`, which calls
    the method's `text_features`), its parameter count, and saving / reloading it (`--save-adapter`; reloading
    calls the method's `_build`). Mixed in before `Method`: `class MaPLe(LearnedModule, Method)`."""

    learner: torch.nn.Module

    def _finish(self) -> None:
        self.learner.requires_grad_(False)
        with torch.no_grad(), self.ctx.autocast():
            self.text = self.text_features()

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.learner.parameters())

    def inference_overhead(self) -> int:
        return self.trainable_params()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.learner.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        self.learner.load_state_dict(tensors)
        self._finish()
