"""TCP (Yao, Zhang & Xu, "TCP: Textual-based Class-aware Prompt tuning for Visual-Language Model", CVPR 2024,
arXiv 2311.18231): CoOp's shared context plus class-aware tokens that a small network (the Textual Knowledge
Embedding, TKE) maps from each class's frozen text feature, inserted deep in the text tower, with KgCoOp's
consistency term.

    t_c = frozen feature of the hand-crafted prompt of class c (L2-normalised)
    tokens_c = W2 QuickGELU(W1 t_c + b1) + b2, reshaped to (4, text width)
    before text block 8, the 4 positions after SOS of class c's prompt become tokens_c
    loss = CE(s f v^T, y) + 8.0 * (1 - mean_c cos(v_c, t_c))

Official code: github.com/htyao89/Textual-based_Class-aware_prompt_tuning (commit bd97bec):
- trainers/tcp.py:113-154 context: CTX_INIT false (configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml:31-33) ->
  `n_ctx` vectors from N(0, 0.02), N_CTX 4 (scripts/base2new_train.sh:12); :60-76, :176-186 the learned prompt
  "X X X X <class><dataset suffix>" (", a type of pet." etc.), the context replacing the first 4 tokens;
- trainers/tcp.py:156-166 t_c: the dataset's hand-crafted prompt (:42-58) through the frozen CLIP, normalised;
  :168-173, :194-195 TKE = Linear(D, D/4) -> QuickGELU -> Linear(D/4, 4 x width), reshaped to 4 tokens;
- trainers/clip_text/model.py:262-278 the tokens replace positions 1..4 before text block 8 (`layers=[8]`,
  blend `weights=[1.0]`); trainers/tcp.py:91-104 the text encoder passes them;
- trainers/tcp.py:240-258 logits s f v^T on the frozen image features, CE + 8.0 x (1 - mean cosine)
  (CosineSimilarity eps 1e-7); :287-303 the context and the TKE train (the prompt learner), CLIP frozen;
- configs/trainers/TCP/vit_b16_ep100_ctxv1.yaml: batch 32 (:3), Adam lr 0.002 (:16-17), 50 epochs (:18),
  cosine after one constant warm-up epoch at 1e-5 (:19-22), random resized crop + flip (:13); README.md:22-34
  Adam's eps 1e-3 (Dassl's weight decay 5e-4 and betas (0.9, 0.999)). The repository ships this one
  config and base-to-new scripts; fsbench uses it for every shot count.

Deviations: bf16 autocast on GPU (the official runs CLIP and the TKE in fp16); parameters initialised from a
generator seeded by the run's seed; the hand-crafted features come from the same backbone (the official
loads a second CLIP); the StanfordCars prompt ends with "." (the official template has none); on a backbone
without a begin token (SigLIP) the class-aware tokens replace the context's positions 0..3; a block beyond
the text tower is capped at its last block (the stored config says so); datasets the official code does not
know get "<class>." and their own zero-shot template.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.augment import train_transform
from fsbench.checks import check_at_least, check_crop_scale, check_fraction, check_non_negative, check_positive
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, Method, register_method
from fsbench.prompt_hooks import block_tokens_hook
from fsbench.prompts import LearnedModule, Prompts, assemble_prompts, build_prompts, frozen_image_features
from fsbench.towers import TextPrompted, text_depth, text_forward
from fsbench.training import DasslRecipe, dassl_steps, fewshot_image_batches, train_epochs

# trainers/tcp.py:60-76: the learned prompt per dataset after the context ("X X X X {}, a type of pet.");
# UCF101 and ImageNet's "a photo of a ..." lose their first 4 tokens to the context as well
PROMPT_SUFFIX = {
    "oxford_pets": "{}, a type of pet", "oxford_flowers": "{}, a type of flower",
    "fgvc_aircraft": "{}, a type of aircraft", "dtd": "{} texture", "eurosat": "{}",
    "stanford_cars": "{}, a type of car", "food101": "{}, a type of food", "sun397": "{}", "caltech101": "{}",
    "ucf101": "person doing {}", "imagenet": "{}",
}
# trainers/tcp.py:42-58: the hand-crafted prompt of t_c per dataset
HANDCRAFTED = {
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of an aircraft {}.", "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.", "stanford_cars": "a photo of a {}.",
    "food101": "a photo of a {}, a type of food.", "sun397": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.", "imagenet": "a photo of a {}.",
}


@dataclass
class TCPConfig(DasslRecipe):
    """TCP hyper-parameters (official vit_b16_ep100_ctxv1.yaml, base2new_train.sh); Adam, not SGD
    (`momentum` is unused)."""

    lr: float = 0.002
    batch_size: int = 32
    epochs: int = 50
    n_ctx: int = 4  # shared context vectors
    init: str = "random"  # "random" = N(0, 0.02) (CTX_INIT false), or initialisation words
    class_tokens: int = 4  # class-aware tokens per class (TKE output 4 x width)
    reduction: int = 4  # TKE hidden width = feature dim / reduction
    block: int = 8  # text block before which the class-aware tokens enter
    blend: float = 1.0  # weight of the class-aware tokens against the tokens they replace
    weight: float = 8.0  # weight of the knowledge-guided consistency term
    adam_eps: float = 1e-3  # README.md:22-34
    logit_scale: float = 100.0  # exp(CLIP's learned temperature) for the OpenAI weights
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])

    section: ClassVar[str] = "tcp"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epochs", "n_ctx", "class_tokens", "reduction"):
            check_at_least(self.section, name, getattr(self, name), 1)
        check_at_least(self.section, "block", self.block, 0)
        check_fraction(self.section, "blend", self.blend, one=True)
        check_non_negative(self.section, "weight", self.weight)
        check_positive(self.section, "adam_eps", self.adam_eps)
        check_positive(self.section, "logit_scale", self.logit_scale)
        check_crop_scale(self.section, "crop_scale", self.crop_scale)
        if not self.init.strip():
            raise ConfigError('tcp.init must be "random" or initialisation words such as "a photo of a"')

    def optimizer(self, params) -> torch.optim.Adam:
        """Dassl's Adam (betas 0.9, 0.999; weight decay 5e-4) with TCP's eps 1e-3."""
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.999),
                                eps=self.adam_eps)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x) (trainers/tcp.py:109-111)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class TCPLearner(nn.Module):
    """The shared context (n_ctx, W) and the TKE, feature dim D -> D / reduction -> class_tokens x W."""

    def __init__(self, context: torch.Tensor, dim: int, reduction: int, class_tokens: int, seed: int):
        super().__init__()
        width = context.shape[1]
        self.class_tokens = class_tokens
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.context = nn.Parameter(context.clone().float())
            self.tke = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(dim, dim // reduction)), ("relu", QuickGELU()),
                ("linear2", nn.Linear(dim // reduction, class_tokens * width))]))

    def tokens(self, class_features: torch.Tensor) -> torch.Tensor:
        """(C, class_tokens, W) class-aware tokens of (C, D) frozen class features (trainers/tcp.py:194-195)."""
        out = self.tke(class_features)
        return out.reshape(out.shape[0], self.class_tokens, -1)


def handcrafted_template(dataset: str, templates: list[str]) -> str:
    """TCP's hand-crafted prompt for `dataset`, or the dataset's own first template."""
    return HANDCRAFTED.get(dataset, templates[0])


@register_method("tcp")
class TCP(TextPrompted, LearnedModule, Method):
    """CoOp context + class-aware tokens from the frozen class text features, with KgCoOp's consistency."""

    Config = TCPConfig
    input_kind = "images"
    eval_input = "features"  # the image tower is frozen: logits score cached features
    paper = "Yao et al., TCP: Textual-based Class-aware Prompt tuning for Visual-Language Model, CVPR 2024"
    summary = "TCP: CoOp context + class-aware tokens from frozen class embeddings (block 8) + KgCoOp term"

    def make_prompts(self) -> Prompts:
        """"<context> <class><suffix>." for the current classes (trainers/tcp.py:60-76)."""
        cfg, ctx = self.config, self.ctx
        suffix = PROMPT_SUFFIX.get(ctx.dataset, "{}")
        names = [suffix.format(name.replace("_", " ")) for name in ctx.classnames]
        return build_prompts(ctx.backbone, names, cfg.n_ctx, cfg.init, ctx.device, ctx.generator(1))

    def class_features(self) -> torch.Tensor:
        """(C, D) t_c: the normalised frozen features of the hand-crafted prompts (trainers/tcp.py:156-166)."""
        ctx = self.ctx
        return ctx.text_weights([handcrafted_template(ctx.dataset, ctx.templates)]).to(ctx.device)

    def _build(self) -> None:
        cfg, ctx = self.config, self.ctx
        model = ctx.backbone.model
        self.config = cfg = dataclasses.replace(cfg, block=min(cfg.block, text_depth(model) - 1))
        self.prompts = self.make_prompts()
        self.handcrafted = self.class_features()
        if ctx.backbone.embed_dim // cfg.reduction < 1:
            raise ConfigError(f"tcp.reduction = {cfg.reduction} exceeds the feature dim {ctx.backbone.embed_dim}")
        self.learner = TCPLearner(self.prompts.init, self.handcrafted.shape[1], cfg.reduction, cfg.class_tokens,
                                  ctx.seed).to(ctx.device)

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        self._build()
        bb = ctx.backbone
        batches = fewshot_image_batches(train, train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale),
                                        cfg.batch_size, ctx.generator())
        train_epochs(ctx, self.config.optimizer(self.learner.parameters()), batches, self.loss, cfg.epochs,
                     dassl_steps(len(train), cfg.batch_size), cfg.schedule(cfg.epochs), "train tcp")
        self._finish()

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE + weight x (1 - mean cosine of learned and hand-crafted class features) (trainers/tcp.py:240-258)."""
        cfg = self.config
        text = self.text_features()
        logits = cfg.logit_scale * frozen_image_features(self.ctx.backbone, images) @ text.T
        score = 1.0 - F.cosine_similarity(text, self.handcrafted, dim=1, eps=1e-7).mean()
        return F.cross_entropy(logits, labels) + cfg.weight * score

    def text_features(self) -> torch.Tensor:
        """(C, D) normalised features of the class prompts, class-aware tokens entering before `block`."""
        x = assemble_prompts(self.prompts, self.learner.context)
        tokens = self.learner.tokens(self.handcrafted)
        hook = block_tokens_hook(self.config.block, tokens, self.prompts.prefix.shape[1], self.config.blend)
        return text_forward(self.ctx.backbone.model, x, self.prompts.eot, hook).float()

    def retarget(self) -> None:
        """Unseen classes: their frozen features give their class-aware tokens (TCP's base-to-new protocol)."""
        self.prompts = self.make_prompts()
        self.handcrafted = self.class_features()
        self._finish()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of (N, D) L2-normalised frozen image features (the runner's cached test features)."""
        return self.config.logit_scale * x.float() @ self.text.T

