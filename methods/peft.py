"""A bridge to Hugging Face `peft` (github.com/huggingface/peft): any of its layer-injecting
adapters (LoRA, DoRA, IA3, VeRA, LoHa, LoKr, BOFT, ...) on the open_clip CLIP, trained with the
CLIP-LoRA recipe of `methods/lora.py` (AdamW lr 2e-4, 500 x K steps of batch 32, cosine,
random crops, text re-encoded every step), whose training loop it reuses.

The adapter is a peft config given as JSON (`--set 'peft.config={"peft_type": "IA3", ...}'`)
or as a table in bench.toml (`[methods.peft.config]`). fsbench's unfused attention exposes
`q_proj`, `k_proj`, `v_proj`, `out_proj` (nn.Linear) and the MLPs `c_fc`, `c_proj`, so
`target_modules` name them (timm towers of SigLIP / EVA-CLIP: the same `q_proj`, `k_proj`, `v_proj`,
split out of their fused `qkv`, and `proj`, `fc1`, `fc2`); `encoder` restricts the config to one tower.
The default config is CLIP-LoRA expressed in peft: rank 2, alpha 1, dropout 0.25, rsLoRA scaling alpha / sqrt(r),
q/k/v of both towers.

Limits: prompt-learning types (prompt, prefix and p-tuning) need a transformers model and are
refused; after training the adapter is merged into the weights with peft's `merge_adapter`
(`merge = false` for types that cannot merge); peft must be installed (`pip install fsbench[peft]`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from fsbench.errors import ConfigError
from fsbench.method import count_trainable, register_method
from fsbench.methods.lora import CLIPLoRA
from fsbench.text import text_tower
from fsbench.training import EndToEnd, LoRARecipe, check_end_to_end, check_lora_recipe
from fsbench.tuners import merged_state_dict

CLIP_LORA_IN_PEFT = {"peft_type": "LORA", "r": 2, "lora_alpha": 1, "lora_dropout": 0.25, "use_rslora": True,
                     "target_modules": ["q_proj", "k_proj", "v_proj"]}


def peft_dict(config: str | dict) -> dict[str, Any]:
    """The peft config as a dict: parsed from JSON, or the table as given."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON ({exc.msg}): {config!r}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError('config must be a JSON object with a "peft_type", e.g. {"peft_type": "LORA", "r": 2}')
    return config


def build_peft_config(config: str | dict) -> Any:
    """A `peft.PeftConfig` from the JSON/table form; unknown types and keys are errors."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError("the peft method needs Hugging Face peft: pip install fsbench[peft]")
    import peft

    values = peft_dict(config)
    try:
        cfg = peft.get_peft_config(values)
    except KeyError:
        raise ValueError(f"unknown peft_type {values['peft_type']!r}; "
                         f"valid: {', '.join(sorted(str(t.value) for t in peft.PeftType))}") from None
    if cfg.is_prompt_learning:
        raise ValueError(f"peft_type {values['peft_type']!r} is prompt learning, which needs a transformers "
                         "model; use an adapter type (LORA, IA3, VERA, LOHA, LOKR, BOFT, ...)")
    return cfg


@dataclass
class PeftAdapterConfig:
    """Which peft adapter, on which tower(s), merged or not: `PeftConfig`'s own fields (a base, so that
    they come first in the stored config, as they always have)."""

    config: str | dict = json.dumps(CLIP_LORA_IN_PEFT)  # peft config: JSON object (or TOML table) with peft_type
    encoder: str = "both"  # towers the peft config is applied to: vision | text | both
    merge: bool = True  # merge the adapter into the weights for evaluation


@dataclass
class PeftConfig(EndToEnd, LoRARecipe, PeftAdapterConfig):
    """A peft config plus CLIP-LoRA's training recipe and end-to-end pass (the toolkit's pieces `lora` is
    made of, same defaults)."""

    section: ClassVar[str] = "peft"  # the config section its errors name (a preset: its own)

    def __post_init__(self) -> None:
        if self.encoder not in ("vision", "text", "both"):
            raise ValueError(f"encoder must be vision, text or both, got {self.encoder!r}")
        check_lora_recipe(self.section, self)
        check_end_to_end(self.section, self)
        build_peft_config(self.config)


@register_method("peft")
class Peft(CLIPLoRA):
    """Any peft adapter on the CLIP towers, trained with the CLIP-LoRA recipe."""

    Config = PeftConfig
    paper = "Mangrulkar et al., PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods, 2022 (software)"
    summary = "Hugging Face peft adapter (LoRA, DoRA, IA3, VeRA, ...) with the CLIP-LoRA recipe"

    def adapt(self, model: nn.Module) -> list[nn.Parameter]:
        import peft

        text = getattr(text_tower(model), "transformer", None)
        tower = {"vision": model.visual, "text": text, "both": model}[self.config.encoder]
        try:
            self.peft_model = peft.get_peft_model(tower, build_peft_config(self.config.config))
        except ValueError as exc:  # no target module in this tower (ConvNeXt vision: no attention)
            raise ConfigError(f"peft on the {self.config.encoder} tower(s): {str(exc).splitlines()[0][:200]}") from None
        return [p for p in model.parameters() if p.requires_grad]

    def merge(self) -> None:
        if self.config.merge:
            self.peft_model.merge_adapter()

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The adapted CLIP as open_clip weights: a copy with peft's layers merged and removed."""
        model, wrapper = copy.deepcopy((self.model, self.peft_model))  # one copy: the wrapper wraps `model`
        if self.config.merge:
            wrapper.unload()  # already merged: the base weights hold the update
        else:
            wrapper.merge_and_unload()
        return merged_state_dict(model)

    def trainable_params(self) -> int:
        return count_trainable(self.model)

    def inference_overhead(self) -> int:
        return 0 if self.config.merge else self.trainable_params()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        import peft

        return {k: v.detach() for k, v in peft.get_peft_model_state_dict(self.peft_model).items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        import peft

        self.prepare()
        unexpected = peft.set_peft_model_state_dict(self.peft_model, tensors).unexpected_keys
        if unexpected:
            raise ValueError(f"not adapter weights of this peft config: {unexpected[:3]}")
        self.finish()


# ---- LoRA's relatives as presets: CLIP-LoRA's placement (q, k, v of both towers, rank 2, dropout 0.25) and
# recipe, only the variant changes. CLIP-LoRA's own scaling alpha / sqrt(r) is already rsLoRA's (Kalajdzievski
# 2023), so `peft`'s default config is the rsLoRA preset; standard LoRA's alpha / r is `use_rslora: false`.
PRESETS: dict[str, dict[str, Any]] = {
    # DoRA (Liu et al., ICML 2024): a trained magnitude per output row on top of the LoRA direction
    "dora": dict(CLIP_LORA_IN_PEFT, use_dora=True),
    # PiSSA (Meng et al., NeurIPS 2024): A, B from the top-r singular pairs of W, the residual kept frozen
    "pissa": dict(CLIP_LORA_IN_PEFT, init_lora_weights="pissa"),
    # VeRA (Kopiczko et al., ICLR 2024): frozen shared random A, B; trained scaling vectors d and b
    "vera": {"peft_type": "VERA", "r": 2, "vera_dropout": 0.25, "target_modules": ["q_proj", "k_proj", "v_proj"]},
}
PAPERS = {
    "dora": "Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024",
    "pissa": "Meng et al., PiSSA: Principal Singular Values and Singular Vectors Adaptation, NeurIPS 2024",
    "vera": "Kopiczko et al., VeRA: Vector-based Random Matrix Adaptation, ICLR 2024",
}


def _preset(name: str) -> type[Peft]:
    """Register `lora_<name>`: `peft` whose default config is the preset (every field still settable)."""
    config = type(f"{name.title()}Config", (PeftConfig,), {
        "__annotations__": {"config": "str | dict"}, "config": json.dumps(PRESETS[name]), "section": f"lora_{name}",
        "__doc__": f"The {name} preset of `peft` (CLIP-LoRA's placement and recipe).", "__module__": __name__})
    method = type(f"Lora{name.title()}", (Peft,), {
        "Config": dataclass(config), "paper": PAPERS[name], "__doc__": f"{PAPERS[name].split(',')[1].strip()} "
        "through peft, with CLIP-LoRA's placement (q, k, v of both towers, rank 2) and recipe.",
        "summary": f"{name} preset of peft: CLIP-LoRA's placement and recipe, rank 2",
        # this module's, not `abc`'s (what `type` gives): the catalog lists them and their identity is built in
        "__module__": __name__})
    return register_method(f"lora_{name}")(method)


for _name in PRESETS:
    _preset(_name)
