"""ProGrad (Zhu, Niu, Han, Wu & Zhang, "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023,
arXiv 2205.14865): CoOp whose cross-entropy gradient is projected so that it never works against the
zero-shot (hand-crafted prompt) knowledge.

Per step, g_ce is the cross-entropy gradient of the context and g_kl the gradient of the KL divergence
from the zero-shot CLIP prediction to the prompt's. When they conflict (g_ce . g_kl < 0) the update uses

    g = g_ce - lambda * (g_ce . u) u,     u = g_kl / ||g_kl||

(with lambda = 1 the conflicting component is removed exactly); otherwise g = g_ce. Defaults follow the
official code (github.com/BeierZhu/Prompt-align 1b76203):
- Dassl.ProGrad.pytorch/dassl/engine/trainer.py:311-349 `prograd_backward_and_update`: the projection
  above, per parameter; ProGrad.public/trainers/prograd.py:280-293 the losses, KL = sum_c -p_zs log p
  at temperature T (x T^2), mean over the batch; :360-383 the zero-shot teacher run on the same images;
- trainers/prograd.py:201-217 the hand-crafted templates (`PROGRAD_TEMPLATES` below; the class name
  always ends them) and :220-249 the teacher: 100 x cosine with their frozen text features;
- trainers/prograd.py:78-95 the context: 16 vectors (README.md:54-58, scripts/prograd.sh NCTX 16),
  zeros followed by the embeddings of the template's words before the class ("a photo of a");
- scripts/prograd.sh:15 LAMBDA 1.0, README.md:52 0.8 for 8 and 16 shots on Flowers102, DTD and
  EuroSAT; configs/trainers/ProGrad/rn50*.yaml T 1.0, SGD lr 0.002, batch 32, one constant warm-up
  epoch at 1e-5 then cosine, 50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots (README.md:54-58, CoOp's
  schedule); the last epoch is kept.

Deviations: as CoOp (`methods/coop.py`). The official code counts the init words by spaces, so on
the templates with a comma (pets, flowers, aircraft, food) its context holds the first tokens only and
the prompt repeats the last word; fsbench counts tokens. The official configs are for RN50; the same
schedule is used for every backbone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from fsbench.checks import check_positive
from fsbench.method import FewShotData, register_method
from fsbench.methods.coop import CoOp, CoOpConfig
from fsbench.prompts import Prompts, build_prompts, frozen_image_features
from fsbench.training import Backward

TEMPLATE = "template"  # `init` value: the words of the dataset's ProGrad template before the class name
# ProGrad's hand-crafted templates where they differ from "a photo of a {}." (trainers/prograd.py:201-217)
PROGRAD_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "food101": "a type of food, a photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}
LOWER_LAMBDA = ("oxford_flowers", "dtd", "eurosat")  # README.md:52: lambda 0.8 at 8 and 16 shots


@dataclass
class ProGradConfig(CoOpConfig):
    """ProGrad hyper-parameters (official scripts/prograd.sh, configs/trainers/ProGrad/rn50*.yaml)."""

    n_ctx: int = 16  # context vectors: zeros, then the init words in the last slots
    init: str = TEMPLATE  # "template" = the dataset's ProGrad template words; other words; or "random"
    projection_lambda: float | None = None  # lambda; None = official: 1.0 (0.8, see LOWER_LAMBDA)
    temperature: float = 1.0  # T of the KL to the zero-shot prediction

    section: ClassVar[str] = "prograd"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection_lambda is not None:
            check_positive(self.section, "projection_lambda", self.projection_lambda)
        check_positive(self.section, "temperature", self.temperature)


def prograd_template(dataset: str) -> str:
    """The hand-crafted prompt ProGrad uses for `dataset` (teacher and context initialisation)."""
    return PROGRAD_TEMPLATES.get(dataset, "a photo of a {}.")


def official_lambda(dataset: str, shots: int) -> float:
    return 0.8 if dataset in LOWER_LAMBDA and shots >= 8 else 1.0


def project_conflicting(grad: torch.Tensor, reference: torch.Tensor, lambda_: float) -> torch.Tensor:
    """`grad` unchanged if it agrees with `reference` (dot >= 0); else minus lambda x its component along
    `reference` (trainer.py:336-345). No host sync: the choice is a `torch.where`."""
    unit = reference / torch.linalg.norm(reference)
    dot = torch.dot(grad.flatten(), unit.flatten())
    return torch.where(dot < 0, grad - lambda_ * dot * unit, grad)


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum_c -softmax(teacher / T) log_softmax(student / T) x T^2, mean over the batch (prograd.py:285-293)."""
    target = F.softmax(teacher / temperature, dim=-1)
    return -(target * F.log_softmax(student / temperature, dim=-1)).sum(-1).mean() * temperature ** 2


@register_method("prograd")
class ProGrad(CoOp):
    """CoOp with the cross-entropy gradient projected off the zero-shot KL gradient when they conflict."""

    Config = ProGradConfig
    paper = "Zhu et al., Prompt-aligned Gradient for Prompt Tuning, ICCV 2023"
    summary = "ProGrad: CoOp (16 tokens) with the CE gradient projected against the zero-shot KL gradient"

    def make_prompts(self, n_ctx: int) -> Prompts:
        ctx, init = self.ctx, self.config.init
        if init == TEMPLATE:
            init = prograd_template(ctx.dataset).replace(" {}.", "")
        return build_prompts(ctx.backbone, ctx.classnames, n_ctx, init, ctx.device, ctx.generator(1), pad_words=True)

    def prepare(self, train: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        if cfg.projection_lambda is None:
            self.config = dataclasses.replace(cfg, projection_lambda=official_lambda(ctx.dataset, ctx.shots))
        self.zero_shot = ctx.text_weights([prograd_template(ctx.dataset)]).to(ctx.device)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (returned); the KL to the zero-shot prediction is kept for `backward_fn`."""
        feats = frozen_image_features(self.ctx.backbone, images)
        student = self.config.logit_scale * feats @ self.text_features().T
        teacher = self.config.logit_scale * feats @ self.zero_shot.T
        self._kl = kl_to_teacher(student, teacher, self.config.temperature)
        return F.cross_entropy(student, labels)

    def backward_fn(self) -> Backward:
        def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
            (kl_grad,) = torch.autograd.grad(scaler.scale(self._kl), [self.context], retain_graph=True)
            scaler.scale(loss).backward()
            self.context.grad = project_conflicting(self.context.grad, kl_grad, self.config.projection_lambda)

        return backward
