"""The training toolkit every trained method uses: one shuffler (`index_batches`, which every batch source
draws from), Dassl's warm-up + cosine schedule, one optimisation loop (`train_epochs`; CLIP-LoRA's
iteration-budget schedule is an option of it, `train_iterations`), one best-on-validation rule
(`BestOnValidation`, `best_on_validation`), and the recipes as config pieces (`DasslRecipe` =
`DasslSGD` + `DasslSchedule`; `LoRARecipe`, `EndToEnd`).

The CoOp family (CoOp, CoCoOp, KgCoOp, ProGrad, MaPLe, PLOT++), CLIP-Adapter and TaskRes all train
with Dassl (github.com/KaiyangZhou/Dassl.pytorch, c61a1b5); this module holds its rules once:
- `dassl_steps`: the train loader drops its last partial batch when the set holds at least one
  batch (dassl/data/data_manager.py:43), else yields one batch of everything;
- `dassl_lr`: ConstantWarmupScheduler (dassl/optim/lr_scheduler.py) around CosineAnnealingLR, stepped
  once per epoch;
- `DasslRecipe`: SGD with momentum 0.9 and weight decay 5e-4 (dassl/config/defaults.py OPTIM), batch 32.

CLIP-LoRA and its family (lora, peft, clip_svd, two_stage) train with `train_iterations` on
`image_batches(..., steps=all_steps)` (the official loader keeps the last partial batch).

Usage (a method's `fit`)::

    recipe = cfg  # a config that inherits DasslRecipe
    opt = recipe.optimizer([param])
    batches = shuffled_batches(x, y, recipe.batch_size, ctx.generator(1))
    train_epochs(ctx, opt, batches, loss_fn, epochs, dassl_steps(len(y), recipe.batch_size),
                 recipe.schedule(epochs), "train mymethod")

Randomness is explicit: every shuffle draws from a `torch.Generator` the caller seeds (`ctx.generator`),
one `randperm` per epoch, so two runs with the same seed see the same batches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Generic, Literal, TypeVar

import torch

from fsbench.checks import (
    check_at_least,
    check_betas,
    check_crop_scale,
    check_fraction,
    check_non_negative,
    check_positive,
)
from fsbench.curves import CurveRecorder
from fsbench.data.base import Item
from fsbench.errors import RunFailed
from fsbench.images import load_images
from fsbench.method import Context, FewShotData

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# a custom backward: (loss, scaler) -> None; must leave the (scaled) gradients in `.grad`
Backward = Callable[[torch.Tensor, torch.amp.GradScaler], None]
T = TypeVar("T")


# ---- batches ---------------------------------------------------------------------------------------


def dassl_steps(n: int, batch_size: int) -> int:
    """Batches per epoch of Dassl's train loader: the last partial batch is dropped when the set
    holds at least one batch (Dassl c61a1b5, dassl/data/data_manager.py:43), else one batch of all."""
    return n // batch_size if n >= batch_size else 1


def all_steps(n: int, batch_size: int) -> int:
    """Batches per epoch that keep the last partial batch (PyTorch's `drop_last=False`)."""
    return max(1, math.ceil(n / batch_size))


def index_batches(n: int, batch_size: int, generator: torch.Generator,
                  steps: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless (epoch, indices) batches: one `randperm(n)` per epoch, then `steps` consecutive slices
    of `batch_size` (default `dassl_steps(n, batch_size)`; `all_steps` keeps the partial batch)."""
    steps = dassl_steps(n, batch_size) if steps is None else steps
    for epoch in itertools.count():
        order = torch.randperm(n, generator=generator)
        for i in range(steps):
            yield epoch, order[i * batch_size:(i + 1) * batch_size]


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator,
                     steps: int | None = None) -> Batches:
    """Endless epochs of shuffled (x, y) batches of tensors (cached features); `steps` per epoch as
    `index_batches` (default: Dassl's drop-last rule)."""
    for _, idx in index_batches(len(y), batch_size, generator, steps):
        yield x[idx.to(x.device)], y[idx.to(y.device)]


def image_batches(items: Sequence[Item], root: Path, transform: Callable, batch_size: int,
                  generator: torch.Generator, steps: int | None = None) -> Batches:
    """Endless epochs of shuffled, freshly augmented image batches from images decoded once.

    Few-shot sets are small (at most 16 x 1000 images), so every file is decoded once and augmented
    in memory. Shuffling uses `generator`; the random transforms use torch's global RNG, which the
    runner seeds per run. `steps` per epoch as `index_batches` (default: Dassl's drop-last rule).
    """
    images = load_images(items, root)
    labels = torch.tensor([it.label for it in items], dtype=torch.long)
    for _, idx in index_batches(len(images), batch_size, generator, steps):
        yield torch.stack([transform(images[i]) for i in idx.tolist()]), labels[idx]


def fewshot_image_batches(data: FewShotData, transform: Callable, batch_size: int, generator: torch.Generator,
                          steps: int | None = None) -> Batches:
    """`image_batches` of a few-shot set's items."""
    return image_batches(data.items, data.image_root, transform, batch_size, generator, steps)


# ---- schedules -------------------------------------------------------------------------------------


def dassl_lr(epoch: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
    """Learning rate of `epoch` under Dassl's ConstantWarmupScheduler wrapping CosineAnnealingLR.

    Warm-up epochs run at the constant `warmup_lr`; the cosine (period `epochs`) starts after them,
    so epoch `warmup_epochs` runs at the full `lr`.
    """
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def cosine_lr(step: int, lr: float, total: int) -> float:
    """CosineAnnealingLR(T_max=total, eta_min=0) at `step`, in closed form (no warm-up)."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / total))


def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's epochs per shot count (CoOp COOP.md, configs/trainers/CoOp/*_ep50/100/200): 50 for 1 shot,
    100 for 2-4, 200 for 8-16; 50 for every shot count on ImageNet."""
    if dataset == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


# ---- the recipe ------------------------------------------------------------------------------------


@dataclass
class DasslSGD:
    """Dassl's SGD fields (dassl/config/defaults.py OPTIM): lr, momentum 0.9, weight decay 5e-4."""

    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class DasslSchedule:
    """Dassl's batches and schedule: batch size, epochs, a constant warm-up then cosine (`dassl_lr`). A piece
    of its own for methods with another optimiser (TaskRes: Adam; CLAP: SGD without weight decay)."""

    batch_size: int = 32
    epochs: int = 0  # 0 = the method's own schedule (e.g. CoOp's 50 / 100 / 200 per shot count)
    warmup_epochs: int = 1  # constant warm-up epochs at warmup_lr before the cosine
    warmup_lr: float = 1e-5

    section: ClassVar[str] = "recipe"

    def __post_init__(self) -> None:
        check_dassl_schedule(self.section, self)

    def lr_schedule(self, lr: float, epochs: int) -> Callable[[int], float]:
        """epoch -> learning rate: Dassl's constant warm-up then cosine from `lr` over `epochs`."""
        return lambda epoch: dassl_lr(epoch, lr, epochs, self.warmup_epochs, self.warmup_lr)


def check_dassl_schedule(section: str, cfg: DasslSchedule) -> None:
    """Range checks of the schedule fields, as one-line `ConfigError`s naming `section.field`."""
    check_positive(section, "warmup_lr", cfg.warmup_lr)
    check_at_least(section, "batch_size", cfg.batch_size, 1)
    check_at_least(section, "epochs", cfg.epochs, 0)
    check_at_least(section, "warmup_epochs", cfg.warmup_epochs, 0)


@dataclass
class DasslRecipe(DasslSchedule, DasslSGD):
    """Dassl's SGD recipe (the CoOp family's): `DasslSGD` then `DasslSchedule` (fields in that order), a base
    class of method configs, so its fields stay top-level TOML keys (`[methods.coop] lr = 0.002`).
    Subclasses redeclare a field to change its default and set `section` (the method name) for error
    messages."""

    section: ClassVar[str] = "recipe"

    def __post_init__(self) -> None:
        check_recipe(self.section, self)

    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.SGD:
        """SGD over `params` with the recipe's lr, momentum and weight decay."""
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def schedule(self, epochs: int) -> Callable[[int], float]:
        """epoch -> learning rate: Dassl's constant warm-up then cosine over `epochs`."""
        return self.lr_schedule(self.lr, epochs)


def check_recipe(section: str, cfg: DasslRecipe) -> None:
    """Range checks of the recipe fields, as one-line `ConfigError`s naming `section.field`."""
    check_positive(section, "lr", cfg.lr)
    check_fraction(section, "momentum", cfg.momentum)
    check_non_negative(section, "weight_decay", cfg.weight_decay)
    check_dassl_schedule(section, cfg)


@dataclass
class LoRARecipe:
    """CLIP-LoRA's optimisation recipe (github.com/MaxZanella/CLIP-LoRA 358f0d7, lora.py:73-76, main.py):
    AdamW (lr 2e-4, weight decay 1e-2, betas 0.9/0.999), `iters_per_shot` x shots updates of batch 32,
    cosine to `eta_min` (`train_iterations`). A base of method configs (lora, peft, clip_svd), so its
    fields stay top-level keys; a method redeclares a field to change its default."""

    lr: float = 2e-4
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size: int = 32
    iters_per_shot: int = 500  # total steps = iters_per_shot x shots
    eta_min: float = 1e-6  # cosine schedule floor

    section: ClassVar[str] = "recipe"

    def __post_init__(self) -> None:
        check_lora_recipe(self.section, self)


def check_lora_recipe(section: str, cfg: LoRARecipe) -> None:
    """Range checks of the recipe fields, naming `section.field`."""
    check_positive(section, "lr", cfg.lr)
    check_non_negative(section, "weight_decay", cfg.weight_decay)
    check_non_negative(section, "eta_min", cfg.eta_min)
    check_betas(section, "betas", cfg.betas)
    check_at_least(section, "batch_size", cfg.batch_size, 1)
    check_at_least(section, "iters_per_shot", cfg.iters_per_shot, 1)


AUGMENT_PATHS = ("auto", "device", "pil")


@dataclass
class EndToEnd:
    """How an end-to-end method trains through both towers (CLIP-LoRA's way): logits scale, random crops,
    where they are drawn, and how the class prompts are grouped per text pass."""

    logit_scale: float = 100.0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    # "device": images decoded once to uint8 tensors on the training device, crops drawn as
    # torchvision does and resized there in batches (fsbench.augment); "pil": torchvision's PIL
    # transforms on the CPU, one image at a time (the official code's path); "auto": "device"
    # on CUDA, "pil" on CPU (where per-image PIL crops of small images are the faster path)
    augment: str = "auto"
    text_buckets: int = 4  # prompt length groups per text pass (fsbench.text.bucket_tokens); same maths

    section: ClassVar[str] = "end_to_end"

    def __post_init__(self) -> None:
        check_end_to_end(self.section, self)


def check_end_to_end(section: str, cfg: EndToEnd) -> None:
    """Range checks of the end-to-end fields, naming `section.field`."""
    check_positive(section, "logit_scale", cfg.logit_scale)
    check_crop_scale(section, "crop_scale", cfg.crop_scale)
    check_at_least(section, "text_buckets", cfg.text_buckets, 1)
    if cfg.augment not in AUGMENT_PATHS:
        raise ValueError(f"augment must be 'auto', 'device' or 'pil', got {cfg.augment!r}")


# ---- the loop --------------------------------------------------------------------------------------


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_epochs(ctx: Context, opt: torch.optim.Optimizer, batches: Batches, loss_fn: LossFn, epochs: int,
                 steps: int, lr_of_epoch: Callable[[int], float] | None, desc: str, *, amp: bool = True,
                 lr_of_step: Callable[[int], float] | None = None, backward: Backward | None = None,
                 end_epoch: Callable[[int], None] | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, total: int | None = None,
                 track_updates: bool = False) -> None:
    """The one optimisation loop: `epochs` x `steps` updates of `loss_fn(x, y)` on `batches`.

    Per epoch the lr is set to `lr_of_epoch(epoch)` (None: left as the optimiser has it); with
    `lr_of_step`, to `lr_of_step(global step)` before every update instead; a torch `scheduler` is
    stepped after every update. `total` stops after that many updates (the last epoch cut short):
    an iteration budget, as `train_iterations` runs it. Under `amp` the loss runs
    in `ctx.autocast()` with a GradScaler for fp16. `backward(loss, scaler)` replaces
    `scaler.scale(loss).backward()` (gradient surgery, e.g. ProGrad); `end_epoch(epoch)` runs after
    each epoch's updates (validation, outer steps). Every update's loss and learning rate go to
    `ctx.curves` (a phase named `desc`), fetched once per epoch together with the non-finite check
    (each fetch is a host-device sync); a non-finite loss raises `RunFailed`. Progress goes through
    `ctx.track`, one tick per epoch, or per update with `track_updates` (a step timer's ticks).
    """
    scaler = torch.amp.GradScaler(enabled=amp and ctx.amp_dtype == torch.float16)
    total = epochs * steps if total is None else total
    ticks = iter(ctx.track(range(total), total, desc)) if track_updates else None
    ctx.curves.start(desc)
    for epoch in range(epochs) if track_updates else ctx.track(range(epochs), epochs, desc):
        if lr_of_epoch is not None:
            _set_lr(opt, lr_of_epoch(epoch))
        losses, lrs = [], []
        for step in range(epoch * steps, min((epoch + 1) * steps, total)):
            if ticks is not None:
                next(ticks)
            if lr_of_step is not None:
                _set_lr(opt, lr_of_step(step))
            lrs.append(opt.param_groups[0]["lr"])
            losses.append(_update(ctx, opt, next(batches), loss_fn, scaler, amp, backward))
            if scheduler is not None:
                scheduler.step()
        values = torch.stack(losses).float().cpu()
        ctx.curves.losses(values.tolist(), lrs)
        if not torch.isfinite(values).all():
            where = (f"epoch {epoch + 1} of {epochs}" if total == epochs * steps
                     else f"steps {epoch * steps + 1}-{epoch * steps + len(losses)} of {total}")
            raise RunFailed(f"{desc}: non-finite loss in {where}")
        if end_epoch is not None:
            end_epoch(epoch)
    if ticks is not None:
        next(ticks, None)  # past the last update: the tracker closes (a progress bar, a step timer's clock)


SYNC_EVERY = 50  # updates of `train_iterations` between two reads of their losses (each read is a host-device sync)


def train_iterations(ctx: Context, opt: torch.optim.Optimizer, batches: Batches, loss_fn: LossFn, total: int,
                     eta_min: float, desc: str, *, amp: bool = True) -> None:
    """CLIP-LoRA's official schedule on the one loop: `total` updates, the learning rate following
    `CosineAnnealingLR(T_max=total, eta_min)` stepped after every update (github.com/MaxZanella/CLIP-LoRA
    358f0d7, lora.py:73-126); epochs are the batches' own, as the official loader's (`shuffle=True`,
    `drop_last=False`: main.py:48, datasets/utils.py:375), i.e. `image_batches(..., steps=all_steps)`.
    Losses are read and checked every `SYNC_EVERY` updates; progress ticks once per update (the
    benchmarks' step timer, `benchmarks/common.py` `StepClock`); `amp` as in `train_epochs`.
    """
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1), eta_min=eta_min)
    train_epochs(ctx, opt, batches, loss_fn, math.ceil(total / SYNC_EVERY), SYNC_EVERY, None, desc, amp=amp,
                 scheduler=scheduler, total=total, track_updates=True)


def _update(ctx: Context, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], loss_fn: LossFn,
            scaler: torch.amp.GradScaler, amp: bool, backward: Backward | None) -> torch.Tensor:
    """One optimiser step on `batch`; returns its loss (a detached device tensor, no sync)."""
    x, y = batch
    with ctx.autocast() if amp else torch.autocast(ctx.device.type, enabled=False):
        loss = loss_fn(x.to(ctx.device, non_blocking=True), y.to(ctx.device))
    opt.zero_grad(set_to_none=True)
    if backward is None:
        scaler.scale(loss).backward()
    else:
        backward(loss, scaler)
    scaler.step(opt)
    scaler.update()
    return loss.detach().reshape(())


# ---- selection -------------------------------------------------------------------------------------


class BestOnValidation(Generic[T]):
    """The one selection rule: keep the state with the highest validation accuracy (percent,
    `fsbench.metrics.accuracy`).

    `offer(accuracy, snapshot)` keeps `snapshot()` (called only then) when the accuracy beats the best
    so far; on ties the first offer is kept (`ties="first"`, strict >) or the last (`ties="last"`, >=,
    LP++'s official rule). The first offer is always kept, even a NaN accuracy (a single candidate),
    unless `floor` is given: then an offer must beat `floor` too, else `initial` stays (GDA's official
    search keeps its default alpha unless one scores above 0). With `curves` (the run's
    `Context.curves`), every offered accuracy is recorded on the training curve (as a fraction, 0-1).
    """

    def __init__(self, initial: T | None = None, ties: Literal["first", "last"] = "first",
                 curves: CurveRecorder | None = None, floor: float | None = None):
        if ties not in ("first", "last"):
            raise ValueError(f"ties must be 'first' or 'last', got {ties!r}")
        self.state, self.ties, self.accuracy, self.curves = initial, ties, floor, curves
        self.index: int | None = None  # which offer (0-based) is kept
        self._offers = 0

    def offer(self, accuracy: float, snapshot: Callable[[], T]) -> bool:
        """Keep `snapshot()` if `accuracy` is the best so far; return whether it was kept."""
        n, self._offers = self._offers, self._offers + 1
        if self.curves is not None:
            self.curves.validation(accuracy / 100)
        better = self.accuracy is None or (accuracy >= self.accuracy if self.ties == "last"
                                           else accuracy > self.accuracy)
        if better:
            self.accuracy, self.state, self.index = accuracy, snapshot(), n
        return better


def best_on_validation(candidates: Iterable[T], accuracy_of: Callable[[T], float], *,
                       ties: Literal["first", "last"] = "first", initial: T | None = None,
                       floor: float | None = None) -> T | None:
    """A grid search: the candidate whose `accuracy_of` is highest under `BestOnValidation`'s rule
    (candidates scored in order; `ties`, `initial` and `floor` as there)."""
    best = BestOnValidation(initial, ties, floor=floor)
    for candidate in candidates:
        best.offer(accuracy_of(candidate), lambda c=candidate: c)
    return best.state
