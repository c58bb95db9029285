"""Linear probe: multinomial logistic regression on frozen, L2-normalised CLIP features."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fsbench.method import FewShotData, Method, register_method


@dataclass
class LinearProbeConfig:
    """CLIP's linear-probe protocol (Radford et al. 2021, appendix A.3): L-BFGS logistic
    regression whose L2 strength is chosen on validation data.

    We search `weight_decays` on the few-shot validation set (min(K, 4) shots per class),
    never on test, and initialise the weights from the zero-shot text classifier, which makes
    the 1-shot probe start from zero-shot instead of from chance (as LP++ and CLAP argue).
    """

    weight_decays: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    max_iter: int = 300  # L-BFGS iterations (full batch)
    init: str = "text"  # "text": zero-shot weights x logit scale; "zeros"
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.init not in ("text", "zeros"):
            raise ValueError(f"init must be 'text' or 'zeros', got {self.init!r}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ValueError("weight_decays must be a non-empty list of values >= 0")


def fit_logistic(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, weight_decay: float,
                 max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on mean cross-entropy + weight_decay/2 * ||W - 0||^2; returns (W, b)."""
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(w0.shape[0], device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


@register_method("linear_probe")
class LinearProbe(Method):
    """Logistic regression on frozen features, L2 strength selected on validation."""

    Config = LinearProbeConfig
    input_kind = "features"
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    summary = "L-BFGS logistic regression on frozen features, L2 picked on the few-shot val set"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, dev = self.config, self.ctx.device
        x, y = train.features.to(dev).float(), train.labels.to(dev)
        vx, vy = val.features.to(dev).float(), val.labels.to(dev)
        if cfg.init == "text":
            w0 = cfg.logit_scale * self.ctx.text_weights().to(dev)
        else:
            w0 = torch.zeros(self.ctx.num_classes, x.shape[1], device=dev)
        best = None
        for wd in cfg.weight_decays:
            w, b = fit_logistic(x, y, w0, wd, cfg.max_iter)
            val_acc = ((vx @ w.T + b).argmax(-1) == vy).float().mean().item()
            if best is None or val_acc > best[0]:
                best = (val_acc, wd, w, b)
        self.val_accuracy, self.weight_decay, self.w, self.b = best

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.w.T + self.b

    def trainable_params(self) -> int:
        return self.w.numel() + self.b.numel()

    def inference_overhead(self) -> int:
        return self.w.numel() + self.b.numel()
