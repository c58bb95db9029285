"""CLIP-SVD (Koleilat, Rivaz & Xiao, "Singular Value Few-shot Adaptation of Vision-Language Models",
arXiv 2509.03740, 2025): every Linear of every transformer block of both CLIP towers is re-parameterised
by its SVD, `W = U diag(s) V^T`, and only the singular values `s` are fine-tuned.

Defaults follow the official code (github.com/HealthX-Lab/CLIP-SVD at 022b1ed):
- the layer: `fc_U(fc_V(x) * vector_S)` with U, S, V from the full-rank SVD of the weight
  (svf_utils/svf_torch.py:11-36 `d_nsvd`, :60-77 `SVD_Linear`, :225-228 rank = full with ratio 1,
  main.py:30 `--rank 1.0`); every `nn.Linear` is decomposed (svf_torch.py:192-195), i.e. q, k, v,
  out of the attention (train.py:86-95 swaps in `PlainMultiHeadAttention`) and the MLP's c_fc, c_proj;
- trainable: `vector_S` of q, k, v, o and the MLP in all 12 blocks of both towers
  (svf_utils/utils.py:24-69; configs/few_shot/*.yaml:6-13 `include_train_layers: "all"`, every
  `train_*: True`): 92,160 parameters on ViT-B/16 (12 x 6 x 768 + 12 x 6 x 512);
- AdamW lr 5e-4, weight decay 0.01 (configs/few_shot/*.yaml:2,5 for the 11 natural datasets),
  betas 0.9/0.999 (train.py:125-128); cosine to 1e-6 over `n_iters x shots` steps
  (train.py:121,129-131; main.py:33 `--n_iters 200`), batch 32 (configs/few_shot/*.yaml:4);
- cross-entropy on 100 x cosine similarity (main.py:62, train.py:149-158), the class texts re-encoded
  through the adapted text tower every step with one template per dataset (train.py:142-151;
  configs/few_shot/*.yaml:15: CoOp's, food101 "a photo of a {}, a type of food."), random resized
  crops (scale 0.08-1, bicubic) and flips (main.py:82-87); the last iterate is evaluated
  (train.py:57 `VALIDATION = False`, :188).

The training loop is CLIP-LoRA's (`methods/lora.py`), which the official code copies (train.py:133-172);
the re-parameterisation is `fsbench.tuners.SVDLinear`.

Differences from the official code (docs/methods.md, "clip_svd"):
- evaluation merges `U diag(s) V^T` into the weights (one matmul per layer; the same function up to
  float rounding) and runs under the run's autocast; the official code evaluates the factored layers,
  text under fp16 autocast and images in fp32 (train.py:30-40);
- on CUDA fp16 autocast gets a GradScaler (the official code runs fp16 autocast without one,
  run_utils.py:25 `use_scaler` unused) and the run's autocast dtype (bf16 where supported) is used;
- base-to-new uses the few-shot lr 5e-4 (the official base2new configs use 4e-4: `--set clip_svd.lr=4e-4`);
- `position` uses fsbench's block sets (all, bottom, mid, up, half-*, top*); the official
  "top_bottom", "top_middle" and "bottom_middle" have no name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fsbench.method import register_method
from fsbench.methods.lora import CLIPLoRA
from fsbench.training import EndToEnd, LoRARecipe, check_end_to_end, check_lora_recipe
from fsbench.tuners import MATRICES, SVDLinear, TargetsConfig, block_targets, inject_adapter

PARTS = (*MATRICES, "mlp")
# configs/few_shot/<dataset>.yaml:15 `template`: CoOp's per-dataset templates except food101's "a photo of a {}"
TEMPLATES = {
    "caltech101": "a photo of a {}.", "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "food101": "a photo of a {}, a type of food.",
    "imagenet": "a photo of a {}.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "oxford_pets": "a photo of a {}, a type of pet.", "stanford_cars": "a photo of a {}.",
    "sun397": "a photo of a {}.", "ucf101": "a photo of a person doing {}.",
}


@dataclass
class CLIPSVDConfig(EndToEnd, TargetsConfig, LoRARecipe):
    """CLIP-SVD hyper-parameters (official few-shot defaults, natural datasets): CLIP-LoRA's recipe, targets
    and end-to-end pass (the toolkit's pieces), whose other defaults are the official ones too: weight decay
    1e-2 and batch 32 (configs/few_shot/*.yaml:4-5), betas 0.9/0.999 (train.py:127), eta_min 1e-6
    (train.py:131), both towers, all blocks, logit scale 100 (main.py:62), crops 0.08-1 (main.py:83)."""

    lr: float = 5e-4  # configs/few_shot/*.yaml:2
    iters_per_shot: int = 200  # main.py:33 --n_iters; total = n_iters x shots (train.py:121)
    matrices: list[str] = field(default_factory=lambda: list(PARTS))  # q, k, v, o, mlp (utils.py:48-57)

    section: ClassVar[str] = "clip_svd"
    allowed: ClassVar[tuple[str, ...]] = PARTS

    def __post_init__(self) -> None:
        check_lora_recipe(self.section, self)
        check_end_to_end(self.section, self)
        TargetsConfig.__post_init__(self)


@register_method("clip_svd")
class CLIPSVD(CLIPLoRA):
    """Singular values of every block Linear of both towers, trained with CLIP-LoRA's loop."""

    Config = CLIPSVDConfig
    paper = "Koleilat et al., Singular Value Few-shot Adaptation of Vision-Language Models, arXiv 2509.03740, 2025"
    summary = "CLIP-SVD: fine-tune only the singular values of every block Linear of both encoders"

    def template(self) -> str:
        """The dataset's template of the official configs; other datasets: their first template."""
        return TEMPLATES.get(self.ctx.dataset, self.ctx.templates[0])

    def adapt(self, model: nn.Module) -> list[nn.Parameter]:
        cfg = self.config
        targets = block_targets(model, cfg.encoder, cfg.position, cfg.matrices, section="clip_svd")
        self.layers = inject_adapter(targets, SVDLinear)
        return [layer.vector_S for layer in self.layers]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trained singular values by module name (U and V^T follow from the frozen weights)."""
        return {f"{name}.vector_S": m.vector_S.detach() for name, m in self.model.named_modules()
                if isinstance(m, SVDLinear)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.prepare()
        unexpected = self.model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"not CLIP-SVD singular values of this configuration: {unexpected[:3]}")
        self.finish()
