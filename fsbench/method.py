"""The `Method` contract every adaptation method implements, and its registry.

A method is one file in `methods/`: a `Method` subclass with a `Config` dataclass (defaults
from its paper), an `input_kind`, `fit(train, val)` and `logits(x)`, registered with
`@register_method("name")`. Third-party methods load from the entry-point group
`fsbench.methods` or from `fsbench run --plugin file.py`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fsbench.backbones import Backbone, BackboneInfo
from fsbench.curves import CurveRecorder
from fsbench.data.base import DatasetSplits, Item
from fsbench.errors import FsbenchError
from fsbench.protocols import ClassSet, class_set
from fsbench.registry import Registry, import_all
from fsbench.text import encode_tokens

InputKind = Literal["features", "images"]
# What a method can do with unlabelled evaluation data, where the protocol allows it (`Protocol.unlabelled`):
# nothing; adapt online, one batch at a time in the protocol's order (`online_logits`); or see the whole
# evaluation set at once (`transductive_logits`).
TestTime = Literal["none", "online", "transductive"]
ValRequest = Literal["default", "shots"]  # the validation a method asks for (`Method.val_request`)


@dataclass
class FewShotData:
    """A labelled set handed to `Method.fit`.

    `features` holds the cached, L2-normalised frozen image features (for methods whose
    `input_kind` is "features"; None otherwise). `items` and `image_root` locate the images,
    for methods that train on pixels or need augmented views; `index` holds the items'
    positions in their dataset split (`split`: "train", "val" or "train+val"), for caching per-image work
    across runs. `labels` index the fitted `ClassSet` (`Context.classes`).
    """

    items: list[Item]
    labels: torch.Tensor
    image_root: Path
    features: torch.Tensor | None = None
    index: tuple[int, ...] | None = None
    split: str = "train"

    def __len__(self) -> int:
        return len(self.items)


class NotApplicable(FsbenchError):
    """A method cannot produce a metric (e.g. score classes it never saw); the reason is recorded."""


class FeatureSource:
    """Cached frozen features of the run's few-shot images: the only images a method can encode
    through the cache. It accepts `FewShotData` of the train and val splits, never test images."""

    def __init__(self, cache: Any, backbone: Backbone, data: DatasetSplits,
                 progress: Callable | None = None):
        self._cache, self._backbone, self._data, self._progress = cache, backbone, data, progress

    def encode(self, fewshot: FewShotData, transform: Callable, tag: str,
               seed: Callable[[Item], int] | None = None,
               encode: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Any:
        """Features (N, [views,] D) of `fewshot`'s images under `transform`, cached under `tag`
        (`seed(item)` seeds random transforms per image; `encode(model, images)` replaces
        `encode_image`, e.g. for features before the projection)."""
        if fewshot.split not in ("train", "val", "train+val") or fewshot.index is None:
            raise ValueError("FeatureSource encodes few-shot train/val images only")
        return self._cache.items(self._backbone, self._data, fewshot.split, transform, fewshot.index,
                                 tag=tag, seed=seed, progress=self._progress, encode=encode)


@dataclass
class Context:
    """What a method may use: the frozen backbone, the class set, the device, its seed.

    Methods never read global state and never see the dataset: `classes` is the class set they are
    fitted on (after `fit`, the runner may point it to other classes and call `Method.retarget`);
    `features` encodes few-shot images through the feature cache.
    """

    backbone: Backbone
    classes: ClassSet
    device: torch.device
    seed: int
    shots: int
    amp_dtype: torch.dtype | None = None
    workers: int | None = None
    track: Callable[[Iterable, int, str], Iterable] = lambda it, total, desc: it
    features: FeatureSource | None = None
    # the train set of the draw a stage shared by every seed trains on (`Method.reference_seed`), set by the
    # runner before `fit`; None outside the runner (the method then uses its own train set)
    reference: FewShotData | None = None
    curves: CurveRecorder = field(default_factory=CurveRecorder)  # what the training loops record

    def __post_init__(self) -> None:
        if isinstance(self.classes, DatasetSplits):  # convenience for tests and scripts: all its classes
            self.classes = class_set(self.classes)

    @property
    def classnames(self) -> list[str]:
        return list(self.classes.names)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dataset(self) -> str:
        """The name of the dataset the method is fitted on (for per-dataset official settings)."""
        return self.classes.dataset

    @property
    def templates(self) -> list[str]:
        return list(self.classes.templates)

    @property
    def train_template(self) -> str:
        return self.classes.train_template

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
        return zero_shot_weights(self.backbone, self.classnames, templates or self.templates, self.device)


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
    # Bumped (2, 3, ...) in a method's file whenever a change of its code changes its numbers: the version
    # joins the result identity, so stored results of the old code are not reused (docs/results.md).
    version: ClassVar[int] = 1
    # what `logits` receives at evaluation (None: as `input_kind`); "features" for methods that train on
    # images but keep the image tower frozen (CoOp family): the test split is then encoded once per backbone
    eval_input: ClassVar[InputKind | None] = None
    # with eval_input "features": (cache tag, encode(model, images)) when `logits` takes other cached
    # features than the L2-normalised image embedding (ProLIP: the features before the visual projection)
    eval_encoder: ClassVar[tuple[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] | None] = None
    # what validation it asks for; the protocol sizes it (`Protocol.val_shots`): "default" (the protocol's
    # size: min(K, 4) per class in fsbench's protocols) or "shots" (K per class, LP++'s official regime)
    val_request: ClassVar[ValRequest] = "default"
    # why the method cannot score classes it was not fitted on (when it does not override `retarget`)
    unseen_reason: ClassVar[str] = "it learns parameters per training class and has none for unseen classes"
    # what it can do with unlabelled evaluation data (used only under a protocol that allows it)
    test_time: ClassVar[TestTime] = "none"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "val_shots" in vars(cls):  # the attribute's name when methods sized validation (plug-ins written then)
            cls.val_request = vars(cls)["val_shots"]

    def __init__(self, config: Any, ctx: Context):
        self.config = config
        self.ctx = ctx

    @abstractmethod
    def fit(self, train: FewShotData, val: FewShotData) -> None:
        """Learn from the few-shot train set; `val` (the protocol's validation set) for selection."""

    @abstractmethod
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores (N, C) for a batch of features or images (see `input_kind`)."""

    def online_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of one batch of unlabelled evaluation inputs, in the protocol's order; a test-time method
        (`test_time = "online"`) adapts on them as it goes. Never given labels. Default: `logits`."""
        return self.logits(x)

    def online_transform(self) -> Callable | None:
        """For an image-input method under an online protocol: the transform of each raw test image (PIL ->
        tensor) instead of the backbone's preprocess, e.g. TPT's augmented views (`fsbench.tta_views`). A random
        one draws from torch's RNG, which the runner seeds per image from (run seed, dataset, test position).
        None (default): the backbone's preprocess."""
        return None

    def transductive_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of a whole unlabelled evaluation set at once (`test_time = "transductive"`): `x` is the
        concatenation of `transductive_encode` over the set's batches. Default: `logits`."""
        return self.logits(x)

    def transductive_encode(self, x: torch.Tensor) -> torch.Tensor:
        """The per-batch part of a transductive pass (one batch of evaluation inputs -> rows that
        `transductive_logits` receives for the whole set), so that a method needing only per-image outputs
        never holds the whole set's images. Default: the inputs themselves."""
        return x

    def fresh(self) -> Method:
        """A copy for one evaluation set under a protocol that shows unlabelled test data, so adaptation never
        leaks from one set (or one target dataset) to the next: the method's own state is deep-copied, the
        context (frozen backbone, device) is shared. A method that adapts the shared backbone in place at test
        time overrides this to undo it."""
        return copy.deepcopy(self, {id(self.ctx): self.ctx})

    def retarget(self) -> None:
        """Re-derive what depends on the class set after the runner set `ctx.classes` to classes the
        method was not fitted on (base-to-new, cross-dataset). Methods that can score unseen classes
        (text-side methods, prompts, LoRA) override this; the default says it cannot."""
        raise NotApplicable(f"{self.name} cannot score classes it never saw: {self.unseen_reason}")

    def cosine_scale(self) -> float | None:
        """s where `logits` = s x cosine(image feature, class feature), for a method whose logits have that form
        (CLIP's head; s = 100 for the OpenAI weights), else None (a linear head, an added cache term). OOD scores
        (`fsbench.ood`, MCM) divide the logits by it to recover the cosine similarities. Default: None."""
        return None

    @classmethod
    def reference_seed(cls, config: Any) -> int | None:
        """The seed whose few-shot draw a stage shared by all seeds trains on, or None (no shared stage).
        The runner then draws it too, hands its train set to `fit` as `ctx.reference`, and makes that draw
        part of the result's identity (PLOT++'s official stage 1 is trained once, on seed 1)."""
        return None

    @classmethod
    def user_overrides(cls, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The user's settings of this method from the `[methods.NAME]` tables (bench.toml, `--set`): its own
        table (a method with a transductive step: each part's, `fsbench.transduction`)."""
        return dict(sections.get(cls.name, {}))

    @classmethod
    def scores_unseen_classes(cls) -> bool:
        return cls.retarget is not Method.retarget

    @classmethod
    def supports(cls, backbone: BackboneInfo) -> str | None:
        """None if the method applies in full to `backbone`; else one line on what does not apply."""
        return None

    def trainable_params(self) -> int:
        """Number of parameters the method trained (0 for training-free methods)."""
        return 0

    def training_curves(self) -> dict[str, dict[str, Any]]:
        """The curves its training loops recorded in `ctx.curves` ({} for training-free methods), stored
        in the result's `curves` by the runner (`fsbench.curves`)."""
        return self.ctx.curves.export()

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


class MethodRegistry(Registry[type[Method]]):
    """The method registry; `get("lora+transclip")` composes a method with a transductive step
    (`fsbench.transduction.composed_method`), so "+" is not allowed in a registered name."""

    def register(self, name: str) -> Callable[[type[Method]], type[Method]]:
        if "+" in name:
            raise ValueError(f"method names cannot hold '+' (METHOD+STEP composes two), got {name!r}")
        return super().register(name)

    def get(self, name: str) -> type[Method]:
        if "+" in name:
            from fsbench.transduction import composed_method

            return composed_method(name)
        return super().get(name)


METHODS: Registry[type[Method]] = MethodRegistry("method", entry_point_group="fsbench.methods", base=Method)
METHODS.add_loader(lambda: import_all("fsbench.methods"))


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

