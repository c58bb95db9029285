"""CLIP backbones via open_clip: the paper's three ViTs, today's families, any open_clip model, and tiny
random-weight configs of each family for tests.

`ViT-B/16`, `ViT-B/32` and `ViT-L/14` are open_clip's `ViT-B-16` etc. with the `openai`
weights that the CLIP-LoRA paper uses (QuickGELU, as OpenAI trained them). `ALIASES` names the
common models of the other families the paper-style way (`SigLIP2-B/16`, `EVA02-L/14`, ...). Every
model comes back with its attention unfused (`fsbench.attention.split_attention`) and frozen.

The `test-tiny*` backbones are seeded random CLIPs of each family's real module types (timm
SigLIP / EVA02 / ConvNeXt vision towers, bidirectional or causal text towers, the family's
pooling and tokenizer), registered at import as open_clip model configs (and their vision towers
as timm models), so they go through the same `open_clip.create_model` path as the real ones.
"""

from __future__ import annotations

import functools
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
from torch import nn

from fsbench.attention import attention_layers, split_attention
from fsbench.errors import ConfigError, UnknownNameError, WeightsError
from fsbench.registry import Registry
from fsbench.text import PromptLayout, TextPooling, prompt_layout, text_pooling, text_tower
from fsbench.tokenizers import load_tokenizer, quiet_hub

# name -> (open_clip model name, default pretrained tag)
PAPER_BACKBONES = {
    "vit-b/16": ("ViT-B-16", "openai"),
    "vit-b/32": ("ViT-B-32", "openai"),
    "vit-l/14": ("ViT-L-14", "openai"),
}

# Paper-style names of today's families: name -> (open_clip model name, default pretrained tag, family).
# MetaCLIP and DFN share OpenAI's architecture (their QuickGELU configs); SigLIP / SigLIP 2 and EVA02
# use timm vision towers and open_clip's custom text tower; ConvNeXt-CLIP has no attention in its
# vision tower. Tags from `open_clip.list_pretrained()`.
ALIASES = {
    "SigLIP-B/16": ("ViT-B-16-SigLIP", "webli", "SigLIP"),
    "SigLIP-L/16": ("ViT-L-16-SigLIP-256", "webli", "SigLIP"),
    "SigLIP-SO400M/14": ("ViT-SO400M-14-SigLIP", "webli", "SigLIP"),
    "SigLIP2-B/16": ("ViT-B-16-SigLIP2", "webli", "SigLIP 2"),
    "SigLIP2-B/32": ("ViT-B-32-SigLIP2-256", "webli", "SigLIP 2"),
    "SigLIP2-L/16": ("ViT-L-16-SigLIP2-256", "webli", "SigLIP 2"),
    "SigLIP2-SO400M/14": ("ViT-SO400M-14-SigLIP2", "webli", "SigLIP 2"),
    "EVA02-B/16": ("EVA02-B-16", "merged2b_s8b_b131k", "EVA-CLIP"),
    "EVA02-L/14": ("EVA02-L-14", "merged2b_s4b_b131k", "EVA-CLIP"),
    "MetaCLIP-B/16": ("ViT-B-16-quickgelu", "metaclip_fullcc", "MetaCLIP"),
    "MetaCLIP-L/14": ("ViT-L-14-quickgelu", "metaclip_fullcc", "MetaCLIP"),
    "MetaCLIP-H/14": ("ViT-H-14-quickgelu", "metaclip_fullcc", "MetaCLIP"),
    "MetaCLIP2-H/14": ("ViT-H-14-worldwide-quickgelu", "metaclip2_worldwide", "MetaCLIP 2"),
    "DFN-B/16": ("ViT-B-16-quickgelu", "dfn2b", "DFN"),
    "DFN-L/14": ("ViT-L-14-quickgelu", "dfn2b", "DFN"),
    "DFN-H/14": ("ViT-H-14-quickgelu", "dfn5b", "DFN"),
    "ConvNeXt-B": ("convnext_base_w", "laion2b_s13b_b82k_augreg", "ConvNeXt-CLIP"),
    "ConvNeXt-L": ("convnext_large_d", "laion2b_s26b_b102k_augreg", "ConvNeXt-CLIP"),
}
_ALIAS_KEYS = {k.lower(): k for k in ALIASES}

# A real CLIP (ViT vision tower + causal text transformer, the module types of ViT-B/16),
# shrunk so that a forward/backward pass on CPU takes milliseconds.
TEST_TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)

# Tiny timm vision towers: the family's timm architecture with 2 blocks of width 64 on 32 px images.
_TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
TINY_TIMM = {
    "fsbench_tiny_siglip": ("vit_base_patch16_siglip_224", _TINY_VIT),
    "fsbench_tiny_eva02": ("eva02_base_patch16_clip_224", dict(_TINY_VIT, ref_feat_shape=(4, 4))),
    "fsbench_tiny_convnext": ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
}


def _timm_tower(name: str) -> dict:
    return dict(image_size=32, timm_model_name=name, timm_model_pretrained=False)


# Each family's open_clip config (same keys, pooling, masks, tokenizer as the real one), tiny.
_TINY_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
_SIGLIP_TEXT = dict(context_length=64, width=64, heads=2, layers=2, no_causal_mask=True, proj_bias=True,
                    pool_type="last", norm_kwargs={"eps": 1e-6}, tokenizer_kwargs={"clean": "canonicalize"})
TINY_FAMILIES = {
    "test-tiny-siglip": ("SigLIP", dict(
        embed_dim=64, init_logit_bias=-10, custom_text=True,
        vision_cfg=dict(_timm_tower("fsbench_tiny_siglip"), timm_pool="map", timm_proj="none"),
        text_cfg=dict(_SIGLIP_TEXT, vocab_size=32000, hf_tokenizer_name="timm/ViT-B-16-SigLIP"))),
    "test-tiny-siglip2": ("SigLIP 2", dict(
        embed_dim=64, init_logit_bias=-10, custom_text=True,
        vision_cfg=dict(_timm_tower("fsbench_tiny_siglip"), timm_pool="map", timm_proj="none"),
        text_cfg=dict(_SIGLIP_TEXT, vocab_size=256000, width=32, hf_tokenizer_name="timm/ViT-B-16-SigLIP2",
                      act_kwargs={"approximate": "tanh"}))),
    "test-tiny-eva": ("EVA-CLIP", dict(
        embed_dim=32, custom_text=True,
        vision_cfg=dict(_timm_tower("fsbench_tiny_eva02"), timm_pool="token", timm_proj=None),
        text_cfg=_TINY_TEXT)),
    "test-tiny-convnext": ("ConvNeXt-CLIP", dict(
        embed_dim=32,
        vision_cfg=dict(_timm_tower("fsbench_tiny_convnext"), timm_pool="", timm_proj="linear", timm_drop=0.0),
        text_cfg=_TINY_TEXT)),
    "test-tiny-metaclip2": ("MetaCLIP 2", dict(
        embed_dim=32, quick_gelu=True, vision_cfg=TEST_TINY["vision_cfg"],
        text_cfg=dict(_TINY_TEXT, width=16, vocab_size=901629, hf_tokenizer_name="facebook/xlm-v-base",
                      pool_type="eos", eos_id=2))),
}


def _register_tiny_families() -> None:
    """Add the tiny timm towers to timm's registry and the tiny configs to open_clip's.

    open_clip's public `add_model_config` only reads JSON files, so the configs go into its
    registry dict directly (what `add_model_config` fills).
    """
    for name, (base, overrides) in TINY_TIMM.items():
        if not timm.models.is_model(name):
            def entry(pretrained: bool = False, _base: str = base, _kw: dict = overrides, **kwargs) -> nn.Module:
                return timm.create_model(_base, pretrained=False, **{**_kw, **kwargs})
            entry.__name__ = entry.__qualname__ = name
            timm.models.register_model(entry)
    globals().pop("__all__", None)  # timm's register_model lists its entry points in this module's __all__
    for name, (_, cfg) in TINY_FAMILIES.items():
        open_clip.factory._MODEL_CONFIGS.setdefault(name, cfg)


_register_tiny_families()

Factory = Callable[["BackboneSpec"], nn.Module]
BACKBONES: Registry[Factory] = Registry("backbone")


@dataclass(frozen=True)
class BackboneSpec:
    """Which weights to build: a name, a pretrained tag ("none" = seeded random) or a file."""

    name: str
    pretrained: str | None = None
    checkpoint: str | None = None
    seed: int = 0

    def resolved(self) -> tuple[str, str]:
        """(open_clip model name, weights tag) after applying the paper's and the aliases' defaults."""
        model, tag = PAPER_BACKBONES.get(self.name.lower(), (self.name, "none"))
        if self.name.lower() in _ALIAS_KEYS:
            model, tag, _ = ALIASES[_ALIAS_KEYS[self.name.lower()]]
        if self.name.lower() == "test-tiny":
            model, tag = "test-tiny", "none"
        if self.checkpoint:
            tag = f"file:{self.checkpoint}"
        elif self.pretrained:
            tag = self.pretrained
        return model, tag

    def cache_key(self) -> str:
        """Identity of the weights, for feature caches: changes whenever the weights do. A checkpoint is
        keyed by its content (the SHA-256 the result identity has, computed once per file stat), never by
        its path, size and mtime, which `cp -p`, `rsync -a` or tar keep for other weights."""
        from fsbench.identity import file_digest

        model, tag = self.resolved()
        if self.checkpoint:
            tag = f"file:sha256:{file_digest(self.checkpoint)}"
        if tag == "none":
            tag = f"random-seed{self.seed}"
        return f"{model}|{tag}"


@dataclass
class Backbone:
    """A built CLIP with what the harness needs around it.

    `logit_scale` and `logit_bias` are the model's learned ones (`exp(logit_scale)`; a bias only for
    SigLIP-family models, trained with a sigmoid loss). fsbench's methods score with their own
    configured scale (100 x cosine, the recipes of their papers) and no bias: a positive scale and a
    shared bias change no argmax, so top-1 is the same either way; see docs/methods.md.
    """

    spec: BackboneSpec
    model: nn.Module
    tokenizer: Callable
    preprocess: Callable
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embed_dim: int = 0
    stand_in_tokenizer: bool = False  # a `fsbench.tokenizers.StandInTokenizer` (random weights, offline)

    @property
    def key(self) -> str:
        return self.spec.cache_key()

    @property
    def logit_scale(self) -> float:
        """The learned temperature, exponentiated (100 for OpenAI's CLIP; about 10-120 for SigLIP)."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float | None:
        """The learned logit bias of sigmoid-loss models (SigLIP, SigLIP 2); None otherwise."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach())

    @property
    def text_pooling(self) -> TextPooling:
        """How the text tower pools, and whether its prompts can be truncated exactly."""
        return text_pooling(self.model)

    @functools.cached_property
    def prompt_layout(self) -> PromptLayout:
        """Where the tokenizer puts a prompt's words (begin token or not, end token id)."""
        return prompt_layout(self.tokenizer)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with seeded initial weights without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@BACKBONES.register("test-tiny")
def _test_tiny(spec: BackboneSpec) -> nn.Module:
    model = _seeded(spec.seed, lambda: open_clip.CLIP(**TEST_TINY, quick_gelu=True))
    if spec.checkpoint:
        _check_file(spec.checkpoint)
        try:
            open_clip.load_checkpoint(model, spec.checkpoint)
        except Exception as exc:  # wrong keys/shapes or not a checkpoint at all
            raise _load_failure(spec, exc) from None
    return model


def _load_failure(spec: BackboneSpec, exc: Exception) -> WeightsError:
    """Why a checkpoint file did not load, in words: not a checkpoint at all, or not one of this model."""
    path = str(spec.checkpoint)
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        looks = zipfile.is_zipfile(path) or head[:1] == b"\x80" or head[8:9] == b"{"  # torch.save, pickle, safetensors
    except OSError:
        looks = False
    if not looks:
        return WeightsError(f"{path} is not a checkpoint (a state dict saved with torch.save, an OpenAI .pt "
                            "or a .safetensors file was expected)")
    return WeightsError(f"cannot load {path} into {spec.name}: {(str(exc).strip().splitlines() or [''])[0][:200]}")


def check_weights(name: str, pretrained: str, checkpoint: str) -> None:
    """Usage errors of the weights flags, before anything is built or fetched (ConfigError, exit 2): both
    --pretrained and --checkpoint, or a --pretrained tag open_clip does not know for this model."""
    if pretrained and checkpoint:
        raise ConfigError("give either --pretrained or --checkpoint, not both")
    if not pretrained or pretrained == "none" or pretrained.startswith("hf-hub:") or Path(pretrained).is_file():
        return
    model, _ = BackboneSpec(name).resolved()
    known = ["none"] + ([] if name.lower() in BACKBONES else open_clip.list_pretrained_tags_by_model(model))
    if pretrained not in known:
        import difflib

        close = difflib.get_close_matches(pretrained, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown --pretrained tag {pretrained!r} for {name}{hint} (known: {', '.join(known)})")


def _check_file(path: str) -> None:
    if not Path(path).is_file():
        raise WeightsError(f"checkpoint file not found: {path}")


def _open_clip_model(spec: BackboneSpec) -> nn.Module:
    model_name, tag = spec.resolved()
    quick_gelu = spec.name.lower() in PAPER_BACKBONES
    if spec.checkpoint:
        _check_file(spec.checkpoint)
        source = spec.checkpoint
    elif tag == "none":
        logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded
        try:
            return _seeded(spec.seed, lambda: open_clip.create_model(
                model_name, pretrained=None, force_quick_gelu=quick_gelu))
        finally:
            logging.disable(logging.NOTSET)
    else:
        source = tag
    try:
        with quiet_hub():
            return open_clip.create_model(model_name, pretrained=source, force_quick_gelu=quick_gelu)
    except Exception as exc:  # network errors come in many types (urllib, requests, hf_hub)
        if spec.checkpoint:
            raise _load_failure(spec, exc) from None
        reason = (str(exc).strip() or type(exc).__name__).split(". ")[0][:160]
        raise WeightsError(
            f"could not fetch weights for {model_name} (pretrained={tag!r}): {reason}. "
            "Without network access, download the checkpoint elsewhere and pass "
            "--checkpoint PATH, or pre-fill the Hugging Face cache (HF_HOME); "
            "--pretrained none gives random weights for testing") from None


def resolve_factory(name: str) -> Factory:
    key = name.lower()
    if key in BACKBONES:
        return BACKBONES.get(key)
    if key in PAPER_BACKBONES or key in _ALIAS_KEYS or name in open_clip.list_models():
        return _open_clip_model
    known = BACKBONES.names() + [k.upper().replace("VIT", "ViT") for k in PAPER_BACKBONES] + list(ALIASES)
    import difflib

    close = difflib.get_close_matches(name, known + open_clip.list_models(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see `fsbench ls backbones`"
    raise UnknownNameError(f"unknown backbone {name!r}{hint}")


def build_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> Backbone:
    """Build, unfuse and freeze the CLIP described by `spec` on `device`, with its tokenizer.

    Raises:
        WeightsError: weights (or, for real weights, a hub tokenizer) cannot be fetched.
    """
    if spec.pretrained and spec.checkpoint:
        raise WeightsError("give either --pretrained or --checkpoint, not both")
    model = resolve_factory(spec.name)(spec)
    model_name, tag = spec.resolved()
    name = "ViT-B-16" if spec.name.lower() == "test-tiny" else model_name
    tokenizer, stand_in = load_tokenizer(name, stand_in_ok=tag == "none")
    split_attention(model)
    model.requires_grad_(False).eval().to(device)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    preprocess = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    return Backbone(spec, model, tokenizer, preprocess, size, mean, std, _embed_dim(model), stand_in)


def _embed_dim(model: nn.Module) -> int:
    """Width of the joint embedding: open_clip towers say it; timm towers are measured once."""
    if hasattr(model.visual, "output_dim"):
        return int(model.visual.output_dim)
    size = model.visual.image_size
    p = next(model.visual.parameters())
    with torch.no_grad():
        return int(model.visual(torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype)).shape[-1])


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone offers the methods, read from its open_clip config (nothing is built)."""

    name: str
    model: str  # open_clip model name
    tag: str  # default weights
    family: str
    vision_attention: bool  # attention blocks in the vision tower (LoRA / peft targets)
    text_attention: bool  # open_clip's own text transformer (not a Hugging Face model)
    text: TextPooling
    tokenizer: str  # "open_clip BPE" or the Hugging Face tokenizer's name
    logit_bias: bool  # sigmoid-loss model (SigLIP)


def describe(name: str) -> BackboneInfo:
    """`BackboneInfo` of a backbone name (paper name, alias, tiny config or open_clip model)."""
    resolve_factory(name)
    model, tag = BackboneSpec(name).resolved()
    family = ALIASES[_ALIAS_KEYS[name.lower()]][2] if name.lower() in _ALIAS_KEYS else (
        "OpenAI CLIP" if name.lower() in PAPER_BACKBONES else TINY_FAMILIES.get(name, ("CLIP",))[0])
    cfg = TEST_TINY if model == "test-tiny" else open_clip.get_model_config(model) or {}
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    hf_text = bool(text.get("hf_model_name"))
    no_attention = isinstance(vision.get("layers"), (list, tuple)) or "convnext" in str(vision.get("timm_model_name"))
    pooling = TextPooling("hf", False) if hf_text else TextPooling(
        text.get("pool_type", "argmax"), not text.get("no_causal_mask", False), text.get("eos_id", 2),
        bool(text.get("embed_cls", False)))
    return BackboneInfo(name, model, tag, family, not no_attention, not hf_text, pooling,
                        str(text.get("hf_tokenizer_name") or "open_clip BPE"), "init_logit_bias" in cfg)


def attention_counts(model: nn.Module) -> tuple[int, int]:
    """(vision, text) attention layers of a built model (after `split_attention`)."""
    tower = text_tower(model)
    return len(attention_layers(model.visual)), len(attention_layers(getattr(tower, "transformer", None)))
