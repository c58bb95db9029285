"""Few-shot samplers: which train and validation images a (dataset, K, seed) means.

A sampler is a named, versioned part of a protocol's episode and of every result's identity. Two runs
compare only if they trained on the same images, and a number can be set beside a published one only
if it trained on the images the published code drew; so the reference codes' draws are reproduced
exactly, each under its own name:

- `fsbench`: a private `random.Random` per (dataset, split, K, seed), classes in label order; validation
  min(K, 4) per class from the val split; a class with fewer than K images is refused, or sampled with
  replacement under `--allow-repeat`.
- `clip_lora`: the official CLIP-LoRA code's draw, exactly (`fsbench.samplers_ref`).
- `coop`: CoOp / Dassl's draw, exactly (`fsbench.samplers_ref`).

A sampler returns a `FewShotSplit`: positions into two named splits of the dataset (`train_split`,
`val_split`: "train", "val", or "train+val", the train folder of a dataset whose val split fsbench
holds out of it, in the reference codes' folder order). This module never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from fsbench.data.base import DatasetSplits
from fsbench.registry import Registry
from fsbench.splits import FewShotSplit, draw_split


class Sampler:
    """Base class of samplers. Subclasses set `version` (bump when a change alters the images drawn),
    `summary` (one line for `fsbench ls samplers`) and implement `draw`.

    `val_shots` is the validation size the method asked for (None: the sampler's own rule); a sampler that
    reproduces a reference code follows that code's rule and may ignore it (it says so in `summary`).
    `repeat` is `--allow-repeat` (only samplers without a small-class rule of their own read it).
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    summary: ClassVar[str] = ""
    honours_repeat: ClassVar[bool] = False  # `--allow-repeat` changes its draw (so it is in the identity)

    def draw(self, data: DatasetSplits, shots: int, seed: int, val_shots: int | None = None,
             repeat: bool = False) -> FewShotSplit:
        raise NotImplementedError

    @classmethod
    def tag(cls) -> str:
        """The sampler's part of a result identity and of a persisted draw's name."""
        return f"{cls.name}/v{cls.version}"


SAMPLERS: Registry[type[Sampler]] = Registry("sampler", base=Sampler)
# The sampler of `fewshot` runs unless `--sampler` / `[study] sampler` says otherwise.
DEFAULT_SAMPLER = "clip_lora"


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    return SAMPLERS.register(name)


def get_sampler(name: str) -> Sampler:
    """The sampler `name` (did-you-mean on an unknown name)."""
    _load_reference_samplers()
    return SAMPLERS.get(name)()


def _load_reference_samplers() -> None:
    try:  # the reference codes' samplers register themselves on import
        import fsbench.samplers_ref  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "fsbench.samplers_ref":
            raise


@register_sampler("fsbench")
class FsbenchSampler(Sampler):
    """fsbench's own draw: each (dataset, split, K, seed) has its own seeded `random.Random`, classes in label
    order, so a class's images do not depend on the other classes (adding a class to a split file leaves the
    other classes' shots as they were); validation min(K, 4) per class from the val split."""

    summary = "per-class independent draw (fsbench's own); val min(K, 4) from the val split"
    honours_repeat = True

    def draw(self, data, shots, seed, val_shots=None, repeat=False):
        return draw_split(data, shots, seed, repeat, val_shots)
