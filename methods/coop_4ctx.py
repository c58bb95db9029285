"""CoOp (4): the CLIP-LoRA paper's "CoOp (4)" baseline (Zanella & Ben Ayed, CVPRW 2024, Tables 2-5):
CoOp (Zhou et al., IJCV 2022) with 4 context vectors instead of 16.

CoOp's configs with 4 context vectors are the `*_ctxv1` ones (github.com/KaiyangZhou/CoOp:
configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml, vit_b16_ep100_ctxv1.yaml, vit_b16_ctxv1.yaml, and
rn50_ep50_ctxv1.yaml): `CTX_INIT: "a photo of a"`, whose 4 tokens set the number of context vectors
(trainers/coop.py:72-80); COOP.md:83 says the paper's initialised runs use them. So the defaults are
CoOp's recipe (`methods/coop.py`: SGD lr 0.002, batch 32, 1 warm-up epoch at 1e-5 then cosine,
50 / 100 / 200 epochs for 1 / 2-4 / 8-16 shots) with the context initialised from "a photo of a".
`--set coop_4ctx.init=random --set coop_4ctx.n_ctx=4` gives 4 random N(0, 0.02) vectors instead.

Deviations: as CoOp (`methods/coop.py`). The paper states the token count only; the initialisation is
CoOp's own 4-token configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fsbench.method import register_method
from fsbench.methods.coop import CoOp, CoOpConfig


@dataclass
class CoOp4Config(CoOpConfig):
    """CoOp with CoOp's `ctxv1` initialisation: the 4 tokens of "a photo of a"."""

    n_ctx: int = 4  # ignored while `init` gives words (their 4 tokens); used with init = "random"
    init: str = "a photo of a"

    section: ClassVar[str] = "coop_4ctx"


@register_method("coop_4ctx")
class CoOp4(CoOp):
    """CoOp with 4 context vectors initialised from "a photo of a" (the paper's CoOp (4) row)."""

    Config = CoOp4Config
    paper = "Zhou et al., Learning to Prompt for Vision-Language Models, IJCV 2022 (4 context tokens)"
    summary = 'CoOp (4): 4 learnable context vectors initialised from "a photo of a"'
