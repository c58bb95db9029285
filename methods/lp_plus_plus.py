"""LP++ (Huang, Shakeri, Dolz, Boudiaf, Bendou & Ben Ayed, "LP++: A Surprisingly Strong Linear
Probe for Few-Shot CLIP", CVPR 2024, arXiv 2404.02285): a linear probe whose class weights blend
learned visual prototypes with the text embeddings through learnable per-class multipliers.

    logits = f W^T + b + alpha_c * (f t_c^T)     (class weights W_c + alpha_c t_c)

Defaults follow the official code (github.com/FereshteShakeri/FewShot-CLIP-Strong-Baseline:
methods/linear_probe_p2.py, configs/base.yaml): W starts at the per-class sums of the train
features, b at PyTorch's default Linear bias init, every alpha_c at 250 x the mean over classes of
the mean similarity f t_c of the class's samples to its own text; full-batch SGD (momentum 0.9)
on W, b with the Lipschitz step 4N / lambda_max(F^T F) for 300 epochs; every 10 epochs alpha
takes a gradient step of size N / (4 max_c sum_i (f_i t_c)^2), with its gradient accumulated
since the start as in the official code (it is never zeroed); the epoch with the best validation
accuracy (last one on ties) is kept. On ImageNet the text weights average the official 7-template
ensemble (datasets/imagenet.py:178; `IMAGENET_ENSEMBLE`). The validation set has K shots per class,
as the official code draws it (main.py:94; main_imagenet.py via datasets/imagenet.py:238-243 takes
them from ImageNet's train split, as fsbench's held-out 10% does), via `val_request = "shots"`.

Deviations: float32 throughout (the official code runs CLIP's fp16); features of the
un-augmented images from the cache (the official code encodes one random crop per image).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsbench.checks import check_at_least, check_fraction, check_non_negative
from fsbench.data.templates import ensemble_templates
from fsbench.method import FewShotData, Method, register_method
from fsbench.metrics import accuracy
from fsbench.training import BestOnValidation, train_epochs


@dataclass
class LPPlusPlusConfig:
    """LP++ hyper-parameters (official code, `case 1`)."""

    epochs: int = 300  # full-batch steps on the visual prototypes
    alpha_every: int = 10  # epochs between two steps on the blending weights
    alpha_init_scale: float = 250.0  # alpha_0 = scale x mean similarity of samples to their class text
    momentum: float = 0.9

    def __post_init__(self) -> None:
        check_at_least("lp_plus_plus", "epochs", self.epochs, 0)
        check_at_least("lp_plus_plus", "alpha_every", self.alpha_every, 1)
        check_non_negative("lp_plus_plus", "alpha_init_scale", self.alpha_init_scale)
        check_fraction("lp_plus_plus", "momentum", self.momentum)


def class_sums(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) sum of the features of each class (the official, un-divided 'centroids')."""
    return F.one_hot(y, num_classes).to(x.dtype).T @ x


def lr_prototypes(x: torch.Tensor) -> float:
    """Step size of W: 4N / largest eigenvalue of F^T F (official `calculate_lr_w`)."""
    gram = (x.T @ x).double()
    return 4 * len(x) / torch.linalg.eigvalsh(gram).max().item()


def lr_blending(text_logits: torch.Tensor) -> float:
    """Step size of alpha: N / (4 max_c sum_i (f_i t_c)^2) (official `calculate_lr_alpha`)."""
    return len(text_logits) / (4 * text_logits.pow(2).sum(0).max().item())


def init_blending(text_logits: torch.Tensor, y: torch.Tensor, num_classes: int, scale: float) -> float:
    """alpha_0: `scale` x the mean over classes of the mean similarity of a class's samples to its
    own text embedding (official `calculate_init_alpha`)."""
    one_hot = F.one_hot(y, num_classes).to(text_logits.dtype)
    own = (one_hot * text_logits).sum(0) / one_hot.sum(0).clamp(min=1)  # (C,)
    return scale * own.mean().item()


@register_method("lp_plus_plus")
class LPPlusPlus(Method):
    """Visual prototypes + per-class text multipliers, data-driven steps and initialisation."""

    Config = LPPlusPlusConfig
    input_kind = "features"
    val_request = "shots"  # official: K validation shots per class, ImageNet too (the protocols' own: min(K, 4))
    paper = "Huang et al., LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP, CVPR 2024"
    summary = "LP++: linear probe blending visual prototypes with text weights, Lipschitz step sizes"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, dev, n_cls = self.config, self.ctx.device, self.ctx.num_classes
        x, y = train.features.to(dev).float(), train.labels.to(dev)
        vx, vy = val.features.to(dev).float(), val.labels.to(dev)
        self.text = self.ctx.text_weights(ensemble_templates(self.ctx.dataset, self.ctx.templates)).to(dev)
        text_logits = x @ self.text.T
        bound = 1 / math.sqrt(x.shape[1])  # nn.Linear's default bias init
        bias0 = (torch.rand(n_cls, generator=self.ctx.generator(1)) * 2 - 1) * bound
        w = class_sums(x, y, n_cls).requires_grad_(True)
        b = bias0.to(dev).requires_grad_(True)
        alpha = torch.full((n_cls,), init_blending(text_logits, y, n_cls, cfg.alpha_init_scale), device=dev,
                           requires_grad=True)
        opt = torch.optim.SGD([w, b], lr=lr_prototypes(x), momentum=cfg.momentum)
        lr_alpha = lr_blending(text_logits)
        best = BestOnValidation(initial=(w.detach(), b.detach(), alpha.detach()), ties="last",  # official: >=
                                curves=self.ctx.curves)

        def end_epoch(epoch: int) -> None:
            with torch.no_grad():
                if (epoch + 1) % cfg.alpha_every == 0:  # alpha's gradient accumulates, never zeroed (official)
                    alpha.sub_(lr_alpha * alpha.grad)
                acc = accuracy(self._logits(vx, w, b, alpha), vy)
            best.offer(acc, lambda: (w.detach().clone(), b.detach().clone(), alpha.detach().clone()))

        # full batch: one step per epoch; the optimiser zeroes W and b only
        train_epochs(self.ctx, opt, itertools.repeat((x, y)),
                     lambda xb, yb: F.cross_entropy(xb @ w.T + b + alpha * text_logits, yb), cfg.epochs, 1, None,
                     "train lp_plus_plus", amp=False, end_epoch=end_epoch)
        self.w, self.b, self.alpha = best.state

    def _logits(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return x @ w.T + b + alpha * (x @ self.text.T)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x.float(), self.w, self.b, self.alpha)

    def trainable_params(self) -> int:
        return self.w.numel() + self.b.numel() + self.alpha.numel()

    def inference_overhead(self) -> int:
        return self.trainable_params()
