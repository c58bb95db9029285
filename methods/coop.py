"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022, arXiv 2109.01134):
learnable context vectors shared by all classes, "[SOS][V1]...[Vn][CLASS].[EOS]", trained through
the frozen text encoder on augmented images.

Defaults follow the official code (github.com/KaiyangZhou/CoOp: trainers/coop.py,
configs/trainers/CoOp/vit_b16*.yaml, COOP.md) and Dassl's optimiser defaults: 16 context
vectors drawn from N(0, 0.02) (or the words "a photo of a", then 4 vectors), class token at the
end, SGD lr 0.002 (momentum 0.9, weight decay 5e-4), one warm-up epoch at a constant 1e-5 then a
cosine over the epochs, batch 32, random resized crop (scale 0.08-1, bicubic) + flip, and
50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots (50 for every shot count on ImageNet).

This module also holds the CoOp/Dassl training recipe (`dassl_lr`, `train_epochs`) that
CoCoOp, CLIP-Adapter and TaskRes, all built on CoOp's Dassl code, reuse.

Deviations: a last partial batch of an epoch is kept (Dassl drops it when the set is larger than
a batch); mixed precision is bf16 autocast on GPU (CoOp casts CLIP to fp16); only the "end"
class-token position and the unified (not class-specific) context are implemented.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.backbones import Backbone
from fsbench.errors import RunFailed
from fsbench.images import augmented_batches
from fsbench.method import Context, FewShotData, Method, register_method
from fsbench.text import encode_token_embeddings, truncate_tokens
from methods.lora import train_transform

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CoOpConfig:
    """CoOp hyper-parameters (official ViT-B/16 configs, M=16, "end")."""

    n_ctx: int = 16  # context vectors; ignored when `init` gives words
    init: str = "random"  # "random" = N(0, 0.02); or init words, e.g. "a photo of a" (n_ctx = their tokens)
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    epochs: int = 0  # 0 = the paper's per-shot schedule (coop_epochs)
    warmup_epochs: int = 1  # constant warm-up epochs before the cosine
    warmup_lr: float = 1e-5
    logit_scale: float = 100.0  # exp(CLIP's learned temperature) for the OpenAI weights
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # Dassl RandomResizedCrop

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.batch_size < 1 or self.epochs < 0 or self.warmup_epochs < 0:
            raise ValueError("need n_ctx >= 1, batch_size >= 1, epochs >= 0 and warmup_epochs >= 0")
        if not self.init.strip():
            raise ValueError('init must be "random" or initialisation words such as "a photo of a"')


def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's schedule (COOP.md): 50 epochs for 1 shot, 100 for 2-4, 200 for 8-16; ImageNet 50."""
    if dataset == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def dassl_lr(epoch: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Learning rate of `epoch` under Dassl's ConstantWarmupScheduler wrapping CosineAnnealingLR.

    Warm-up epochs run at `warmup_lr`; the cosine (period `epochs`) starts after them, so epoch
    `warmup_epochs` runs at the full `lr`.
    """
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def feature_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator) -> Batches:
    """Endless epochs of shuffled (features, labels) batches."""
    while True:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield x[idx.to(x.device)], y[idx.to(y.device)]


def train_epochs(ctx: Context, opt: torch.optim.Optimizer, batches: Batches,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], epochs: int, steps: int,
                 lr_of_epoch: Callable[[int], float], desc: str) -> None:
    """The Dassl loop: per epoch set the lr, then `steps` updates of `loss_fn(x, y)` under autocast."""
    scaler = torch.amp.GradScaler(enabled=ctx.amp_dtype == torch.float16)
    for epoch in ctx.track(range(epochs), epochs, desc):
        for group in opt.param_groups:
            group["lr"] = lr_of_epoch(epoch)
        finite = torch.ones((), dtype=torch.bool, device=ctx.device)
        for _ in range(steps):
            x, y = next(batches)
            with ctx.autocast():
                loss = loss_fn(x.to(ctx.device, non_blocking=True), y.to(ctx.device))
            finite &= torch.isfinite(loss)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if not finite:  # checked once per epoch: a check is a host-device sync
            raise RunFailed(f"{desc}: non-finite loss in epoch {epoch + 1} of {epochs}")


@dataclass
class Prompts:
    """Frozen pieces of the class prompts around the context: [SOS] | ctx | [CLASS].[EOS]..."""

    prefix: torch.Tensor  # (C, 1, W): the SOS embedding
    suffix: torch.Tensor  # (C, L - 1 - n_ctx, W): class tokens, ".", EOT (and padding)
    eot: torch.Tensor  # (C,): EOT position per class
    init: torch.Tensor  # (n_ctx, W): initial context vectors


@torch.no_grad()
def build_prompts(backbone: Backbone, classnames: list[str], n_ctx: int, init: str,
                  device: torch.device, generator: torch.Generator) -> Prompts:
    """Tokenise "<ctx placeholder> <class>." and split the embeddings around the context slots."""
    model = backbone.model
    if init == "random":
        width = model.token_embedding.weight.shape[1]
        ctx0 = torch.randn(n_ctx, width, generator=generator) * 0.02
        placeholder = " ".join(["X"] * n_ctx)
    else:
        words = backbone.tokenize([init.replace("_", " ")]).to(device)
        n_ctx = int(words.argmax(-1).item()) - 1  # tokens between SOS and EOT
        ctx0 = model.token_embedding(words)[0, 1:1 + n_ctx].float().cpu()
        placeholder = init.replace("_", " ")
    texts = [f"{placeholder} {name.replace('_', ' ')}." for name in classnames]
    tokens = truncate_tokens(backbone.tokenize(texts)).to(device)
    emb = model.token_embedding(tokens)
    return Prompts(emb[:, :1], emb[:, 1 + n_ctx:], tokens.argmax(-1), ctx0.to(device))


def encode_prompts(model: nn.Module, prompts: Prompts, ctx: torch.Tensor) -> torch.Tensor:
    """Normalised text features of the class prompts: context (n_ctx, W) gives (C, D); a batch
    of contexts (B, n_ctx, W) gives (B, C, D) from one text-encoder call."""
    lead, n_cls = ctx.shape[:-2], prompts.prefix.shape[0]
    ctx = ctx.reshape(-1, 1, *ctx.shape[-2:]).expand(-1, n_cls, -1, -1)  # (B, C, n_ctx, W)
    b = ctx.shape[0]
    x = torch.cat([prompts.prefix.expand(b, -1, -1, -1), ctx.to(prompts.prefix.dtype),
                   prompts.suffix.expand(b, -1, -1, -1)], dim=2)
    feats = encode_token_embeddings(model, x.flatten(0, 1), prompts.eot.repeat(b))
    return feats.view(*lead, n_cls, feats.shape[-1])


def image_batches(method: Method, train: FewShotData, batch_size: int, crop_scale: list[float]) -> Batches:
    """Augmented training images (random resized crop + flip), decoded once."""
    bb = method.ctx.backbone
    tf = train_transform(bb.image_size, bb.mean, bb.std, crop_scale)
    return augmented_batches(train.items, train.image_root, tf, batch_size, method.ctx.generator())


@torch.no_grad()
def frozen_image_features(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    return F.normalize(backbone.model.encode_image(images).float(), dim=-1)


@register_method("coop")
class CoOp(Method):
    """Unified learnable context in front of the class name; only the context is trained."""

    Config = CoOpConfig
    input_kind = "images"
    paper = "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022"
    summary = "CoOp: 16 learnable context vectors shared by all classes, text encoder frozen"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self.prompts = build_prompts(ctx.backbone, ctx.classnames, cfg.n_ctx, cfg.init, ctx.device,
                                     ctx.generator(1))
        self.context = nn.Parameter(self.prompts.init.clone())
        epochs = cfg.epochs or coop_epochs(ctx.shots, ctx.data.name)
        opt = torch.optim.SGD([self.context], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            feats = frozen_image_features(ctx.backbone, images)
            text = encode_prompts(ctx.backbone.model, self.prompts, self.context).float()
            return F.cross_entropy(cfg.logit_scale * feats @ text.T, labels)

        train_epochs(ctx, opt, image_batches(self, train, cfg.batch_size, cfg.crop_scale), loss_fn, epochs,
                     steps_per_epoch(len(train), cfg.batch_size),
                     lambda e: dassl_lr(e, cfg.lr, epochs, cfg.warmup_epochs, cfg.warmup_lr), "train coop")
        self._finish()

    def _finish(self) -> None:
        with torch.no_grad(), self.ctx.autocast():
            self.text = encode_prompts(self.ctx.backbone.model, self.prompts, self.context).float()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.config.logit_scale * frozen_image_features(self.ctx.backbone, x) @ self.text.T

    def trainable_params(self) -> int:
        return self.context.numel()

    def inference_overhead(self) -> int:
        return self.context.numel()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"context": self.context.detach()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        ctx = self.ctx
        n_ctx = tensors["context"].shape[0]
        self.prompts = build_prompts(ctx.backbone, ctx.classnames, n_ctx, self.config.init, ctx.device,
                                     ctx.generator(1))
        self.context = nn.Parameter(tensors["context"].to(ctx.device), requires_grad=False)
        self._finish()
