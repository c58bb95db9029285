"""Transductive steps, and any method with one on top: `METHOD+STEP` (e.g. `lora+transclip`).

A transductive step (`TransductiveStep`) is a registered method that, besides scoring on its own, refines
another method's predictions with the whole unlabelled evaluation set. `METHODS.get("lora+transclip")`
composes the two (`composed_method`): the base method is fitted as usual; under a protocol that shows the
unlabelled test set (`transductive`) its logits on that set, softmaxed, become the step's prior, and the step
runs on the frozen image features of the same set (`TransductiveInputs`); under any other protocol the
composition scores as the base method alone. This is TransCLIP's "+TransCLIP" (github.com/MaxZanella/
transduction-for-vlms main.py:99-115, TransCLIP_solver/bench_utils.py: the few-shot method's softmaxed
predictions or text prototypes as the prior, the frozen CLIP test features as the features).

The composed config holds both parts' configs under their names (`{"lora": {...}, "transclip": {...}}`),
each taken from its own `[methods.NAME]` table / `--set NAME.key=...`; the result's method identity is the
composed name and that config, plus each part's version and plug-in source (`identity.method_identity`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fsbench.backbones import BackboneInfo
from fsbench.errors import ConfigError, UnknownNameError
from fsbench.method import METHODS, FewShotData, Method

SEP = "+"  # METHOD+STEP
_COMPOSED: dict[str, type[Method]] = {}  # one class per composed name, so that it is the same object each time


@dataclass
class TransductiveInputs:
    """What a transductive step sees of one whole evaluation set; never labels.

    `features`: (N, D) frozen, L2-normalised image features; `prior`: (N, C) class probabilities of the
    method underneath (the step's own zero-shot prior when it runs alone); `source`: the name of the method
    the prior comes from, None for the step's own.
    """

    features: torch.Tensor
    prior: torch.Tensor
    source: str | None = None


class TransductiveStep(Method):
    """A method that refines predictions with the whole unlabelled evaluation set (`transduce`). Alone, its
    prior is the softmax of its own `logits` (e.g. zero-shot CLIP); as `METHOD+STEP`, METHOD's."""

    input_kind = "features"
    test_time = "transductive"

    @abstractmethod
    def transduce(self, inputs: TransductiveInputs) -> torch.Tensor:
        """(N, C) class probabilities of the evaluation set."""

    def uses_shots(self) -> bool:
        """Whether `fit` needs the labelled shots' features (then a composition encodes them)."""
        return False

    @torch.no_grad()
    def transductive_logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return probability_logits(self.transduce(TransductiveInputs(x, self.logits(x).float().softmax(-1))))


def probability_logits(probs: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax and argmax are `probs`' (log, with exact zeros kept finite)."""
    return probs.float().clamp_min(torch.finfo(torch.float32).tiny).log()


def steps() -> list[str]:
    """The registered transductive steps (what may follow `+`)."""
    return [n for n in METHODS.names() if issubclass(METHODS.get(n), TransductiveStep)]


def composed_method(name: str) -> type[Method]:
    """The class of `METHOD+STEP`, built once per name; did-you-mean on a wrong part."""
    key = name.lower()
    parts = key.split(SEP)
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise UnknownNameError(f"unknown method {name!r}: a method with a transductive step is METHOD{SEP}STEP, "
                               f"e.g. lora{SEP}transclip")
    try:
        base = METHODS.get(parts[0].strip())
    except UnknownNameError as exc:
        raise UnknownNameError(f"{exc} (in {name!r})") from None
    known = steps()
    if parts[1].strip() not in known:
        close = difflib.get_close_matches(parts[1].strip(), known, n=1, cutoff=0.5)
        hint = f"; did you mean '{parts[0].strip()}{SEP}{close[0]}'?" if close else f"; steps: {', '.join(known)}"
        raise UnknownNameError(f"unknown transductive step {parts[1].strip()!r} in {name!r}{hint}")
    step = METHODS.get(parts[1].strip())
    if base.test_time != "none":
        raise ConfigError(f"{name!r}: {base.name} already uses the unlabelled test data (test_time "
                          f"{base.test_time!r}); a transductive step goes on top of an inductive method")
    if not base.name.isidentifier():
        raise ConfigError(f"{name!r}: {base.name!r} cannot name a field of the composed config; register the "
                          "method under a name of letters, digits and '_'")
    cached = _COMPOSED.get(key)
    if cached is None or cached.parts != (base, step):  # a plug-in edited and loaded again registers anew
        _COMPOSED[key] = compose(base, step)  # type: ignore[arg-type]
    return _COMPOSED[key]


def compose(base: type[Method], step: type[TransductiveStep]) -> type[Method]:
    """A `Composed` subclass for `base` + `step`, named `base+step`, with a config of both parts."""
    config = dataclasses.make_dataclass(
        f"{base.__name__}Plus{step.__name__}Config",
        [(base.name, base.Config, field(default_factory=base.Config)),
         (step.name, step.Config, field(default_factory=step.Config))])
    config.__doc__ = f"{base.name}'s config and {step.name}'s, each from its own [methods.NAME] table."
    encoded = base.eval_encoder is not None  # the frozen features are not what base's logits read: take images
    attrs: dict[str, Any] = {
        "Config": config, "base_cls": base, "step_cls": step, "parts": (base, step),
        "input_kind": base.input_kind, "val_request": base.val_request, "unseen_reason": base.unseen_reason,
        "eval_input": "images" if encoded else base.eval_input, "eval_encoder": None,
        "paper": f"{base.paper}; {step.name}: {step.paper}",
        "summary": f"{base.name} with {step.name}'s transductive step on its test-set predictions",
        "__module__": __name__,
    }
    cls = type(f"{base.__name__}Plus{step.__name__}", (Composed,), attrs)
    cls.name = f"{base.name}{SEP}{step.name}"
    return cls


class Composed(Method):
    """`base` fitted as usual, with `step` on its predictions under a transductive protocol (see the module).

    `transductive_encode` turns each batch of evaluation inputs into the base's logits beside the frozen image
    features; `transductive_logits` receives them for the whole set and runs the step. `fresh()` copies the
    step only (its state is per evaluation set); the fitted base is shared, it does not change at test time.
    """

    base_cls: ClassVar[type[Method]]
    step_cls: ClassVar[type[TransductiveStep]]
    parts: ClassVar[tuple[type[Method], ...]] = ()
    test_time = "transductive"

    def __init__(self, config: Any, ctx: Any):
        super().__init__(config, ctx)
        self.base = self.base_cls(getattr(config, self.base_cls.name), ctx)
        self.step = self.step_cls(getattr(config, self.step_cls.name), ctx)

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        self.base.fit(train, val)
        if self.step.uses_shots():
            train, val = self._with_features(train), self._with_features(val)
        self.step.fit(train, val)
        self._sync_config()

    def _sync_config(self) -> None:
        """The parts' configs as they ran (a part may resolve placeholders in `fit`)."""
        self.config = dataclasses.replace(self.config, **{self.base_cls.name: self.base.config,
                                                          self.step_cls.name: self.step.config})

    def _with_features(self, data: FewShotData) -> FewShotData:
        """`data` with its frozen features (an image method's shots are encoded through the feature cache)."""
        if data is None or data.features is not None or self.ctx.features is None:
            return data
        feats = self.ctx.features.encode(data, self.ctx.backbone.preprocess, tag="")
        return dataclasses.replace(data, features=feats.x)

    def _base_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the base's `logits` reads, from what the runner hands this method."""
        if self.base_cls.eval_encoder is not None:  # the runner hands images: encode them as the base's cache would
            with torch.no_grad():
                return self.base_cls.eval_encoder[1](self.ctx.backbone.model, x)
        return x

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) frozen L2-normalised image features of a batch of what this method receives."""
        if (self.eval_input or self.input_kind) == "features":
            return x.float()  # the feature cache's: frozen, L2-normalised
        with torch.no_grad():
            return F.normalize(self.ctx.backbone.model.encode_image(x).float(), dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.logits(self._base_input(x))

    @torch.no_grad()
    def transductive_encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.logits(x).float(), self.frozen_features(x)], dim=1)

    @torch.no_grad()
    def transductive_logits(self, x: torch.Tensor) -> torch.Tensor:
        n = self.ctx.num_classes
        prior = x[:, :n].float().softmax(-1)
        inputs = TransductiveInputs(x[:, n:].float(), prior, self.base_cls.name)
        return probability_logits(self.step.transduce(inputs))

    def fresh(self) -> Method:
        new = copy.copy(self)
        new.step = self.step.fresh()
        return new

    def retarget(self) -> None:
        self.base.retarget()
        self.step.retarget()

    @classmethod
    def scores_unseen_classes(cls) -> bool:
        return cls.base_cls.scores_unseen_classes() and cls.step_cls.scores_unseen_classes()

    @classmethod
    def supports(cls, backbone: BackboneInfo) -> str | None:
        return cls.base_cls.supports(backbone) or cls.step_cls.supports(backbone)

    @classmethod
    def reference_seed(cls, config: Any) -> int | None:
        return cls.base_cls.reference_seed(getattr(config, cls.base_cls.name))

    @classmethod
    def user_overrides(cls, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {part.name: part.user_overrides(sections) for part in cls.parts}

    def trainable_params(self) -> int:
        return self.base.trainable_params()

    def inference_overhead(self) -> int:
        return self.base.inference_overhead()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.base.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.base.load_state_tensors(tensors)
        self.step.fit(None, None)  # type: ignore[arg-type]  (a step without shots fits nothing from data)
