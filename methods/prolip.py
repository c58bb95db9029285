"""ProLIP (Fahes, Vu, Bursuc, Perez & de Charette, "CLIP's Visual Embedding Projector is a Few-shot
Cornucopia", arXiv 2410.05270): fine-tune only the image tower's final linear projection, with a
squared-distance penalty towards the pre-trained projection.

    logits = 100 * norm(z W) T^T,   loss = CE + lambda * ||W - W0||^2

with z the image features before the projection (the pooled token after the last LayerNorm), W0
CLIP's projection and T the frozen zero-shot classifier. Defaults follow the official code
(github.com/astra-vision/ProLIP at commit b43e795), validation-free setting:
- methods/ProLIP.py:30-40 and clip/model.py:228-235 the ViT projection z @ W, z = ln_post(class token);
- main.py:72-77 and :110-115 `aug_views` = 300 augmented views of each support image
  (configs/experiments/few_shot_no_val_lr1e-5_lambda_1_N.yaml:21), RandomResizedCrop scale 0.5-1
  (bicubic) + flip; ProLIP.py:181-186 epoch e trains on view (e + 1) mod 300, full batch;
- ProLIP.py:79, 201-205 the penalty nn.MSELoss(reduction="sum"), i.e. lambda times the summed
  squared difference; :140-141 lambda = 1/N with N the shots (yaml :18 `lambda_funct_1_N`);
- ProLIP.py:165-166 Adam with eps 1e-4 and a cosine schedule over the 300 epochs (yaml :11), lr 1e-5
  (yaml :16, the setting of scripts/train_4_shot_imagenet.sh); :191 logits 100 * cosine; the last
  epoch is kept (no validation);
- the frozen classifier T: utils.py:31-56 `clip_classifier`, the normalised mean of the normalised
  template embeddings of the dataset's CoOp template, and on ImageNet of the 7-template ensemble of
  datasets/imagenet.py:175-181 (`self.template`, :203; main_imagenet.py:144-145, also for ImageNet-A
  and -R's classes at :147-150; `IMAGENET_ENSEMBLE`).

Deviations: float32 training (the official code trains CLIP's fp16 projection); each image's views
are drawn from an RNG seeded by (`view_seed`, image path) and cached, so they are encoded once per
grid. The test split's pre-projection features are cached too (`eval_input = "features"` with an
`eval_encoder`), so a shots x seeds grid encodes each test image once per backbone.
Only open_clip ViT image towers with a linear `proj` are supported (the official code also tunes a
ResNet's attention-pool output projection, which fsbench does not implement).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from fsbench.backbones import Backbone
from fsbench.checks import check_at_least, check_crop_scale, check_non_negative, check_positive
from fsbench.data.templates import ensemble_templates
from fsbench.errors import ConfigError, RunFailed
from fsbench.images import Views, item_seed
from fsbench.method import Context, FewShotData, Method, register_method
from fsbench.methods.tip_adapter import augment_transform
from fsbench.training import cosine_lr, train_epochs


@dataclass
class ProLIPConfig:
    """ProLIP hyper-parameters (official validation-free config few_shot_no_val_lr1e-5_lambda_1_N.yaml)."""

    lr: float = 1e-5
    penalty: float | None = None  # lambda; None = 1 / shots (official `lambda_funct_1_N`)
    epochs: int = 300
    augment_views: int = 300  # views per support image, one per epoch in turn; 0 = un-augmented images
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # RandomResizedCrop, bicubic
    view_seed: int = 1  # seeds each image's views
    adam_eps: float = 1e-4
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        for name in ("lr", "adam_eps", "logit_scale"):
            check_positive("prolip", name, getattr(self, name))
        if self.penalty is not None:
            check_non_negative("prolip", "penalty", self.penalty)
        check_at_least("prolip", "epochs", self.epochs, 0)
        check_at_least("prolip", "augment_views", self.augment_views, 0)
        check_crop_scale("prolip", "crop_scale", self.crop_scale)


def check_projection(backbone: Backbone) -> None:
    """A one-line error unless the image tower is an open_clip ViT with a linear projection."""
    visual = backbone.model.visual
    if not isinstance(visual, VisionTransformer) or visual.proj is None:
        raise ConfigError(f"prolip needs an open_clip ViT image tower with a linear projection (visual.proj); "
                          f"{backbone.spec.name} has {type(visual).__name__} without one")


def pre_projection(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, width) image features before the projection: `model.visual(x) == pre_projection(x) @ proj`.

    Runs open_clip's VisionTransformer forward up to its pooling (`_embeds`, `transformer`, `_pool`,
    open_clip 3.x), as `VisionTransformer.forward` does, and stops before `@ proj`."""
    visual = model.visual
    pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))
    return pooled


def _encode_pre_projection(ctx: Context, fewshot: FewShotData, transform: Callable, tag: str,
                           seed: Callable | None) -> torch.Tensor:
    """(N, [views,] width) cached pre-projection features of `fewshot`'s images: the one call into the
    feature cache.

    Through the run's typed `FeatureSource`: only few-shot train/val images, cached under `tag`."""
    return ctx.features.encode(fewshot, transform, tag=tag, seed=seed, encode=pre_projection).x


def prolip_loss(z: torch.Tensor, y: torch.Tensor, proj: torch.Tensor, proj0: torch.Tensor, text: torch.Tensor,
                penalty: float, logit_scale: float) -> torch.Tensor:
    """Cross-entropy of the projected, normalised features + penalty * ||proj - proj0||^2 (summed)."""
    logits = logit_scale * F.normalize(z @ proj, dim=-1) @ text.T
    return F.cross_entropy(logits, y) + penalty * (proj - proj0).pow(2).sum()


@register_method("prolip")
class ProLIP(Method):
    """Fine-tune the image tower's output projection, penalised towards the pre-trained one."""

    Config = ProLIPConfig
    input_kind = "images"  # fit reads cached pre-projection features of the few-shot images (views)
    eval_input = "features"  # logits take cached pre-projection test features: the test split is encoded once
    eval_encoder = ("prolip-pre-projection", pre_projection)
    paper = "Fahes et al., CLIP's Visual Embedding Projector is a Few-shot Cornucopia, arXiv 2410.05270"
    summary = "ProLIP: fine-tunes CLIP's visual projection with a penalty towards its weights"
    version = 2  # issue 25: ImageNet: the official 7-template frozen classifier

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        check_projection(ctx.backbone)
        views = self._support(train)  # (N, V, width) on CPU
        y = train.labels.to(ctx.device)  # moved once; the loop's `.to` is then a no-op
        self.text = self._classifier()
        proj0 = ctx.backbone.model.visual.proj.detach().float().clone().to(ctx.device)
        proj = proj0.clone().requires_grad_(True)
        penalty = 1.0 / ctx.shots if cfg.penalty is None else cfg.penalty
        opt = torch.optim.Adam([proj], lr=cfg.lr, eps=cfg.adam_eps)
        # full batch; epoch e trains on view (e + 1) mod V (ProLIP.py:181-186)
        batches = ((views[:, (epoch + 1) % views.shape[1]], y) for epoch in itertools.count())
        train_epochs(ctx, opt, batches,
                     lambda z, yb: prolip_loss(z, yb, proj, proj0, self.text, penalty, cfg.logit_scale), cfg.epochs,
                     1, lambda e: cosine_lr(e, cfg.lr, cfg.epochs), "train prolip", amp=False)
        self.proj = proj.detach()
        if not torch.isfinite(self.proj).all():
            raise RunFailed(f"prolip: training diverged (non-finite projection) with lr={cfg.lr}")

    def _support(self, train: FewShotData) -> torch.Tensor:
        """(N, V, width) pre-projection features of the support images' augmented views."""
        cfg, backbone = self.config, self.ctx.backbone
        if cfg.augment_views == 0:
            return _encode_pre_projection(self.ctx, train, backbone.preprocess, "prolip-pre-projection", None)[:, None]
        tf = Views(augment_transform(backbone, cfg.crop_scale), cfg.augment_views)
        return _encode_pre_projection(self.ctx, train, tf, f"prolip-pre-projection-views-seed{cfg.view_seed}",
                                      lambda it: item_seed(cfg.view_seed, it.path))

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features from pre-projection features, through the tuned projection."""
        return F.normalize(z.float() @ self.proj, dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of pre-projection image features `x` (N, width) (`eval_encoder`), cached by the runner."""
        z = x.float()
        with torch.autocast(x.device.type, enabled=False):  # the tuned projection in float32, as trained
            return self.config.logit_scale * self.project(z) @ self.text.T

    def retarget(self) -> None:
        """The projection is class-agnostic: new classes only need their zero-shot text weights."""
        self.text = self._classifier()

    def _classifier(self) -> torch.Tensor:
        """The frozen zero-shot classifier T (on ImageNet the official 7-template ensemble)."""
        ctx = self.ctx
        return ctx.text_weights(ensemble_templates(ctx.dataset, ctx.templates)).to(ctx.device)

    def trainable_params(self) -> int:
        return self.proj.numel()

    def inference_overhead(self) -> int:
        return 0  # the tuned projection replaces CLIP's own, same size
