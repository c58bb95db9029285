"""A reference-style CLIP-LoRA training step, written the way the official code does it.

Mirrors github.com/MaxZanella/CLIP-LoRA (`loralib/layers.py`: `LinearLoRA`,
`PlainMultiheadAttentionLoRA`; `lora.py`: the training loop), applied to open_clip's CLIP:

- the LoRA update as `dropout(x) @ (B A)^T * scaling`: the d x d product is formed every call;
- q/k/v/out as separate linears around sequence-first attention, the text tower's dense
  77 x 77 causal mask passed to `scaled_dot_product_attention` as an additive mask;
- the prompts re-tokenised every step and the full 77-token sequence run through
  `model.encode_text`;
- fp16 autocast + GradScaler on CUDA, fp32 on CPU;
- every step's images read from disk and augmented on the CPU with torchvision's PIL
  transforms by a DataLoader, one image at a time (`reference_batches`).

`text_chunk` (timing only): run the text side in class chunks, each with its own softmax over
its classes. Every prompt and image still goes forward and backward exactly once, so the step
does the same work in a fraction of the memory; the official 1,000-class graph (about 60 GB in
fp32) does not fit a 24 GiB CPU host. Losses with chunks are not the official loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.backbones import BackboneSpec, resolve_factory
from fsbench.data.base import Item
from fsbench.images import image_loader
from fsbench.methods.lora import LoRAConfig
from fsbench.tuners import LoRALinear, layer_indices, towers

PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}


class ReferenceLoRALinear(nn.Linear):
    """Official `LinearLoRA`: frozen W plus `x @ (B A)^T * alpha / sqrt(r)`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, device=base.weight.device, dtype=base.weight.dtype)
        self.load_state_dict(base.state_dict())
        self.requires_grad_(False)
        self.w_lora_A = nn.Parameter(self.weight.new_zeros(rank, base.in_features))
        self.w_lora_B = nn.Parameter(self.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.w_lora_A, a=math.sqrt(5))
        self.scaling = alpha / math.sqrt(rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False

    def train(self, mode: bool = True) -> ReferenceLoRALinear:
        """Official `lora_train`: eval mode adds the update to W, train mode takes it out."""
        super().train(mode)
        if mode == self.merged:
            with torch.no_grad():
                delta = (self.w_lora_B @ self.w_lora_A) * self.scaling
                self.weight.add_(-delta if self.merged else delta)
            self.merged = not mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if self.dropout is None:  # official: merge W + scaling * B A, one linear
            return F.linear(x, self.weight + (self.w_lora_B @ self.w_lora_A) * self.scaling, self.bias)
        out = F.linear(x, self.weight, self.bias)
        if self.training:
            x = self.dropout(x)
        return out + torch.matmul(x, (self.w_lora_B @ self.w_lora_A).transpose(0, 1)) * self.scaling


class ReferenceAttention(nn.Module):
    """Official `PlainMultiheadAttentionLoRA` for open_clip's batch-first self-attention."""

    def __init__(self, mha: nn.MultiheadAttention, cfg: LoRAConfig):
        super().__init__()
        d, self.num_heads = mha.embed_dim, mha.num_heads
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
        for i, name in enumerate(("q_proj", "k_proj", "v_proj", "proj")):
            lin = nn.Linear(d, d, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                src_w, src_b = (w[i * d:(i + 1) * d], b[i * d:(i + 1) * d]) if i < 3 else \
                    (mha.out_proj.weight, mha.out_proj.bias)
                lin.weight.copy_(src_w)
                lin.bias.copy_(src_b)
            lin.requires_grad_(False)
            setattr(self, name, lin)
        for m in cfg.matrices:
            name = PROJECTIONS[m]
            setattr(self, name, ReferenceLoRALinear(getattr(self, name), cfg.rank, cfg.alpha, cfg.dropout))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        x = query.transpose(1, 0)  # batch-first -> (L, N, D), as the official code
        tgt_len, bsz, d = x.shape
        h = self.num_heads
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if attn_mask is not None:  # (L, L) -> (1, 1, L, L) additive float mask
            attn_mask = attn_mask.to(q.dtype).unsqueeze(0).unsqueeze(0)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(tgt_len, bsz * h, d // h).transpose(0, 1).view(bsz, h, tgt_len, d // h)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask, 0.0, False)
        out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, d)
        out = self.proj(out).view(tgt_len, bsz, d)
        return out.transpose(1, 0), None


def reference_model(spec: BackboneSpec, cfg: LoRAConfig, device: torch.device) -> nn.Module:
    """open_clip's CLIP (fused attention, same seeded weights as `build_backbone`) with official LoRA."""
    model = resolve_factory(spec.name)(spec)
    model.requires_grad_(False)
    for tower in towers(model, cfg.encoder):
        blocks = list(tower.resblocks)
        for i in layer_indices(cfg.position, len(blocks)):
            blocks[i].attn = ReferenceAttention(blocks[i].attn, cfg)
    return model.to(device).train()  # LoRA unmerged, as after `apply_lora`


def reference_lora_layers(model: nn.Module) -> list[ReferenceLoRALinear]:
    """LoRA layers in `inject_lora`'s order (vision then text tower, block, q/k/v/o)."""
    return [m for m in model.modules() if isinstance(m, ReferenceLoRALinear)]


@torch.no_grad()
def copy_lora(src: Sequence[LoRALinear], dst: Sequence[ReferenceLoRALinear]) -> None:
    """Give the reference layers the A and B of fsbench's layers (same order)."""
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} fsbench LoRA layers vs {len(dst)} reference layers")
    for s, d in zip(src, dst, strict=True):
        if d.merged:
            raise ValueError("copy LoRA weights into a model in train mode (its update unmerged)")
        d.w_lora_A.copy_(s.lora_A)
        d.w_lora_B.copy_(s.lora_B)


def reference_loss(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                   logit_scale: float = 100.0, text_chunk: int = 0,
                   scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss) -> torch.Tensor:
    """Forward and backward (of `scale(loss)`) of one official step; returns the loss.

    fp16 autocast on CUDA. With `text_chunk`, see the module docstring: same work, chunk-wise
    softmax.
    """
    amp = images.device.type == "cuda"
    with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
        img = model.encode_image(images)
    img = img / img.norm(dim=-1, keepdim=True)
    chunks = tokens.split(text_chunk) if text_chunk else [tokens]
    leaf = img.detach().requires_grad_() if text_chunk else img
    total = torch.zeros((), device=images.device)
    for chunk in chunks:
        with torch.autocast(images.device.type, dtype=torch.float16, enabled=amp):
            text = model.encode_text(chunk)
        text = text / text.norm(dim=-1, keepdim=True)
        target = labels % len(chunk) if text_chunk else labels
        loss = F.cross_entropy((logit_scale * leaf @ text.t()).float(), target) * (len(chunk) / len(tokens))
        scale(loss).backward()
        total += loss.detach()
    if text_chunk:
        img.backward(leaf.grad)
    return total


class ReferenceTrainer:
    """The official training loop's step: AdamW, cosine schedule, GradScaler (fp16 on CUDA)."""

    def __init__(self, model: nn.Module, cfg: LoRAConfig, prompts: list[str], tokenizer: Callable,
                 total_steps: int, text_chunk: int = 0):
        self.model, self.prompts, self.tokenizer = model, prompts, tokenizer
        self.text_chunk = text_chunk
        params = [p for layer in reference_lora_layers(model) for p in (layer.w_lora_A, layer.w_lora_B)]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, total_steps, eta_min=cfg.eta_min)
        device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(enabled=device.type == "cuda")
        self.device = device
        model.train()

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """One step on a loader's batch: tokenize, forward, backward, update; returns the loss."""
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        tokens = self.tokenizer(self.prompts).to(self.device)  # official: clip.tokenize every step
        self.opt.zero_grad()
        loss = reference_loss(self.model, images, tokens, labels, text_chunk=self.text_chunk,
                              scale=self.scaler.scale)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.item()


def reference_batches(items: Sequence[Item], root: Path, transform: Callable, batch_size: int,
                      device: torch.device, workers: int,
                      generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Official data path: a shuffling DataLoader that reads, decodes and augments every image of
    every batch on the CPU (in `workers` processes; the official code uses 8), endlessly."""
    loader = image_loader(items, root, transform, batch_size, device, shuffle=True, generator=generator,
                          workers=workers, drop_last=len(items) >= batch_size)
    while True:
        yield from loader
