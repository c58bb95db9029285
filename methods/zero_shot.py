"""Zero-shot CLIP (Radford et al., ICML 2021) with the dataset's CoOp prompt template."""

from __future__ import annotations

import torch

from fsbench.method import FewShotData, Method, register_method


@register_method("zero_shot")
class ZeroShot(Method):
    """Cosine similarity between frozen image features and the class-prompt embeddings.

    Templates are CoOp's per-dataset template (Zhou et al., IJCV 2022, `CUSTOM_TEMPLATES`);
    the logit scale (100) does not change the argmax and is kept for comparable logits.
    """

    input_kind = "features"
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    summary = "CLIP with the dataset's CoOp template, no training"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        self.weights = self.ctx.text_weights()

    def retarget(self) -> None:
        """Unseen classes: their prompts through the frozen text tower, as for the fitted ones."""
        self.fit(None, None)  # type: ignore[arg-type]  (zero-shot fits nothing from data)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * x.float() @ self.weights.T

    def cosine_scale(self) -> float | None:
        return 100.0 if type(self).logits is ZeroShot.logits else None  # a subclass with its own head: None
