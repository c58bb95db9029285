"""PLOT++ (Chen et al., "PLOT: Prompt Learning with Optimal Transport for Vision-Language Models",
ICLR 2023, arXiv 2210.01253; PLOT++ is its ViT version): N text prompts per class and M image features,
scored by the optimal-transport similarity between the two sets (entropic OT, Sinkhorn).

Official code: github.com/CHENGY12/PLOT (commit 728539f), folder plot-pp:
- trainers/plotpp.py:56-174 `MultiModalPromptLearner`: N = 4 text contexts initialised from four
  per-dataset templates (:73-99; the context is as many tokens as the first template has words, :87),
  and M vision prompts of 2 tokens from N(0, 0.02) (:100-101);
- clip/model.py:258-278: the image is encoded once per vision prompt, the prompt appended after the
  positional embedding (before `ln_pre`): its M local features are the M prompted class tokens (PLOT's
  ResNet version matched feature-map positions instead; for ViT, PLOT++ matches prompted features);
- trainers/plotpp.py:199-262: cost 1 - cosine between every (image feature, text prompt) pair, uniform
  marginals 1/M and 1/N, Sinkhorn with eps 0.1, at most 100 iterations, stopped when the row scalings
  change by less than 1e-2 (:189-190, :202), the plan computed without gradient; score = sum(T * cosine);
  with `TRADE_OFF` the cosine of the mean features (the global prompt) is added;
- two stages (scripts/main_visiononly.sh, main_joint.sh; train.py:100): stage 1 trains the vision prompts
  only (text contexts fixed at the templates) on global + OT logits; stage 2 starts from stage 1 and
  trains both on the OT logits alone, which are also the test-time scores (scripts/evaluation.sh:45);
- stage 1 runs once per (dataset, shots), with seed 1 (main_visiononly.sh:18-20, `for SEED in 1`), and
  every seed's stage 2 starts from that model (main_joint.sh:7,21,45, one `PRETRAIN_DIR` loaded by
  plotpp.py:308-309): `stage1_seed = 1` (the default) trains stage 1 on seed 1's draw with seed 1's
  initialisation and batch order (`Method.reference_seed`: the runner draws it and records it in the
  result's identity), so all seeds share the same stage-1 prompts; `stage1_seed = null` trains stage 1
  on the run's own draw and seed (fsbench before issue 25).

Defaults: configs/trainers/PLOTPP/vit.yaml (SGD lr 0.002, batch 32, one constant warm-up epoch at 1e-5
then cosine, random resized crop + flip) with Dassl's momentum 0.9 and weight decay 5e-4; epochs per
stage 50 / 100 / 200 for 1 / 2-4 / 8-16 shots, 50 on ImageNet (train.py:126-133); M = 4 (the README's
example), N = 4, 2 vision tokens (scripts/main_joint.sh:12-15).

Deviations: bf16 autocast on GPU (official fp16), the OT in float32; stage 1's text features are
computed once (its text contexts are fixed, so every step's would be identical); the shared stage 1 is
kept in memory by a content key (weights, device, precision, classes, config, the images and their
file stamps) and reused by the next seeds in the same process; another process (a new command, another
Ray worker) trains it again from seed 1's draw and seed, equal on CPU (tested), possibly different in
the last bits on GPU; outside the runner (no `ctx.reference`) stage 1 uses the run's own draw and seed;
datasets without official templates
(synthetic, imagefolder) use Caltech101's; the templates of the fitted dataset are kept for unseen
classes (`retarget`); with `two_stage = false` only the joint stage runs. The vision prompts have the
tower's width (the official code hard-codes 768, ViT-B's, plotpp.py:100,106, so it runs on ViT-B
only); the official evaluation batch is 100 (vit.yaml:5), fsbench's `runtime.eval_batch_size` 256
(the scores do not depend on it).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fsbench import identity
from fsbench.augment import train_transform
from fsbench.checks import check_at_least, check_crop_scale, check_positive
from fsbench.errors import ConfigError
from fsbench.method import FewShotData, Method, register_method
from fsbench.prompts import INIT_STD, RANDOM, Prompts, assemble_prompts, build_prompts
from fsbench.towers import DeepPrompted, context_window, require_towers, text_forward, vision_tokens
from fsbench.training import DasslRecipe, coop_epochs, dassl_steps, fewshot_image_batches, train_epochs

# plot-pp/trainers/plotpp.py:73-83, keyed by fsbench's dataset names (kept verbatim, spaces included)
TEMPLATES = {
    "caltech101": ["a photo of a", "this is a photo", "this is picture of", "one picture of a"],
    "dtd": ["a photo of a texture", "this is a photo texture", "this is a picture texture",
            "one picture of a texture"],
    "eurosat": ["a centered satellite photo of", "a centered satellite picture of",
                "this is centered satellite photo of", "one centered satellite photo of a"],
    "fgvc_aircraft": ["a photo of an aircraft", "a picture of an aircraft", "this is aircraft picture of",
                      "one picture of an aircraft"],
    "food101": ["a photo of a food", "this is a food photo", " this is food picture of", "one picture of a food"],
    "imagenet": ["a photo of a", "this is a photo ", "this is a", "one picture of a"],
    "oxford_flowers": ["a photo of a flower", "one picture of a flower", "this is flower picture of",
                       "one picture of a flower"],
    "oxford_pets": ["a photo of a pet", "one picture of a pet", "this is pet picture of", "one picture of a pet"],
    "stanford_cars": ["a photo of a", "this is a photo ", "this is picture of", "one picture of a"],
    "sun397": ["a photo of a", "this is a photo", "this is picture of", "one picture of a"],
    "ucf101": ["a photo of a person doing", "this is a photo people doing", "this is picture of people doing",
               "one picture of a person doing"],
}
# stage-1 vision prompts shared by the seeds of a (backbone, dataset, K), by content key, in this process
_STAGE1: OrderedDict[str, torch.Tensor] = OrderedDict()
STAGE1_KEPT = 16
DEFAULT_DATASET = "caltech101"  # templates for datasets the official code has none for
DATASET = "dataset"  # the `init` value for the official per-dataset templates


@dataclass
class PlotPPConfig(DasslRecipe):
    """PLOT++ hyper-parameters (official plot-pp scripts and vit.yaml); recipe fields from `DasslRecipe`."""

    n_text: int = 4  # N text prompts per class
    n_vision: int = 4  # M vision prompts (M local image features)
    n_ctx_vision: int = 2  # tokens per vision prompt
    init: str = DATASET  # "dataset": the official templates of the dataset; "random": N(0, 0.02)
    n_ctx: int = 4  # text context tokens with init = "random" (the templates set their own)
    eps: float = 0.1  # entropic regularisation of the Sinkhorn OT
    max_iter: int = 100  # Sinkhorn iterations at most
    thresh: float = 1e-2  # stop when the mean change of the row scalings falls below this
    two_stage: bool = True  # stage 1 (vision prompts, global + OT logits) before the joint stage
    stage1_seed: int | None = 1  # stage 1 on this seed's draw, shared by all seeds (official); None = own draw
    logit_scale: float = 100.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])

    section: ClassVar[str] = "plot_pp"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_text", "n_vision", "n_ctx_vision", "n_ctx", "max_iter"):
            check_at_least(self.section, name, getattr(self, name), 1)
        for name in ("eps", "thresh", "logit_scale"):
            check_positive(self.section, name, getattr(self, name))
        check_crop_scale(self.section, "crop_scale", self.crop_scale)
        if self.stage1_seed is not None:
            check_at_least(self.section, "stage1_seed", self.stage1_seed, 0)
        if self.init not in (DATASET, RANDOM):
            raise ConfigError(f'plot_pp.init must be "dataset" or "random", got {self.init!r}')
        if self.init == DATASET and self.n_text > 4:
            raise ConfigError(f'plot_pp.n_text = {self.n_text}: the official templates are 4; use init = "random"')


def sinkhorn(K: torch.Tensor, u: torch.Tensor, v: torch.Tensor, max_iter: int, thresh: float) -> torch.Tensor:
    """Transport plans diag(r) K diag(c) (..., M, N) with row sums `u` and column sums `v`.

    Alternates r = u / K c and c = v / K^T r, stopping once the mean change of r is below `thresh`
    (plot-pp/trainers/plotpp.py:199-213); the column sums are then exact, the row sums close.
    """
    r, c = torch.ones_like(u), torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / (K @ c.unsqueeze(-1)).squeeze(-1)
        c = v / (K.transpose(-2, -1) @ r.unsqueeze(-1)).squeeze(-1)
        if (r - r0).abs().mean().item() < thresh:
            break
    return r.unsqueeze(-1) * c.unsqueeze(-2) * K


def ot_scores(image: torch.Tensor, text: torch.Tensor, eps: float, max_iter: int,
              thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(OT similarity, global cosine), each (B, C), of image features (M, B, D) and text features (N, C, D).

    OT: sum over (m, n) of T_mn cos(image_m, text_n), T the Sinkhorn plan of cost 1 - cos with uniform
    marginals (no gradient through T). Global: the cosine of the mean image and mean text features.
    """
    m, n = image.shape[0], text.shape[0]
    with torch.autocast(image.device.type, enabled=False):  # float32 even inside the training autocast
        image, text = image.float(), text.float()
        glob = F.normalize(image.mean(0), dim=-1) @ F.normalize(text.mean(0), dim=-1).T
        sim = torch.einsum("mbd,ncd->bcmn", F.normalize(image, dim=-1), F.normalize(text, dim=-1))
        with torch.no_grad():
            u = sim.new_full(sim.shape[:-1], 1.0 / m)
            v = sim.new_full((*sim.shape[:-2], n), 1.0 / n)
            plan = sinkhorn(torch.exp(-(1.0 - sim) / eps), u, v, max_iter, thresh)
        return (plan * sim).sum((-2, -1)), glob


def template_prompts(method: Method, templates: list[str]) -> list[Prompts]:
    """One `Prompts` per template: the context is the first n tokens after SOS, n the words of the first
    template, initialised from each template's own embedding there (plotpp.py:85-99, :119-133)."""
    ctx, n_ctx = method.ctx, len(templates[0].split())
    model, out = ctx.backbone.model, []
    for template in templates:
        prompts = build_prompts(ctx.backbone, ctx.classnames, n_ctx, template, ctx.device, ctx.generator(1))
        with torch.no_grad():
            init = model.token_embedding(ctx.backbone.tokenize([template]).to(ctx.device))[0, 1:1 + n_ctx]
        out.append(context_window(prompts, n_ctx, init.float()))
    return out


def seeded(seed: int, offset: int = 0) -> torch.Generator:
    """The generator `Context.generator(offset)` gives a run of `seed`."""
    return torch.Generator().manual_seed(seed * 1000 + offset)


def random_prompts(method: Method, seed: int | None = None) -> list[Prompts]:
    """N prompts "X X X X <class>." with their own N(0, 0.02) contexts (plotpp.py:104-109)."""
    ctx = method.ctx
    gen = seeded(ctx.seed if seed is None else seed, 1)
    return [build_prompts(ctx.backbone, ctx.classnames, method.config.n_ctx, RANDOM, ctx.device, gen)
            for _ in range(method.config.n_text)]


@register_method("plot_pp")
class PlotPP(DeepPrompted, Method):
    """N text prompts and M vision prompts per class matched by Sinkhorn optimal transport; CLIP frozen."""

    Config = PlotPPConfig
    input_kind = "images"
    paper = "Chen et al., PLOT: Prompt Learning with Optimal Transport for Vision-Language Models, ICLR 2023"
    summary = "PLOT++: 4 text x 4 vision prompts matched by Sinkhorn OT, vision-only then joint stage"
    version = 2  # issue 25: stage 1 trained once on seed 1's draw, shared by every seed

    @classmethod
    def reference_seed(cls, config: PlotPPConfig) -> int | None:
        """Stage 1 is trained on `stage1_seed`'s draw in every seed's run (official scripts)."""
        return config.stage1_seed if config.two_stage else None

    def _build(self, templates: list[str] | None, seed: int | None = None) -> None:
        """Prompts and vision prompts, initialised from `seed`'s generators (default: the run's seed)."""
        cfg, ctx = self.config, self.ctx
        seed = ctx.seed if seed is None else seed
        require_towers(self.name, ctx.backbone)
        self.templates = templates
        self.prompts = random_prompts(self, seed) if templates is None else template_prompts(self, templates)
        self.context = nn.Parameter(torch.stack([p.init for p in self.prompts]))
        width = ctx.backbone.model.visual.transformer.width
        noise = torch.randn(cfg.n_vision, cfg.n_ctx_vision, width, generator=seeded(seed, 2)) * INIT_STD
        self.vision = nn.Parameter(noise.to(ctx.device))

    def _templates(self) -> list[str] | None:
        if self.config.init == RANDOM:
            return None
        return TEMPLATES.get(self.ctx.dataset, TEMPLATES[DEFAULT_DATASET])[:self.config.n_text]

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        cfg, ctx = self.config, self.ctx
        shared = cfg.two_stage and cfg.stage1_seed is not None and ctx.reference is not None
        self._build(self._templates(), cfg.stage1_seed if shared else None)
        epochs = cfg.epochs or coop_epochs(ctx.shots, ctx.dataset)
        self.config = cfg = dataclasses.replace(cfg, epochs=epochs)  # the stored config records what ran
        bb = ctx.backbone
        transform = train_transform(bb.image_size, bb.mean, bb.std, cfg.crop_scale)
        batches = fewshot_image_batches(train, transform, cfg.batch_size, ctx.generator())
        if cfg.two_stage and shared:
            self._shared_stage1(transform)
        elif cfg.two_stage:  # the run's batches go on into stage 2
            self._stage1(train, batches)
        train_epochs(ctx, cfg.optimizer([self.context, self.vision]), batches,
                     self._loss(self.text_features, trade_off=False), epochs, dassl_steps(len(train), cfg.batch_size),
                     cfg.schedule(epochs), "train plot_pp (stage 2: joint)")
        self._finish()

    def _stage1(self, data: FewShotData, batches: Iterator) -> None:
        """Stage 1: the vision prompts alone, on global + OT logits, the text contexts fixed."""
        cfg, ctx = self.config, self.ctx
        with torch.no_grad(), ctx.autocast():
            fixed = self.text_features()
        train_epochs(ctx, cfg.optimizer([self.vision]), batches, self._loss(lambda: fixed, trade_off=True),
                     cfg.epochs, dassl_steps(len(data), cfg.batch_size), cfg.schedule(cfg.epochs),
                     "train plot_pp (stage 1: vision prompts)")

    def _shared_stage1(self, transform: Callable) -> None:
        """Stage 1 as seed `stage1_seed`'s run trains it (its draw, batch order and augmentations, from torch's
        global RNG, seeded per run), the run's RNG state restored after; reused within the process when the
        same stage 1 (same weights, classes, config and images) was trained already."""
        cfg, ctx = self.config, self.ctx
        key = self._stage1_key(ctx.reference)
        if key in _STAGE1:
            with torch.no_grad():
                self.vision.copy_(_STAGE1[key].to(self.vision.device))
            return
        batches = fewshot_image_batches(ctx.reference, transform, cfg.batch_size, seeded(cfg.stage1_seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.stage1_seed)
            self._stage1(ctx.reference, batches)
        _STAGE1[key] = self.vision.detach().cpu().clone()
        while len(_STAGE1) > STAGE1_KEPT:
            _STAGE1.popitem(last=False)

    def _stage1_key(self, data: FewShotData) -> str:
        """Everything stage 1 depends on: weights, device and precision, classes, config, the images."""
        ctx, spec = self.ctx, self.ctx.backbone.spec
        return identity.digest([identity.weights_identity(spec.name, spec.pretrained or "", spec.checkpoint or ""),
                                spec.seed, ctx.device.type, str(ctx.amp_dtype), ctx.classes.names,
                                ctx.classes.templates, dataclasses.asdict(self.config),
                                identity.items_digest(data.image_root, data.items)])

    def _loss(self, text: Callable[[], torch.Tensor], trade_off: bool) -> Callable:
        def loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.scores(self.image_features(images), text(), trade_off), labels)
        return loss

    def text_features(self) -> torch.Tensor:
        """(N, C, D) unnormalised features of the N prompts of every class."""
        model = self.ctx.backbone.model
        return torch.stack([text_forward(model, assemble_prompts(p, c), p.eot, normalize=False).float()
                            for p, c in zip(self.prompts, self.context, strict=True)])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(M, B, D) unnormalised features of the images, once per vision prompt."""
        m, b = self.vision.shape[0], images.shape[0]
        prompts = self.vision.repeat_interleave(b, dim=0)  # image-major within each prompt
        pooled = vision_tokens(self.ctx.backbone.model, images.repeat(m, 1, 1, 1), prompts)[0]
        return pooled.float().view(m, b, -1)

    def scores(self, image: torch.Tensor, text: torch.Tensor, trade_off: bool = False) -> torch.Tensor:
        """Logits (B, C): scaled OT similarity, plus the global cosine with `trade_off` (stage 1)."""
        cfg = self.config
        ot, glob = ot_scores(image, text, cfg.eps, cfg.max_iter, cfg.thresh)
        return cfg.logit_scale * (ot + glob if trade_off else ot)

    def _finish(self) -> None:
        self.context.requires_grad_(False)
        self.vision.requires_grad_(False)
        with torch.no_grad(), self.ctx.autocast():
            self.text = self.text_features()

    def retarget(self) -> None:
        """Unseen classes: the learned contexts (with the fitted templates' fixed words) before their names."""
        learned = self.context
        self.prompts = (random_prompts(self) if self.templates is None
                        else template_prompts(self, self.templates))
        self.context = learned
        self._finish()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(self.image_features(x), self.text)

    def trainable_params(self) -> int:
        return self.context.numel() + self.vision.numel()

    def inference_overhead(self) -> int:
        return self.trainable_params()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"context": self.context.detach(), "vision": self.vision.detach()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build(self._templates())
        with torch.no_grad():
            self.context.copy_(tensors["context"])
            self.vision.copy_(tensors["vision"])
        self._finish()

