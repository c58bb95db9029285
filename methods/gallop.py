"""GalLoP (Lafon, Ramzi, Rambour, Audebert & Thome, "GalLoP: Learning Global and Local Prompts for
Vision-Language Models", ECCV 2024, arXiv 2407.01400): N global text prompts scored against the image
feature and M local text prompts scored against the image's local (patch) features, each local prompt
reading the mean of its own top-k patches; prompt dropout on the global prompts; CLIP frozen.

    g_n(c) = text feature of "[SOS] <global prompt n> <class> [EOT]"   (N = 4; local prompts l_m: M = 4)
    z = image feature; z_p = proj(W ln_post(v_p)): patch p of the last block's value path, W learned
    global_logits[c, n] = cos(z, g_n(c));   local_logits[p, c, m] = cos(z_p, l_m(c))
    local_m(c) = mean of the k_m largest local_logits[:, c, m] over patches   (k = 5, 10, 15, 20)
    loss = CE(s mean_{n in D} global_logits, y) + mean_m CE(s local_m, y)   (D: 1 random prompt per image)
    scores = s (mean_n global_logits + mean_m local_m) / 2

Official code: github.com/MarcLafon/gallop (commit f75999e):
- gallop/vlprompt/gallop.py:118-136 the prompts: `n_global_prompts` and `n_local_prompts` tensors of
  `n_token_context` vectors, as many as the tokens of the template "A photo of a" (train.py:267: 4),
  all initialised to that template's embedding (:356-370); :217-245, :176-189 the prompt sits after SOS,
  before the tokenised class name (no period), pooled at the shifted EOT; the text features of every
  prompt are L2-normalised (:275-276);
- gallop/vlprompt/clip_local.py:200-213 the local features: in the last vision block, the value path
  `v = out_proj(v_proj(ln_1(x))) + x; v = v + mlp(ln_2(v))` (no attention mixing), returned for the last
  block only (:234-240); :294-298 `ln_post`, the patch positions; gallop.py:247-257 then `local_proj`
  (Linear(vision width, bias=False), identity init, :24-35, :113) and the visual projection;
- gallop/vlprompt/gallop.py:278-289 cosine logits; tools/topk_reduce.py:9-32 the top-k mean over patches,
  k per local prompt (maxk capped at the patch count); tools/global_local_loss.py:40-59 the loss: the local
  CE over every (image, local prompt) pair, the prompt dropout keeping `max(N - int(p N), 1)` global
  prompts drawn with replacement per image (`torch.randint`, p = 0.75), their mean logit in one CE; the sum
  of both, scaled by exp(logit_scale) (train.py:57);
- gallop/vlprompt/gallop.py:424-444 inference: the mean over global prompts and the mean over local prompts
  of their top-k scores, averaged;
- train.py:231-239, :324-332 and scripts/run_*.sh:6-25: SGD lr 0.002, momentum 0.9, weight decay 0.01 on
  every trainable parameter (lib/get_params_group.py:7-15), cosine over the epochs stepped per epoch
  (:89, :327), no warm-up (--warmup_epoch 0), fp16 autocast with a GradScaler; 200 epochs (50 on
  ImageNet), batch 32 (128 on ImageNet and SUN397, 10 on EuroSAT); 4 global + 4 local prompts, top-k
  5 10 15 20, both losses, `local_proj` learned; datasets/tools/transforms.py:29-41 random resized crop
  (0.08-1, bicubic) + flip; get_loader.py:30-47 shuffled, last partial batch dropped; the last epoch is
  evaluated (train.py:351).

Deviations (docs/methods.md, "gallop"): bf16 autocast on GPU; the prompt dropout draws from a generator
seeded by the run's seed, not the global RNG; a train set smaller than one batch trains on one batch of
everything (Dassl's rule; the official loader would yield no batch); the layer scale of open_clip blocks
that have one is applied on the value path (none on OpenAI CLIP); text-tower checkpointing (ImageNet, SUN397 as
the official scripts) keeps one prompt's activations at a time, not every few blocks; the OOD scores (GL-MCM) are
not exposed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsbench.augment import train_transform
from fsbench.backbones import BackboneInfo
from fsbench.checks import check_at_least, check_crop_scale, check_fraction, check_positive
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, Method, register_method
from fsbench.prompts import LearnedModule, Prompts, build_prompts, encode_prompts
from fsbench.towers import backbone_support, tower_support, vision_depth, vision_tokens
from fsbench.training import DasslRecipe, check_recipe, dassl_steps, fewshot_image_batches, train_epochs

OFFICIAL_BATCH = {"imagenet": 128, "sun397": 128, "eurosat": 10}  # scripts/run_{imagenet,sun,eurosat}.sh:7
DEFAULT_BATCH = 32  # the other scripts/run_*.sh:7
SHORT_SCHEDULE = {"imagenet": 50}  # scripts/run_imagenet.sh:6; 200 in the other scripts
CHECKPOINTED = ("imagenet", "sun397")  # scripts/run_{imagenet,sun}.sh:11 --checkpointing_segments 5 / 8; others 0


@dataclass
class GalLoPConfig(DasslRecipe):
    """GalLoP hyper-parameters (official train.py and scripts/run_*.sh); recipe fields from `DasslRecipe`."""

    lr: float = 0.002  # --lr_init (train.py:235, scripts :13)
    momentum: float = 0.9  # train.py:236
    weight_decay: float = 1e-2  # train.py:237
    batch_size: int | None = None  # None = the official script's: 128 on ImageNet / SUN397, 10 on EuroSAT, else 32
    epochs: int = 0  # 0 = the official script's: 50 on ImageNet, else 200
    warmup_epochs: int = 0  # scripts :14 --warmup_epoch 0
    n_global: int = 4  # global prompts (scripts :20)
    n_local: int = 4  # local prompts (scripts :24)
    topk: list[int] = field(default_factory=lambda: [5, 10, 15, 20])  # patches per local prompt (scripts :25)
    dropout: float = 0.75  # prompt dropout rate over the global prompts (train.py:219, global_local_loss.py:21)
    init: str = "a photo of a"  # the template the prompts start from (train.py:267 "A photo of a")
    global_loss: bool = True  # scripts :18
    local_loss: bool = True  # scripts :21
    logit_scale: float = 100.0  # exp(CLIP's learned temperature) for the OpenAI weights (train.py:57)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # transforms.py:32
    # gradient checkpointing of the text tower in training (memory, not numbers): "auto" = as the official scripts,
    # on for ImageNet and SUN397 (8 prompts x 1000 / 397 classes per step), else off; "on"; "off"
    checkpoint_text: str = "auto"

    section: ClassVar[str] = "gallop"

    def __post_init__(self) -> None:
        # batch_size None is the per-dataset placeholder; the recipe's other checks apply as usual
        check_recipe(self.section, dataclasses.replace(self, batch_size=DEFAULT_BATCH) if self.batch_size is None
                     else self)
        for name in ("n_global", "n_local"):
            check_at_least(self.section, name, getattr(self, name), 1)
        check_fraction(self.section, "dropout", self.dropout, one=True)
        check_positive(self.section, "logit_scale", self.logit_scale)
        check_crop_scale(self.section, "crop_scale", self.crop_scale)
        if not self.topk or min(self.topk) < 1:
            raise ConfigError(f"gallop.topk must list patch counts >= 1, got {self.topk}")
        if len(self.topk) not in (1, self.n_local):
            raise ConfigError(f"gallop.topk has {len(self.topk)} values; give one or one per local prompt "
                              f"(n_local = {self.n_local})")
        if not (self.global_loss or self.local_loss):
            raise ConfigError("gallop: global_loss and local_loss cannot both be false")
        if self.checkpoint_text not in ("auto", "on", "off"):
            raise ConfigError(f'gallop.checkpoint_text must be "auto", "on" or "off", got {self.checkpoint_text!r}')
        if not self.init.strip() or self.init == "random":
            raise ConfigError('gallop.init must be initialisation words such as "a photo of a"')


class GalLoPPrompts(nn.Module):
    """The learned parts: global prompts (N, n_ctx, W), local prompts (M, n_ctx, W), all starting from the
    template's embedding (gallop.py:356-370), and `local_proj`, identity-initialised (gallop.py:24-35)."""

    def __init__(self, init: torch.Tensor, n_global: int, n_local: int, vision_width: int):
        super().__init__()
        self.global_prompts = nn.Parameter(init.float().expand(n_global, -1, -1).clone())
        self.local_prompts = nn.Parameter(init.float().expand(n_local, -1, -1).clone())
        self.local_proj = nn.Linear(vision_width, vision_width, bias=False)
        with torch.no_grad():
            self.local_proj.weight.copy_(torch.eye(vision_width))


def value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's output with self-attention replaced by the value projection alone (clip_local.py:200-213):
    v = x + out_proj(v_proj(ln_1(x))); v + mlp(ln_2(v)). `x` (B, L, W) is the block's input."""
    attn = block.attn
    y = block.ln_1(x)
    if hasattr(attn, "v_proj"):  # fsbench.attention.SplitAttention
        v = attn.v_proj(y)
    else:  # nn.MultiheadAttention: the last third of in_proj
        width = y.shape[-1]
        bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
        v = F.linear(y, attn.in_proj_weight[2 * width:], bias)
    v = x + getattr(block, "ls_1", nn.Identity())(attn.out_proj(v))
    return v + getattr(block, "ls_2", nn.Identity())(block.mlp(block.ln_2(v)))


def local_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image features (B, D), local features (B, HW, W)), unnormalised: the pooled, projected feature as
    `encode_image`, and `ln_post` of the last block's value path at the patch positions (clip_local.py:294-298),
    before `local_proj` and the visual projection."""
    visual, last = model.visual, vision_depth(model) - 1
    seen: list[torch.Tensor] = []

    def hook(i: int, x: torch.Tensor) -> torch.Tensor:
        if i == last:
            seen.append(x)
        return x

    pooled, _ = vision_tokens(model, images, hook=hook)
    n_patches = visual.positional_embedding.shape[0] - 1
    local = visual.ln_post(value_path(visual.transformer.resblocks[last], seen[0]))
    return pooled, local[:, 1:1 + n_patches]


def topk_reduce(local_logits: torch.Tensor, topk: list[int]) -> torch.Tensor:
    """(B, C, M) from (B, P, C, M): per local prompt m, the mean of its `topk[m]` largest patch logits
    (tools/topk_reduce.py:9-32; one k for all prompts if `topk` has one value; at most P patches)."""
    top = local_logits.topk(min(max(topk), local_logits.shape[1]), dim=1)[0]
    if len(topk) == 1:
        return top.mean(dim=1)
    return torch.stack([top[:, :k, :, m].mean(dim=1) for m, k in enumerate(topk)], dim=-1)


def dropout_index(batch: int, n_prompts: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(B, keep) global prompts kept per image: keep = max(N - int(rate N), 1), drawn with replacement
    (global_local_loss.py:48-49)."""
    keep = max(n_prompts - int(rate * n_prompts), 1)
    return torch.randint(n_prompts, (batch, keep), generator=generator)


def gallop_loss(global_logits: torch.Tensor | None, local_logits: torch.Tensor | None, labels: torch.Tensor,
                logit_scale: float, topk: list[int], keep: torch.Tensor | None) -> torch.Tensor:
    """GalLoP's loss (global_local_loss.py:40-59): CE on the mean of the kept global prompts' cosines (B, C, N)
    (`keep` (B, K) from `dropout_index`) + CE over every local prompt's top-k cosine (B, P, C, M); a None
    input leaves its term out."""
    loss = torch.zeros((), device=labels.device)
    if local_logits is not None:
        local = topk_reduce(local_logits, topk)
        loss = loss + F.cross_entropy(logit_scale * local, labels.unsqueeze(-1).expand(-1, local.shape[-1]))
    if global_logits is not None:
        index = keep.to(global_logits.device).unsqueeze(1).expand(-1, global_logits.shape[1], -1)
        loss = loss + F.cross_entropy(logit_scale * global_logits.gather(-1, index).mean(-1), labels)
    return loss


def gallop_scores(global_logits: torch.Tensor, local_logits: torch.Tensor, topk: list[int]) -> torch.Tensor:
    """(B, C) cosine scores at inference: mean over global prompts and mean over local prompts of their
    top-k, averaged (gallop.py:430-442)."""
    return (global_logits.mean(-1) + topk_reduce(local_logits, topk).mean(-1)) / 2


@register_method("gallop")
class GalLoP(LearnedModule, Method):
    """Global prompts on the image feature, local prompts on the top-k patch features, prompt dropout."""

    Config = GalLoPConfig
    input_kind = "images"  # the local features need the patch tokens: test images go through the tower
    paper = "Lafon et al., GalLoP: Learning Global and Local Prompts for Vision-Language Models, ECCV 2024"
    summary = "GalLoP: 4 global + 4 local prompts, top-k (5-20) patch alignment, prompt dropout"

    @classmethod
    def supports(cls, backbone: BackboneInfo) -> str | None:
        return backbone_support(backbone)

    def make_prompts(self) -> Prompts:
        """"[SOS] <context> <class> [EOT]" for the current classes (gallop.py:222-229: no period)."""
        cfg, ctx = self.config, self.ctx
        return build_prompts(ctx.backbone, ctx.classnames, 0, cfg.init, ctx.device, ctx.generator(1), end="")

    def _build(self) -> None:
        cfg, ctx = self.config, self.ctx
        model = ctx.backbone.model
        reason = tower_support(model)
        if reason:
            raise ConfigError(f"gallop cannot run on {ctx.backbone.spec.name}: {reason}")
        self.prompts = self.make_prompts()
        width = model.visual.transformer.width
        self.learner = GalLoPPrompts(self.prompts.init, cfg.n_global, cfg.n_local, width).to(ctx.device)

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self.config = cfg = dataclasses.replace(  # the stored config records what ran
            cfg, epochs=cfg.epochs or SHORT_SCHEDULE.get(ctx.dataset, 200),
            batch_size=OFFICIAL_BATCH.get(ctx.dataset, DEFAULT_BATCH) if cfg.batch_size is None else cfg.batch_size,
            checkpoint_text=("on" if ctx.dataset in CHECKPOINTED else "off") if cfg.checkpoint_text == "auto"
            else cfg.checkpoint_text)
        self._build()
        self._dropout = ctx.generator(2)
        bb = ctx.backbone
        batches = fewshot_image_batches(train, train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale),
                                        cfg.batch_size, ctx.generator())
        train_epochs(ctx, cfg.optimizer(self.learner.parameters()), batches, self.loss, cfg.epochs,
                     dassl_steps(len(train), cfg.batch_size), cfg.schedule(cfg.epochs), "train gallop")
        self._finish()

    def cosines(self, images: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (B, C, N), local (B, P, C, M)) cosine logits of images against (global, local) text
        features (gallop.py:278-289)."""
        pooled, local = local_features(self.ctx.backbone.model, images)
        local = self.learner.local_proj(local)
        proj = self.ctx.backbone.model.visual.proj
        if proj is not None:
            local = local @ proj
        image, local = F.normalize(pooled.float(), dim=-1), F.normalize(local.float(), dim=-1)
        glob = torch.einsum("bd,knd->bkn", image, text[0])
        return glob, torch.einsum("bpd,kmd->bpkm", local, text[1])

    def loss(self, images: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """GalLoP's loss on a batch; `keep` (B, K) fixes the prompt dropout (default: drawn from the run's
        generator)."""
        cfg = self.config
        glob, local = self.cosines(images, self.text_features())
        if keep is None:
            keep = dropout_index(len(labels), cfg.n_global, cfg.dropout, self._dropout)
        return gallop_loss(glob if cfg.global_loss else None, local if cfg.local_loss else None, labels,
                           cfg.logit_scale, cfg.topk, keep)

    def text_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global (C, N, D), local (C, M, D)) L2-normalised features of every prompt for every class."""
        return self._encode(self.learner.global_prompts).transpose(0, 1), \
            self._encode(self.learner.local_prompts).transpose(0, 1)

    def _encode(self, contexts: torch.Tensor) -> torch.Tensor:
        """(K, C, D) features of K contexts; with `checkpoint_text` "on" and gradients, one prompt's text
        activations at a time are kept (recomputed in the backward pass; the same values)."""
        model = self.ctx.backbone.model
        if self.config.checkpoint_text != "on" or not torch.is_grad_enabled():
            return encode_prompts(model, self.prompts, contexts).float()
        return torch.cat([checkpoint(encode_prompts, model, self.prompts, c[None], use_reentrant=False)
                          for c in contexts]).float()

    def retarget(self) -> None:
        """Unseen classes: the learned prompts before their names."""
        self.prompts = self.make_prompts()
        self._finish()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of a batch of preprocessed images."""
        return self.config.logit_scale * gallop_scores(*self.cosines(x, self.text), self.config.topk)
