"""Linear probe: multinomial logistic regression on frozen, L2-normalised CLIP features.

CLIP's linear-probe protocol (Radford et al., ICML 2021, appendix A.3) as CoOp runs it for few-shot
CLIP (github.com/KaiyangZhou/CoOp ff61507, lpclip/linear_probe.py): L-BFGS logistic regression
(scikit-learn, `max_iter=1000`, L2 penalty, line 57) whose inverse strength C is searched on the
few-shot validation set: first over 1e6, 1e4, ..., 1e-6 (line 54), then `--num_step` = 8 rounds
of a bisection in log10(C) between 0.1 x and 10 x the best grid value (lines 64-92, 113-118); the C
of the last round is used. scikit-learn minimises C * sum_i CE_i + ||W||^2 / 2 with the bias
unpenalised, which is mean CE + ||W||^2 / (2 C N): `weight_decay = 1 / (C N)` in `fit_logistic`.

`init="zeros"` (the default) is that protocol: the penalty pulls W towards 0, so where the L-BFGS
starts does not change the optimum. `init="zero_shot"` pulls W towards, and starts it from, the
zero-shot classifier (100 x the text weights) instead, so a strong penalty gives back zero-shot
CLIP: the idea of CLAP (Silva-Rodriguez, Hajimiri, Ben Ayed & Dolz, "A Closer Look at the Few-Shot
Adaptation of Large Vision-Language Models", CVPR 2024), with one C searched on validation instead
of CLAP's class-wise multipliers learned by an augmented Lagrangian.

Deviations: features are fsbench's cached L2-normalised ones (CoOp's lpclip feeds raw,
un-normalised features); torch's L-BFGS with a strong-Wolfe line search instead of scikit-learn's;
each C is fitted once and reused when the bisection revisits it; `weight_decays` (empty by default)
replaces the C search by a fixed list of strengths. The validation set is the same size as
lpclip's (min(K, 4) per class, line 25), drawn from the validation split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fsbench.checks import check_at_least, check_list, check_positive, positive
from fsbench.method import FewShotData, Method, register_method
from fsbench.metrics import accuracy
from fsbench.training import best_on_validation

INITS = ("zeros", "zero_shot")


@dataclass
class LinearProbeConfig:
    """CoOp's linear-probe search (lpclip/linear_probe.py); see the module docstring."""

    c_grid: list[float] = field(default_factory=lambda: [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6])
    search_steps: int = 8  # bisection rounds in log10(C) after the grid (lpclip --num_step)
    weight_decays: list[float] = field(default_factory=list)  # non-empty: these L2 strengths, no C search
    max_iter: int = 1000  # L-BFGS iterations (full batch)
    init: str = "zeros"  # "zeros": L2 towards 0 (CoOp); "zero_shot": towards the zero-shot weights (CLAP's idea)
    logit_scale: float = 100.0  # scale of the zero-shot weights used by init="zero_shot"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be {' or '.join(map(repr, INITS))}, got {self.init!r}")
        check_list("linear_probe", "c_grid", self.c_grid, "numbers > 0", positive)
        check_at_least("linear_probe", "search_steps", self.search_steps, 0)
        if self.weight_decays:
            check_list("linear_probe", "weight_decays", self.weight_decays, "numbers >= 0",
                       lambda v: positive(v) or v == 0)
        check_at_least("linear_probe", "max_iter", self.max_iter, 1)
        check_positive("linear_probe", "logit_scale", self.logit_scale)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, weight_decay: float,
                 max_iter: int, losses: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on mean cross-entropy + weight_decay/2 * ||W - w0||^2, started at W = w0
    and b = 0 (b unpenalised); returns (W, b). `losses` receives the loss of every closure call (L-BFGS
    reads each one on the host anyway)."""
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(w0.shape[0], device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * ((w - w0) ** 2).sum()
        loss.backward()
        if losses is not None:
            losses.append(loss.item())
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def search_c(val_accuracy: Callable[[float], float], grid: list[float], steps: int) -> float:
    """CoOp's C search (lpclip/linear_probe.py:53-118): the first best C of `grid`, then `steps`
    rounds comparing the ends of [C / 10, 10 C] and halving the interval in log10 towards the
    better end (the left one on ties); returns the C chosen in the last round."""
    final = best_on_validation(grid, val_accuracy)
    left, right = final / 10, final * 10
    for _ in range(steps):
        middle = 10 ** (0.5 * (math.log10(left) + math.log10(right)))
        if val_accuracy(left) < val_accuracy(right):
            final, left = right, middle
        else:
            final, right = left, middle
    return final


@register_method("linear_probe")
class LinearProbe(Method):
    """Logistic regression on frozen features, L2 strength selected on validation."""

    Config = LinearProbeConfig
    input_kind = "features"
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    summary = "L-BFGS logistic regression on frozen features, C searched on the few-shot val set (CoOp's lpclip)"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, dev = self.config, self.ctx.device
        x, y = train.features.to(dev).float(), train.labels.to(dev)
        vx, vy = val.features.to(dev).float(), val.labels.to(dev)
        if cfg.init == "zero_shot":
            w0 = cfg.logit_scale * self.ctx.text_weights().to(dev)
        else:
            w0 = torch.zeros(self.ctx.num_classes, x.shape[1], device=dev)
        fitted: dict[float, tuple[float, torch.Tensor, torch.Tensor]] = {}
        losses: dict[float, list[float]] = {}

        def val_accuracy(weight_decay: float) -> float:
            if weight_decay not in fitted:  # each strength is fitted once (the search revisits ends)
                w, b = fit_logistic(x, y, w0, weight_decay, cfg.max_iter, losses.setdefault(weight_decay, []))
                fitted[weight_decay] = (accuracy(vx @ w.T + b, vy), w, b)
            return fitted[weight_decay][0]

        if cfg.weight_decays:
            self.c, self.weight_decay = None, best_on_validation(cfg.weight_decays, val_accuracy)
        else:
            self.c = search_c(lambda c: val_accuracy(1 / (c * len(y))), cfg.c_grid, cfg.search_steps)
            self.weight_decay = 1 / (self.c * len(y))
        self.val_accuracy, self.w, self.b = fitted[self.weight_decay]
        self.ctx.curves.start(f"L-BFGS, chosen weight decay {self.weight_decay:.3g}")  # the fit kept
        self.ctx.curves.losses(losses[self.weight_decay], [None] * len(losses[self.weight_decay]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.w.T + self.b

    def trainable_params(self) -> int:
        return self.w.numel() + self.b.numel()

    def inference_overhead(self) -> int:
        return self.w.numel() + self.b.numel()
