"""2SFS (Farina, Mancini, Iacca & Ricci, "Rethinking Few-Shot Adaptation of Vision-Language Models in
Two Stages", CVPR 2025, arXiv 2503.11609): a fixed budget of M x K steps split in two; the first
alpha share tunes the LayerNorms of both encoders CLIP-LoRA's way (text re-encoded every step), the rest
trains a linear classifier, initialised with the adapted text features, on the adapted image features.
No validation: one schedule for every dataset and shot count.

Defaults follow the official code (github.com/FarinaMatteo/rethinking_fewshot_vlms at 64ac143):
- M = 300 (`--n_iters`, main.py:63), alpha = 0.6 (`--n_iters_frac`, main.py:65): total = M x shots,
  stage 1 = int(total x alpha) steps, stage 2 the rest (fs/twostage.py:261-262, :296);
- stage 1 trains the LayerNorms of both towers (`--peft ln`, `--ln_modality both`, starts 0;
  main.py:67-77; fs/utils/model_utils.py:26-38). The official selection visits `ln_pre`, `ln_post`
  and `ln_final` twice, the second time as "not a block" (model_utils.py:12-23, 32-37), which turns
  their `requires_grad` off again: only the blocks' `ln_1` / `ln_2` train, 61,440 parameters on
  ViT-B/16 (counted on the official code); fsbench trains exactly those;
- both stages: AdamW lr 2e-4, weight decay 0.01, betas 0.9/0.999 (main.py:49-50; twostage.py:258,
  :291), cosine to 1e-6 over the stage's steps (:263, :297), batch 32 (main.py:41), CLIP-LoRA's crops
  (datasets/__init__.py:62-67) and template "a photo of a {}." (datasets/*.py);
- stage 1 loss: cross-entropy on exp(logit_scale) x cosine (= 100) with the adapted text features
  (twostage.py:208-220); stage 2: the classifier's rows L2-normalised, images through the adapted,
  frozen vision tower (:68-76, :157-161);
- scoring: classes seen in training use their classifier row; unseen classes (base-to-new) their
  prompt through the adapted text tower (`infer`, :79-113).

Differences from the official code (docs/methods.md, "two_stage"):
- the official GradScaler skips count no step (twostage.py:223-229); here every step counts;
- mixed precision is the run's autocast (bf16 on GPU; the official: fp16 with a GradScaler);
- the first stage's other choices (`--peft lora` / `bitfit`) are not implemented;
- other families: every LayerNorm inside each transformer block of both towers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.checks import (
    check_at_least,
    check_betas,
    check_crop_scale,
    check_fraction,
    check_non_negative,
    check_positive,
)
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, register_method
from fsbench.methods.lora import CLIPLoRA
from fsbench.text import text_tower
from fsbench.training import train_iterations
from fsbench.tuners import ENCODERS, attention_towers, block_of


@dataclass
class TwoStageConfig:
    """2SFS hyper-parameters (official defaults, one schedule for every dataset)."""

    iters_per_shot: int = 300  # M (main.py:63); total steps = M x shots
    stage1_fraction: float = 0.6  # alpha (main.py:65)
    lr: float = 2e-4  # main.py:49, both stages
    weight_decay: float = 1e-2  # main.py:50
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 32  # main.py:41
    eta_min: float = 1e-6  # twostage.py:263, :297
    encoder: str = "both"  # --ln_modality: LayerNorms of vision | text | both
    logit_scale: float = 100.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    augment: str = "auto"  # see LoRAConfig.augment
    text_buckets: int = 4  # see LoRAConfig.text_buckets

    def __post_init__(self) -> None:
        for name in ("lr", "logit_scale"):
            check_positive("two_stage", name, getattr(self, name))
        check_non_negative("two_stage", "weight_decay", self.weight_decay)
        check_non_negative("two_stage", "eta_min", self.eta_min)
        check_fraction("two_stage", "stage1_fraction", self.stage1_fraction)
        check_betas("two_stage", "betas", self.betas)
        check_crop_scale("two_stage", "crop_scale", self.crop_scale)
        for name in ("batch_size", "iters_per_shot", "text_buckets"):
            check_at_least("two_stage", name, getattr(self, name), 1)
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be vision, text or both, got {self.encoder!r}")
        if self.augment not in ("auto", "device", "pil"):
            raise ValueError(f"augment must be 'auto', 'device' or 'pil', got {self.augment!r}")


def block_norms(model: nn.Module, encoder: str) -> dict[str, nn.Parameter]:
    """The LayerNorm parameters inside the transformer blocks of the chosen towers, by name."""
    roots = {"vision": model.visual, "text": getattr(text_tower(model), "transformer", None)}
    ids = {}
    for tower, attns in attention_towers(model, encoder).items():
        for attn in attns:
            block = block_of(roots[tower], attn)
            for module in block.modules() if block is not None else []:
                if isinstance(module, nn.LayerNorm):
                    ids.update({id(p): p for p in module.parameters(recurse=False)})
    chosen = {name: p for name, p in model.named_parameters() if id(p) in ids}
    if not chosen:
        raise ConfigError(f"two_stage.encoder={encoder}: no transformer block with LayerNorms in this backbone")
    return chosen


@register_method("two_stage")
class TwoStage(CLIPLoRA):
    """2SFS: LayerNorm tuning for alpha of the budget, then a linear classifier on the adapted features."""

    Config = TwoStageConfig
    paper = "Farina et al., Rethinking Few-Shot Adaptation of Vision-Language Models in Two Stages, CVPR 2025"
    summary = "2SFS: LayerNorms of both encoders, then a text-initialised linear classifier; fixed budget"

    def total_steps(self) -> int:
        return int(self.config.iters_per_shot * self.ctx.shots * self.config.stage1_fraction)

    def adapt(self, model: nn.Module) -> list[nn.Parameter]:
        self.layers = []
        self.norms = block_norms(model, self.config.encoder)
        for p in self.norms.values():
            p.requires_grad_(True)
        return list(self.norms.values())

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        super().fit(train, val)  # stage 1, then the adapted class texts in self.text
        self.fitted_classes = list(self.ctx.classnames)
        self.classifier = nn.Parameter(self.text.detach().clone())
        steps = self.config.iters_per_shot * self.ctx.shots - self.total_steps()
        self._second_stage(train, steps)

    def _second_stage(self, train: FewShotData, steps: int) -> None:
        """The classifier on frozen adapted image features: AdamW, cosine over the remaining steps, in fp32
        without a GradScaler (the features alone run under the autocast, `classifier_loss`)."""
        cfg = self.config
        opt = torch.optim.AdamW([self.classifier], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
        train_iterations(self.ctx, opt, self._batches(train), self.classifier_loss, steps, cfg.eta_min,
                         "train two_stage classifier", amp=False)
        self._scoring_weights()

    def classifier_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Stage 2: cross-entropy of the L2-normalised classifier on frozen adapted features (twostage.py:68-76)."""
        ctx = self.ctx
        with torch.no_grad(), ctx.autocast():
            feats = self.model.encode_image(images.to(ctx.device, non_blocking=True))
        logits = self.config.logit_scale * F.normalize(feats.float(), dim=-1) @ F.normalize(self.classifier, dim=-1).T
        return F.cross_entropy(logits, labels.to(ctx.device))

    def _scoring_weights(self) -> None:
        """Rows of the classes being scored: the classifier's for fitted classes, else the adapted text."""
        rows = {c: i for i, c in enumerate(self.fitted_classes)}
        weights = F.normalize(self.classifier.detach(), dim=-1)
        self.weights = torch.stack([weights[rows[c]] if c in rows else self.text[i]
                                    for i, c in enumerate(self.ctx.classnames)])

    def retarget(self) -> None:
        """Other classes: the classifier rows of fitted classes, the adapted text for new ones (`infer`)."""
        super().retarget()
        self._scoring_weights()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x, self.weights)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.norms.values()) + self.classifier.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {**{n: p.detach() for n, p in self.norms.items()}, "classifier": self.classifier.detach()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.prepare()
        with torch.no_grad():
            for name, p in self.norms.items():
                p.copy_(tensors[name])
        self.finish()
        self.fitted_classes = list(self.ctx.classnames)
        self.classifier = nn.Parameter(tensors["classifier"].to(self.ctx.device))
        self._scoring_weights()
