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
accuracy (last one on ties) is kept.

Deviations: float32 throughout (the official code runs CLIP's fp16); features of the
un-augmented images from the cache (the official code encodes one random crop per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsbench.method import FewShotData, Method, register_method


@dataclass
class LPPlusPlusConfig:
    """LP++ hyper-parameters (official code, `case 1`)."""

    epochs: int = 300  # full-batch steps on the visual prototypes
    alpha_every: int = 10  # epochs between two steps on the blending weights
    alpha_init_scale: float = 250.0  # alpha_0 = scale x mean similarity of samples to their class text
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.alpha_every < 1:
            raise ValueError("need epochs >= 0 and alpha_every >= 1")


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
    paper = "Huang et al., LP++: A Surprisingly Strong Linear Probe for Few-Shot CLIP, CVPR 2024"
    summary = "LP++: linear probe blending visual prototypes with text weights, Lipschitz step sizes"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, dev, n_cls = self.config, self.ctx.device, self.ctx.num_classes
        x, y = train.features.to(dev).float(), train.labels.to(dev)
        vx, vy = val.features.to(dev).float(), val.labels.to(dev)
        self.text = self.ctx.text_weights().to(dev)
        text_logits = x @ self.text.T
        bound = 1 / math.sqrt(x.shape[1])  # nn.Linear's default bias init
        bias0 = (torch.rand(n_cls, generator=self.ctx.generator(1)) * 2 - 1) * bound
        w = class_sums(x, y, n_cls).requires_grad_(True)
        b = bias0.to(dev).requires_grad_(True)
        alpha = torch.full((n_cls,), init_blending(text_logits, y, n_cls, cfg.alpha_init_scale), device=dev,
                           requires_grad=True)
        opt = torch.optim.SGD([w, b], lr=lr_prototypes(x), momentum=cfg.momentum)
        lr_alpha = lr_blending(text_logits)
        best_acc = None
        self.w, self.b, self.alpha = w.detach(), b.detach(), alpha.detach()
        for epoch in self.ctx.track(range(cfg.epochs), cfg.epochs, "train lp_plus_plus"):
            loss = F.cross_entropy(x @ w.T + b + alpha * text_logits, y)
            opt.zero_grad()  # zeroes W and b only: alpha's gradient accumulates, as in the official code
            loss.backward()
            opt.step()
            if (epoch + 1) % cfg.alpha_every == 0:
                with torch.no_grad():
                    alpha -= lr_alpha * alpha.grad
            with torch.no_grad():
                acc = (self._logits(vx, w, b, alpha).argmax(-1) == vy).float().mean().item()
            if best_acc is None or acc >= best_acc:
                best_acc = acc
                self.w, self.b, self.alpha = w.detach().clone(), b.detach().clone(), alpha.detach().clone()

    def _logits(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return x @ w.T + b + alpha * (x @ self.text.T)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x.float(), self.w, self.b, self.alpha)

    def trainable_params(self) -> int:
        return self.w.numel() + self.b.numel() + self.alpha.numel()

    def inference_overhead(self) -> int:
        return self.trainable_params()
