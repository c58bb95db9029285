"""CLIP backbones via open_clip: the paper's three ViTs, any open_clip model, and `test-tiny`.

`ViT-B/16`, `ViT-B/32` and `ViT-L/14` are open_clip's `ViT-B-16` etc. with the `openai`
weights that the CLIP-LoRA paper uses (QuickGELU, as OpenAI trained them). Every model comes
back with its attention unfused (`fsbench.attention.split_attention`) and frozen.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from fsbench.attention import split_attention
from fsbench.errors import UnknownNameError, WeightsError
from fsbench.registry import Registry

# name -> (open_clip model name, default pretrained tag)
PAPER_BACKBONES = {
    "vit-b/16": ("ViT-B-16", "openai"),
    "vit-b/32": ("ViT-B-32", "openai"),
    "vit-l/14": ("ViT-L-14", "openai"),
}

# A real CLIP (ViT vision tower + causal text transformer, the module types of ViT-B/16),
# shrunk so that a forward/backward pass on CPU takes milliseconds.
TEST_TINY = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)

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
        """(open_clip model name, weights tag) after applying the paper's defaults."""
        model, tag = PAPER_BACKBONES.get(self.name.lower(), (self.name, "none"))
        if self.name.lower() == "test-tiny":
            model, tag = "test-tiny", "none"
        if self.checkpoint:
            tag = f"file:{self.checkpoint}"
        elif self.pretrained:
            tag = self.pretrained
        return model, tag

    def cache_key(self) -> str:
        """Identity of the weights, for feature caches: changes whenever the weights do."""
        model, tag = self.resolved()
        if self.checkpoint:
            p = Path(self.checkpoint)
            tag = f"file:{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
        if tag == "none":
            tag = f"random-seed{self.seed}"
        return f"{model}|{tag}"


@dataclass
class Backbone:
    """A built CLIP with what the harness needs around it."""

    spec: BackboneSpec
    model: nn.Module
    tokenizer: Callable
    preprocess: Callable
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def key(self) -> str:
        return self.spec.cache_key()

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
            raise WeightsError(f"cannot load {spec.checkpoint} into {spec.name}: "
                               f"{str(exc).strip().splitlines()[0][:200]}") from None
    return model


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
        return _seeded(spec.seed, lambda: open_clip.create_model(
            model_name, pretrained=None, force_quick_gelu=quick_gelu))
    else:
        source = tag
    try:
        with _quiet_hub():
            return open_clip.create_model(model_name, pretrained=source, force_quick_gelu=quick_gelu)
    except Exception as exc:  # network errors come in many types (urllib, requests, hf_hub)
        reason = (str(exc).strip() or type(exc).__name__).split(". ")[0][:160]
        raise WeightsError(
            f"could not fetch weights for {model_name} (pretrained={tag!r}): {reason}. "
            "Without network access, download the checkpoint elsewhere and pass "
            "--checkpoint PATH, or pre-fill the Hugging Face cache (HF_HOME); "
            "--pretrained none gives random weights for testing") from None


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Fail fast and quietly when the hub is unreachable (local caches still work).

    Without this, huggingface_hub retries for about a minute and logs every attempt.
    """
    import socket

    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        constants.HF_HUB_OFFLINE = True
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        constants.HF_HUB_OFFLINE = saved


def resolve_factory(name: str) -> Factory:
    key = name.lower()
    if key in BACKBONES:
        return BACKBONES.get(key)
    if key in PAPER_BACKBONES or name in open_clip.list_models():
        return _open_clip_model
    known = BACKBONES.names() + [k.upper().replace("VIT", "ViT") for k in PAPER_BACKBONES]
    import difflib

    close = difflib.get_close_matches(name, known + open_clip.list_models(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see `fsbench ls backbones`"
    raise UnknownNameError(f"unknown backbone {name!r}{hint}")


def build_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> Backbone:
    """Build, unfuse and freeze the CLIP described by `spec` on `device`."""
    if spec.pretrained and spec.checkpoint:
        raise WeightsError("give either --pretrained or --checkpoint, not both")
    model = resolve_factory(spec.name)(spec)
    split_attention(model)
    model.requires_grad_(False).eval().to(device)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    preprocess = open_clip.image_transform(size, is_train=False, mean=mean, std=std)
    tokenizer = open_clip.get_tokenizer("ViT-B-16" if spec.name.lower() == "test-tiny" else
                                        spec.resolved()[0])
    return Backbone(spec, model, tokenizer, preprocess, size, mean, std)


def file_digest(path: str | Path, limit: int = 1 << 20) -> str:
    """Short digest of a file's first MiB and size (cheap identity for large checkpoints)."""
    p = Path(path)
    h = hashlib.sha256(str(p.stat().st_size).encode())
    with open(p, "rb") as fh:
        h.update(fh.read(limit))
    return h.hexdigest()[:16]
