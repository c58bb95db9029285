"""Weight-space adapters on the CLIP towers: the layer, the targets, injection, merge and export.

The toolkit every method that changes CLIP's weights builds on (lora, peft's presets, clip_svd,
two_stage's LoRA stage), after peft's tuners (`peft/tuners/tuners_utils.py` `BaseTunerLayer`,
`BaseTuner.inject_adapter`):

- `AdapterLayer` wraps a `base_layer` (an `nn.Linear`) and adds its update; `merge()` writes the
  update into `base_layer.weight` for inference, `unmerge()` takes it out again, and
  `effective_weight()` gives the (weight, bias) the layer applies, merged or not.
- `LoRALinear` is CLIP-LoRA's layer (scaling alpha / sqrt(rank), dropout on the LoRA input);
  `SVDLinear` is CLIP-SVD's (the weight's SVD with trainable singular values).
- Targets are chosen by tower (`encoder`: vision | text | both), by blocks (`position`, index sets
  over a tower's depth, CLIP-LoRA's names) and by projection (`matrices`: q, k, v, o) on the
  unfused attention of `fsbench.attention`, and "mlp" adds the Linears of each block's MLP
  (`block_targets`).
- `inject_adapter(model, make, ...)` wraps each target in `make(linear)`; `inject_lora` is the
  LoRA case. `merged_state_dict` writes an adapted CLIP in open_clip's own format.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.attention import attention_layers, fused_state_dict, projections
from fsbench.checks import check_at_least, check_fraction, check_positive
from fsbench.errors import ConfigError
from fsbench.text import text_tower

MATRICES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
POSITIONS = ("all", "bottom", "mid", "up", "half-bottom", "half-up", "top1", "top2", "top3")
ENCODERS = ("vision", "text", "both")


class AdapterLayer(nn.Module):
    """A layer that wraps `base_layer` and adds an update to it (peft's `BaseTunerLayer`).

    Subclasses give `delta_weight()` (the additive update) and `forward`; merging adds the update
    to `base_layer.weight` in its dtype, unmerging subtracts it.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as peft's layers expose it: open_clip reads `mlp.c_fc.weight.dtype`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) the layer applies, its update included."""
        delta = 0 if self.merged else self.delta_weight()
        return self.base_layer.weight + delta, self.base_layer.bias


class LoRALinear(AdapterLayer):
    """`base_layer(x) + scaling * B A dropout(x)`, mergeable into `base_layer.weight`."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base_layer)
        like = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0 so W is unchanged
        self.scaling = alpha / math.sqrt(rank)  # official CLIP-LoRA, not peft's alpha / rank
        self.dropout = nn.Dropout(dropout)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.scaling * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)


class SVDLinear(AdapterLayer):
    """`base_layer` re-parameterised by its SVD, `U diag(s) V^T x + b`, with only `s` trainable
    (CLIP-SVD, HealthX-Lab/CLIP-SVD svf_utils/svf_torch.py:60-77 `SVD_Linear`: `fc_U(fc_V(x) * vector_S)`).

    The decomposition is the full-rank thin SVD of the weight (svf_torch.py:11-36 `d_nsvd` with
    `global_low_rank_ratio=1`, train.py:103), so at `s` = the singular values the layer computes
    the base layer's function up to float rounding. `U` and `V^T` are buffers recomputed from the
    frozen weight (saving `vector_S` is enough: a joint sign flip of a singular pair leaves `U diag(s)
    V^T` unchanged). Merging writes `U diag(s) V^T` into `base_layer.weight`; unmerging restores it.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        weight = base_layer.weight.detach()
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # = torch.svd (d_nsvd), V transposed
        self.register_buffer("U", u.to(weight.dtype), persistent=False)
        self.register_buffer("Vh", vh.to(weight.dtype), persistent=False)
        self.vector_S = nn.Parameter(s.to(weight.dtype).unsqueeze(0))  # (1, r), as svf_torch.py:70
        self._original: torch.Tensor | None = None

    def svd_weight(self) -> torch.Tensor:
        """`U diag(s) V^T`, the weight the layer applies."""
        return (self.U * self.vector_S) @ self.Vh

    def delta_weight(self) -> torch.Tensor:
        return self.svd_weight() - (self._original if self.merged else self.base_layer.weight)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._original = self.base_layer.weight.detach().clone()
            self.base_layer.weight.copy_(self.svd_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.copy_(self._original)
            self._original, self.merged = None, False

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.svd_weight(), self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return F.linear(F.linear(x, self.Vh) * self.vector_S, self.U, self.base_layer.bias)


def layer_indices(position: str, depth: int) -> list[int]:
    """Blocks adapted for `position` in a tower of `depth` blocks (official sets at depth 12)."""
    third, half = depth // 3, depth // 2
    spans = {"all": (0, depth), "bottom": (0, third), "mid": (third, 2 * third),
             "up": (2 * third, depth), "half-bottom": (0, half), "half-up": (half, depth),
             "top1": (depth - 1, depth), "top2": (depth - 2, depth), "top3": (depth - 3, depth)}
    lo, hi = spans[position]
    return list(range(lo, hi))


def towers(model: nn.Module, encoder: str) -> Iterator[nn.Module]:
    """open_clip's transformer of each chosen tower (OpenAI-style CLIP only)."""
    if encoder in ("vision", "both"):
        yield model.visual.transformer
    if encoder in ("text", "both"):
        yield model.transformer


def attention_towers(model: nn.Module, encoder: str) -> dict[str, list[nn.Module]]:
    """The attention layers of the chosen towers, in depth order (`fsbench.attention.attention_layers`):
    open_clip's blocks, timm's (SigLIP, EVA-CLIP) with their fused `qkv` split into q/k/v slices."""
    found = {}
    if encoder in ("vision", "both"):
        found["vision"] = attention_layers(model.visual)
    if encoder in ("text", "both"):
        found["text"] = attention_layers(getattr(text_tower(model), "transformer", None))
    return found


def check_targets(encoder: str, position: str, matrices: Sequence[str],
                  allowed: Sequence[str] = tuple(MATRICES)) -> None:
    """Range checks of a target selection, as `ValueError`s (a method config's `__post_init__`)."""
    if not matrices or any(m not in allowed for m in matrices):
        raise ValueError(f"matrices must be a non-empty subset of {', '.join(allowed)}, got {list(matrices)}")
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be vision, text or both, got {encoder!r}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")


Target = tuple[nn.Module, str]  # (owner, attribute) of one Linear


def block_of(root: nn.Module, attn: nn.Module) -> nn.Module | None:
    """The residual block whose `attn` is `attn` (open_clip's and timm's blocks both name it so)."""
    return next((m for m in root.modules() if getattr(m, "attn", None) is attn), None)


def mlp_targets(block: nn.Module) -> list[Target]:
    """(owner, attribute) of every Linear of a block's MLP, in module order (open_clip `c_fc`, `c_proj`;
    timm `fc1`, `fc2`; EVA's SwiGLU `fc1_g`, `fc1_x`, `fc2`)."""
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        return []
    found = []
    for name, module in mlp.named_modules():
        if isinstance(module, nn.Linear) and name:
            parent, _, attr = name.rpartition(".")
            found.append((mlp.get_submodule(parent) if parent else mlp, attr))
    return found


def block_targets(model: nn.Module, encoder: str, position: str, parts: Sequence[str],
                  section: str = "lora") -> list[Target]:
    """(owner, attribute) of the chosen Linears: towers in order (vision, text), then block, then `parts`
    in their given order (q, k, v, o; "mlp": every Linear of the block's MLP, after the projections).

    A tower without attention (ConvNeXt's vision tower) is skipped when `encoder` is "both" and
    is a `ConfigError` when it is the only tower asked for; so is a model with no target at all.
    """
    matrices = [p for p in parts if p != "mlp"]
    targets = []
    roots = {"vision": model.visual, "text": getattr(text_tower(model), "transformer", None)}
    for name, blocks in attention_towers(model, encoder).items():
        if not blocks and encoder != "both":
            raise ConfigError(f"{section}.encoder={encoder}: the {name} tower of this backbone has no attention "
                              "layers to adapt (ConvNeXt and ResNet vision towers); use encoder=text")
        for i in layer_indices(position, len(blocks)) if blocks else []:
            found = projections(blocks[i])
            targets.extend(found[m] for m in matrices)
            if "mlp" in parts:
                targets.extend(mlp_targets(block_of(roots[name], blocks[i])))
    if not targets:
        raise ConfigError(f"{section}.encoder={encoder}: no attention layer fsbench can adapt in this backbone")
    return targets


def inject_adapter(targets: Sequence[Target], make: Callable[[nn.Linear], nn.Module]) -> list[nn.Module]:
    """Replace each target Linear by `make(linear)` (an `AdapterLayer` wrapping it); returns the layers."""
    layers = []
    for owner, attr in targets:
        layer = make(getattr(owner, attr))
        setattr(owner, attr, layer)
        layers.append(layer)
    return layers


class LoRATargets(Protocol):
    """What `inject_lora` reads from a config (`methods/lora.py`'s `LoRAConfig`)."""

    rank: int
    alpha: float
    dropout: float
    matrices: list[str]
    encoder: str
    position: str


def inject_lora(model: nn.Module, cfg: LoRATargets) -> list[LoRALinear]:
    """Wrap the chosen projections of the chosen blocks in `LoRALinear`; returns the layers."""
    targets = block_targets(model, cfg.encoder, cfg.position, cfg.matrices)
    return inject_adapter(targets, lambda linear: LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))


def _effective(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) a projection applies, its adapter's update included."""
    if isinstance(linear, AdapterLayer):
        return linear.effective_weight()
    return linear.weight, linear.bias


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of an adapted CLIP in open_clip's own format, updates merged.

    Every unfused projection is fused back (`nn.MultiheadAttention`'s `in_proj_weight`, timm's
    `qkv`), so the result loads into a plain open_clip model (`--checkpoint`).
    """
    return fused_state_dict(model, _effective)


# ---- config pieces: bases of method configs, so their fields stay top-level keys (`--set lora.rank=4`) ------------
# A method config composes them by inheritance, listing the pieces last-first: dataclass fields follow the reversed
# MRO, so `class LoRAConfig(EndToEnd, TargetsConfig, LoRARecipe, LoRALayerConfig)` keeps CLIP-LoRA's stored key order
# (rank, alpha, dropout, recipe, matrices, encoder, position, ...), on which result identities do not depend anyway.


@dataclass
class LoRALayerConfig:
    """The LoRA layer's shape (CLIP-LoRA loralib defaults): rank 2, alpha 1, dropout 0.25 on the LoRA input."""

    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25  # on the LoRA branch input

    section: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        check_lora_layer(self.section, self)


def check_lora_layer(section: str, cfg: LoRALayerConfig) -> None:
    """Range checks of rank, alpha and dropout, naming `section.field`."""
    check_at_least(section, "rank", cfg.rank, 1)
    check_positive(section, "alpha", cfg.alpha)
    check_fraction(section, "dropout", cfg.dropout)


@dataclass
class TargetsConfig:
    """Which projections of which blocks of which towers an adapter wraps (`block_targets`)."""

    matrices: list[str] = field(default_factory=lambda: ["q", "k", "v"])  # any of q, k, v, o
    encoder: str = "both"  # vision | text | both
    position: str = "all"  # see POSITIONS

    allowed: ClassVar[tuple[str, ...]] = tuple(MATRICES)  # what `matrices` may name

    def __post_init__(self) -> None:
        check_targets(self.encoder, self.position, self.matrices, allowed=self.allowed)
