"""Unfused attention: every q, k and v projection of a CLIP as its own `nn.Linear`.

Adapters (LoRA, peft) need each projection as a module of its own. The families fuse them in
three ways, and `split_attention` undoes each, computing the same function:

- open_clip's `nn.MultiheadAttention` (OpenAI CLIP, MetaCLIP, DFN, the text tower of every
  open_clip text transformer) keeps q/k/v in one `in_proj_weight`: it becomes `SplitAttention`,
  `q_proj`, `k_proj`, `v_proj`, `out_proj` on fused scaled-dot-product attention
  (flash / memory-efficient kernels on GPU).
- timm's `Attention` / `AttentionRope` (SigLIP, SigLIP 2, PE vision towers) call one fused
  `qkv` Linear: it becomes `QKVLinear`, three Linears whose outputs are concatenated, so the
  timm module is untouched and `qkv.q_proj` etc. are targets (peft's target-module view of a
  fused projection: one adapter per slice).
- timm's `EvaAttention` (EVA-CLIP) with a fused `qkv` and separate `q_bias`/`v_bias` is switched to
  its own unfused form (`q_proj`, `k_proj`, `v_proj`); EVA02-B/L already are.

`attention_layers` lists the resulting attention modules of a tower in depth order and
`projections` names their q/k/v/out Linears, which is all LoRA needs. `fused_state_dict` is the
inverse, for exporting adapted weights in the library's own format.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

OUT_NAMES = ("out_proj", "proj")  # the output projection: open_clip / timm
QKV = ("q_proj", "k_proj", "v_proj")


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
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(attn_mask, b, h, n, q.dtype))
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out), None


def _sdpa_mask(mask: torch.Tensor | None, b: int, h: int, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """An `nn.MultiheadAttention` mask, (L, L) or (B*H, L, L) and bool or additive, for SDPA."""
    if mask is None:
        return None
    mask = mask[..., :n, :n]
    if mask.dim() == 3:
        mask = mask.reshape(b, h, n, n)
    if mask.dtype == torch.bool:  # MHA: True = masked out; SDPA: True = attend
        return ~mask
    return mask.to(dtype)


class QKVLinear(nn.Module):
    """A fused `qkv` Linear as three Linears `q_proj`, `k_proj`, `v_proj` (outputs concatenated).

    Computes `torch.cat([q(x), k(x), v(x)], -1)`, what the fused Linear computed. While the
    three are plain Linears it runs one matmul on the concatenated weights (as fast as the
    fused layer); once an adapter wraps one of them, each runs on its own.
    """

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q, k, v

    @classmethod
    def from_linear(cls, fused: nn.Linear, biases: tuple[torch.Tensor | None, ...] | None = None) -> QKVLinear:
        """Split `fused` (out = 3 x d); `biases` replaces its bias per slice (EVA's q_bias, k, v_bias)."""
        d, like = fused.out_features // 3, {"device": fused.weight.device, "dtype": fused.weight.dtype}
        if biases is None:
            biases = tuple(None if fused.bias is None else fused.bias[i * d:(i + 1) * d] for i in range(3))
        parts = []
        for i, bias in enumerate(biases):
            part = nn.Linear(fused.in_features, d, bias=bias is not None, **like)
            with torch.no_grad():
                part.weight.copy_(fused.weight[i * d:(i + 1) * d])
                if bias is not None:
                    part.bias.copy_(bias)
            parts.append(part)
        return cls(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = (self.q_proj, self.k_proj, self.v_proj)
        if all(type(p) is nn.Linear for p in parts):
            biases = [p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in parts]
            has_bias = any(p.bias is not None for p in parts)
            return F.linear(x, torch.cat([p.weight for p in parts]), torch.cat(biases) if has_bias else None)
        return torch.cat([p(x) for p in parts], dim=-1)


def split_attention(model: nn.Module) -> int:
    """Unfuse every attention projection of an open_clip model (see the module docstring).

    The text tower's attention is causal when the tower has a causal mask (and no appended
    class token, whose mask also hides padding). Returns the number of attention modules changed.
    """
    from fsbench.text import text_pooling, text_tower  # text imports nothing from here

    count = _split_tree(model.visual, causal=False)
    tower = text_tower(model)
    if tower is not None and hasattr(tower, "transformer"):
        count += _split_tree(tower.transformer, causal=text_pooling(model).causal)
    return count


def _split_tree(root: nn.Module, causal: bool) -> int:
    count = 0
    for parent in list(root.modules()):
        attn = getattr(parent, "attn", None)
        if isinstance(attn, nn.MultiheadAttention) and _is_self_attention_block(parent):
            parent.attn = SplitAttention.from_mha(attn, causal)
            count += 1
        count += _split_timm(parent)
    return count


def _is_self_attention_block(block: nn.Module) -> bool:
    """open_clip's residual blocks call `attn(x, x, x)`; attentional poolers attend across inputs."""
    return hasattr(block, "ln_1") and not hasattr(block, "ln_1_kv")


def _split_timm(attn: nn.Module) -> int:
    """Unfuse a timm attention's `qkv` Linear in place; 1 if it had one."""
    qkv = getattr(attn, "qkv", None)
    if type(qkv) is not nn.Linear or qkv.out_features % 3:
        return 0
    if getattr(attn, "q_bias", None) is not None:  # timm EvaAttention: F.linear(x, qkv.weight, q|k|v bias)
        parts = QKVLinear.from_linear(qkv, (attn.q_bias.detach(), None, attn.v_bias.detach()))
        attn.qkv, attn.q_bias, attn.k_bias, attn.v_bias = None, None, None, None
        attn.q_proj, attn.k_proj, attn.v_proj = parts.q_proj, parts.k_proj, parts.v_proj
        attn.fsbench_fused_qkv = "eva"  # for fused_state_dict
        return 1
    if hasattr(attn, "q_bias"):  # EvaAttention without bias: its `qkv` is called as a module
        attn.q_bias = attn.k_bias = attn.v_bias = None
    attn.qkv = QKVLinear.from_linear(qkv)
    return 1


def projections(attn: nn.Module) -> dict[str, tuple[nn.Module, str]] | None:
    """(owner, attribute) of the q, k, v and out ("o") projections of an unfused attention module.

    None when `attn` is not an attention module with all four.
    """
    owner = attn.qkv if isinstance(getattr(attn, "qkv", None), QKVLinear) else attn
    if not all(isinstance(getattr(owner, name, None), nn.Module) for name in QKV):
        return None
    out = next((name for name in OUT_NAMES if isinstance(getattr(attn, name, None), nn.Module)), None)
    if out is None or isinstance(attn, QKVLinear):
        return None
    return {"q": (owner, "q_proj"), "k": (owner, "k_proj"), "v": (owner, "v_proj"), "o": (attn, out)}


def attention_layers(root: nn.Module | None) -> list[nn.Module]:
    """The attention modules under `root` (after `split_attention`), in depth order.

    Attention poolers (SigLIP's MAP head, CoCa's pooler) have no q/k/v triple and are left out.
    """
    if root is None:
        return []
    return [m for m in root.modules() if projections(m) is not None]


Effective = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]


def _plain(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.weight, linear.bias


@torch.no_grad()
def fused_state_dict(model: nn.Module, effective: Effective = _plain) -> dict[str, torch.Tensor]:
    """`model`'s weights in the layout open_clip and timm load: every unfused projection fused back.

    `effective(linear)` gives the (weight, bias) a projection applies (LoRA passes one that adds its
    update), so the result loads into a plain open_clip model (`--checkpoint`).
    """
    state, done = dict(model.state_dict()), ()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if done and prefix.startswith(done):
            continue  # inside a module already written
        if isinstance(m, (SplitAttention, QKVLinear)) or getattr(m, "fsbench_fused_qkv", None) == "eva":
            _fuse(state, prefix, m, effective)
            done += (prefix,)
        elif isinstance(getattr(m, "base_layer", None), nn.Linear):  # an adapter on another Linear (timm `proj`)
            _drop(state, prefix)
            state[f"{prefix}weight"], bias = effective(m)
            if bias is not None:
                state[f"{prefix}bias"] = bias
            done += (prefix,)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _fuse(state: dict[str, torch.Tensor], prefix: str, m: nn.Module, effective: Effective) -> None:
    """Write `m`'s unfused projections back in their library's fused layout."""
    (wq, bq), (wk, bk), (wv, bv) = (effective(getattr(m, p)) for p in QKV)
    if isinstance(m, SplitAttention):
        _drop(state, prefix)
        state[f"{prefix}in_proj_weight"] = torch.cat([wq, wk, wv])
        state[f"{prefix}in_proj_bias"] = torch.cat([bq, bk, bv])
        state[f"{prefix}out_proj.weight"], state[f"{prefix}out_proj.bias"] = effective(m.out_proj)
    elif isinstance(m, QKVLinear):
        _drop(state, prefix)
        state[f"{prefix}weight"] = torch.cat([wq, wk, wv])
        if bq is not None:
            state[f"{prefix}bias"] = torch.cat([bq, bk, bv])
    else:  # EvaAttention that `_split_timm` unfused: qkv.weight + q_bias, v_bias
        for p in QKV:
            _drop(state, f"{prefix}{p}.")
        state[f"{prefix}qkv.weight"] = torch.cat([wq, wk, wv])
        state[f"{prefix}q_bias"], state[f"{prefix}v_bias"] = bq, bv
        out_name = next(n for n in OUT_NAMES if hasattr(m, n))
        out = getattr(m, out_name)
        if isinstance(getattr(out, "base_layer", None), nn.Linear):
            _drop(state, f"{prefix}{out_name}.")
            state[f"{prefix}{out_name}.weight"], state[f"{prefix}{out_name}.bias"] = effective(out)


def _drop(state: dict[str, torch.Tensor], prefix: str) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
