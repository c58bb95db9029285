"""The `Method` contract every adaptation method implements, and its registry.

A method is one file in `methods/`: a `Method` subclass with a `Config` dataclass (defaults
from its paper), an `input_kind`, `fit(train, val)` and `logits(x)`, registered with
`@register_method("name")`. Third-party methods load from the entry-point group
`fsbench.methods` or from `fsbench run --plugin file.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.backbones import Backbone
from fsbench.data.base import DatasetSplits, Item
from fsbench.registry import Registry, import_all
from fsbench.text import encode_tokens

InputKind = Literal["features", "images"]


@dataclass
class FewShotData:
    """A labelled set handed to `Method.fit`.

    `features` holds the cached, L2-normalised frozen image features (for methods whose
    `input_kind` is "features"; None otherwise). `items` and `image_root` locate the images,
    for methods that train on pixels or need augmented views; `index` holds the items'
    positions in their dataset split, for caching per-image work across runs.
    """

    items: list[Item]
    labels: torch.Tensor
    image_root: Path
    features: torch.Tensor | None = None
    index: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Context:
    """What a method may use: the frozen backbone, the classes, the device, its seed.

    Methods never read global state; everything run-specific arrives here.
    """

    backbone: Backbone
    data: DatasetSplits
    device: torch.device
    seed: int
    shots: int
    amp_dtype: torch.dtype | None = None
    workers: int | None = None
    track: Callable[[Iterable, int, str], Iterable] = lambda it, total, desc: it
    services: dict[str, Any] = field(default_factory=dict)

    @property
    def classnames(self) -> list[str]:
        return self.data.classnames

    @property
    def num_classes(self) -> int:
        return len(self.data.classnames)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A fresh CPU generator seeded from the run's seed."""
        return torch.Generator().manual_seed(self.seed * 1000 + offset)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def text_weights(self, templates: list[str] | None = None) -> torch.Tensor:
        """Zero-shot classifier (C, D): per class, the normalised mean of the normalised
        template embeddings (Radford et al. 2021), from the frozen text tower."""
        return zero_shot_weights(self.backbone, self.classnames,
                                 templates or self.data.templates, self.device)


def zero_shot_weights(backbone: Backbone, classnames: list[str], templates: list[str],
                      device: torch.device, model: nn.Module | None = None) -> torch.Tensor:
    """Text classifier (C, D), float32, unit rows: the template-ensembled class embeddings.

    `model` defaults to the frozen backbone model; pass an adapted one (LoRA) to use it.
    Gradients flow when called outside `no_grad`.
    """
    model = model or backbone.model
    per_template = []
    for template in templates:
        tokens = backbone.tokenize([template.format(c) for c in classnames]).to(device)
        per_template.append(encode_tokens(model, tokens).float())
    mean = torch.stack(per_template).mean(0)
    return F.normalize(mean, dim=-1)


@dataclass
class NoConfig:
    """A method without hyper-parameters."""


class Method(ABC):
    """Base class of adaptation methods.

    Class attributes to set: `Config` (a dataclass of hyper-parameters with the paper's
    defaults), `input_kind` ("features": `fit` gets cached frozen features and `logits`
    receives (N, D) normalised features; "images": `fit` gets image items and `logits`
    receives preprocessed image batches), `paper` (citation) and `summary` (one line).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    input_kind: ClassVar[InputKind] = "features"
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __init__(self, config: Any, ctx: Context):
        self.config = config
        self.ctx = ctx

    @abstractmethod
    def fit(self, train: FewShotData, val: FewShotData) -> None:
        """Learn from the few-shot train set; `val` (min(K, 4) shots/class) for selection."""

    @abstractmethod
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (N, C) for a batch of features or images (see `input_kind`)."""

    def trainable_params(self) -> int:
        """Number of parameters the method trained (0 for training-free methods)."""
        return 0

    def inference_overhead(self) -> int:
        """Extra parameters or cache entries needed at test time beyond the base CLIP."""
        return 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What `logits` needs beyond the frozen backbone, saved by `--save-adapter`.

        The default is the method's public tensor attributes (enough for methods that keep plain
        tensors, such as zero_shot and linear_probe); methods holding modules override this and
        `load_state_tensors`.
        """
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor) and not k.startswith("_")}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Make the method ready for `logits` from a `state_tensors()` dict, without `fit`."""
        for key, value in tensors.items():
            setattr(self, key, value)


METHODS: Registry[type[Method]] = Registry("method", entry_point_group="fsbench.methods", base=Method)
METHODS.add_loader(lambda: import_all("methods"))


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Decorator: `@register_method("tip_adapter")` on a `Method` subclass."""
    return METHODS.register(name)


def count_trainable(*modules: nn.Module | torch.Tensor) -> int:
    """Parameters with `requires_grad` in the given modules / tensors."""
    total = 0
    for m in modules:
        params = [m] if isinstance(m, torch.Tensor) else list(m.parameters())
        total += sum(p.numel() for p in params if p.requires_grad)
    return total

