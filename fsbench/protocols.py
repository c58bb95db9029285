"""Evaluation protocols: what a method is fitted on and what it is scored on.

A protocol turns (source dataset, K, seed) into an `Episode`: the few-shot train and validation
positions, the `ClassSet` the method is fitted on, and for each result it produces (one per
evaluated dataset) the named `EvalSet`s to score and how their accuracies become metrics.
The runner never branches on a protocol's name; a new protocol is one registered subclass.

Registered: `fewshot` (K shots of every class, all test images), `base2new` (CoCoOp's
base-to-new generalisation), `cross_dataset` (fit on a source, score on other datasets' classes),
`domain_generalisation` (fit on ImageNet, score on its shifted variants), `test_time` (online, one
unlabelled test image at a time in a seeded order), `transductive` (the whole unlabelled test set
at once) and `ood` (out-of-distribution detection, MCM's benchmark; `fsbench.ood`). This module never
imports torch, so the sweep planner and reports can use it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from fsbench.data.base import TRAIN_TEMPLATE, DatasetSplits
from fsbench.errors import DataError
from fsbench.registry import Registry
from fsbench.splits import MAX_VAL_SHOTS, FewShotSplit


@dataclass(frozen=True)
class ClassSet:
    """Classes a method is fitted on or scored against.

    `lineage` names the label space `labels` index into (the dataset itself, or "imagenet" for
    ImageNet's variants whose classes are ImageNet classes), so a class set can be recognised as
    a subset of another: a method fitted on ImageNet's 1,000 classes scores ImageNet-A's 200 by
    selecting rows, without needing to handle unseen classes.
    """

    dataset: str
    lineage: str
    labels: tuple[int, ...]
    names: tuple[str, ...]
    templates: tuple[str, ...]
    train_template: str = TRAIN_TEMPLATE

    def __len__(self) -> int:
        return len(self.names)

    def rows_in(self, other: ClassSet) -> list[int] | None:
        """Positions of this set's classes among `other`'s, or None if some class is not in `other`."""
        if self.lineage != other.lineage:
            return None
        where = {label: i for i, label in enumerate(other.labels)}
        rows = [where.get(label) for label in self.labels]
        return None if any(r is None for r in rows) else rows  # type: ignore[misc]

    def subset(self, positions: list[int]) -> ClassSet:
        """The classes at `positions` of this set, in that order."""
        return ClassSet(self.dataset, self.lineage, tuple(self.labels[i] for i in positions),
                        tuple(self.names[i] for i in positions), self.templates, self.train_template)


def class_set(data: DatasetSplits, source: DatasetSplits | None = None) -> ClassSet:
    """All classes of `data`; ImageNet variants carry their ImageNet label indices, matched by wnid to
    the classes of `source` (the ImageNet a method is fitted on) when it is given."""
    mapped = data.extra.get("imagenet_labels")
    if mapped is not None:
        lineage, labels = "imagenet", tuple(mapped)
        if source is not None and source.name == lineage:
            labels = _labels_by_wnid(data, source)
    else:
        lineage, labels = data.name, tuple(range(len(data.classnames)))
    return ClassSet(data.name, lineage, labels, tuple(data.classnames), tuple(data.templates), data.train_template)


def _labels_by_wnid(data: DatasetSplits, source: DatasetSplits) -> tuple[int, ...]:
    """The labels of `data`'s classes among `source`'s, by wnid (never by position: a source missing one
    class would shift every later label); a class the source lacks is a one-line DataError."""
    wnids, source_wnids = data.extra.get("wnids"), source.extra.get("wnids")
    if wnids is None or source_wnids is None:
        raise DataError(f"{data.name}: cannot match its classes to {source.name}'s: no wnids recorded")
    where = {w: i for i, w in enumerate(source_wnids)}
    absent = [w for w in wnids if w not in where]
    if absent:
        shown = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
        raise DataError(f"{data.name}: {len(absent)} of its {len(wnids)} classes have no class folder in"
                        f" {source.name} ({source.image_root}): {shown}; add them to {source.name} or leave"
                        f" {data.name} out of the targets")
    return tuple(where[w] for w in wnids)


@dataclass(frozen=True)
class EvalSet:
    """Test images to score: `positions` of `dataset`'s test split, each with its index in `classes`.
    An unlabelled set (`labelled=False`: OOD images, whose classes are none of `classes`) has no
    `targets`; it is scored over `classes` and no accuracy is computed on it."""

    metric: str
    dataset: str
    positions: tuple[int, ...]
    targets: tuple[int, ...]
    classes: ClassSet
    labelled: bool = True


@dataclass(frozen=True)
class Target:
    """One result of an episode: the dataset it reports on and the sets that make its metrics."""

    dataset: str
    evals: tuple[EvalSet, ...]


@dataclass(frozen=True)
class Episode:
    """What one run fits and evaluates. `train`/`val` are positions in the source dataset's splits
    `train_split`/`val_split` ("train", "val", "train+val"; validation carved out of the shots is
    `val_split="train"`), and `train_targets`/`val_targets` their class indices in `classes`."""

    source: str
    classes: ClassSet
    train: tuple[int, ...]
    train_targets: tuple[int, ...]
    val: tuple[int, ...]
    val_targets: tuple[int, ...]
    results: tuple[Target, ...]
    train_split: str = "train"
    val_split: str = "val"


# ---- what reports need to know: metrics and table shape, as data ------------------------------------------
SEED_RULES = ("mean", "hm_of_means")
AVERAGE_RULES = ("mean", "hm_of_averages", "none")


@dataclass(frozen=True)
class MetricInfo:
    """How a report shows and aggregates one metric of a protocol (lm-eval's `higher_is_better` /
    `aggregation`, as data).

    Attributes:
        name: the key in a result's `metrics`.
        display: column header ("H"); the name when empty.
        higher_is_better: False marks the header with "↓".
        seeds: how a cell aggregates seeds: "mean" (mean ± sample std), or "hm_of_means" (the harmonic
            mean of the cell's means of the two metrics in `of`; its std stays that of the per-seed values).
        average: how the Average over datasets is formed: "mean" of the per-dataset means,
            "hm_of_averages" (the harmonic mean of the Averages of `of`: CoCoOp's H), or "none".
        of: the two metrics a harmonic-mean rule combines; a seed that stores no value gets it from them.
        help: one sentence for the protocol's section of the report.
        digits: significant digits of a table cell (costs that span decades: 0.0018 and 250); 0 = the table's
            fixed decimals.
    """

    name: str
    display: str = ""
    higher_is_better: bool = True
    seeds: str = "mean"
    average: str = "mean"
    of: tuple[str, ...] = ()
    help: str = ""
    digits: int = 0

    def __post_init__(self):
        if self.seeds not in SEED_RULES or self.average not in AVERAGE_RULES:
            raise ValueError(f"metric {self.name!r}: seeds must be one of {SEED_RULES}, average one of {AVERAGE_RULES}")
        if (self.seeds == "hm_of_means" or self.average == "hm_of_averages") and len(self.of) != 2:
            raise ValueError(f"metric {self.name!r}: a harmonic-mean rule needs the two metrics it combines in `of`")

    @property
    def label(self) -> str:
        """The header: display name, "↓" when lower is better."""
        return (self.display or self.name) + ("" if self.higher_is_better else " ↓")


@dataclass(frozen=True)
class TableShape:
    """How a protocol's report table is laid out; one table per (backbone, shots), and per source dataset
    when the protocol's results carry one (`Protocol.source_result`: a "Source: X" column first).

    Attributes:
        columns: "datasets": rows are methods, a column per dataset (one table per metric; the few-shot
            table, CoCoOp's Tables 2 and 3); "metrics": rows are (dataset, method), a column per metric
            (CoCoOp's Table 1).
        average: the Average is over "datasets" (all of the block's), "targets" (the source left out) or
            "none".
        average_first: the Average comes before the datasets (CoCoOp's Table 1) instead of after.
        source_fallback: a protocol whose result on the source fills a missing source cell (marked ‡).
        reference: where the shape is published ("CoCoOp, Table 1"), shown in the section.
    """

    columns: str = "datasets"
    average: str = "datasets"
    average_first: bool = False
    source_fallback: str = ""
    reference: str = ""

    def __post_init__(self):
        if self.columns not in ("datasets", "metrics") or self.average not in ("datasets", "targets", "none"):
            raise ValueError(f"table columns must be datasets|metrics and average datasets|targets|none, got {self}")


def metric_infos(cls: type[Protocol]) -> tuple[MetricInfo, ...]:
    """A protocol's metrics as `MetricInfo`: its `metric_info`, else one plain entry per `metric_names`
    (so a protocol that declares only names still gets its tables)."""
    declared = {m.name: m for m in cls.metric_info}
    return tuple(declared.get(name, MetricInfo(name)) for name in cls.metric_names) + tuple(
        m for m in cls.metric_info if m.name not in cls.metric_names)


def describe(cls: type[Protocol]) -> str:
    """One line for help texts: "base2new: Base-to-new generalisation (base, new, hm); fit on ..."."""
    names = ", ".join(m.name for m in metric_infos(cls))
    return f"{cls.name}: {cls.title or cls.name} ({names}); {cls.summary}".rstrip("; ")


class Protocol:
    """Base class of protocols. Subclasses set `name` (by registering), `version` (bump when a
    change alters numbers), `metric_names` and `headline` (the metric stored as `top1`), and
    implement `episode`; `targets` lists the datasets besides the source that must be loaded."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    metric_names: ClassVar[tuple[str, ...]] = ("top1",)
    headline: ClassVar[str] = "top1"
    # what reports show (fsbench.report.protocols reads these; see MetricInfo and TableShape)
    title: ClassVar[str] = ""  # the report section's title (the name when empty)
    metric_info: ClassVar[tuple[MetricInfo, ...]] = ()  # display and aggregation of `metric_names`
    table: ClassVar[TableShape] = TableShape()  # methods x datasets, the Average over them
    summary: ClassVar[str] = ""
    source_result: ClassVar[bool] = False  # results carry `source_dataset` (cross-dataset protocols)
    # what a method may do with the unlabelled evaluation images: "none" (inductive: a method never sees them),
    # "online" (one batch of `online_batch` at a time, in the eval set's order, reset between sets) or
    # "transductive" (each whole set at once; online methods also run). Labels are never shown.
    unlabelled: ClassVar[str] = "none"
    online_batch: ClassVar[int] = 1
    # the evaluation sets' order is drawn from the seed (test_time): the identity then holds the images by
    # content and their order as the per-seed component "order", so a cell's seeds are averaged, not split
    seeded_order: ClassVar[bool] = False
    # cost of scoring: the executor adds `SCORING_COST`'s metrics (milliseconds and peak memory of the method's
    # scoring calls per test image) to every result; list them in `metric_names`/`metric_info` to show them
    scoring_cost: ClassVar[bool] = False
    # (accuracy metric, cost metric) a report plots against each other, one point per method, per backbone
    cost_plot: ClassVar[tuple[str, str]] = ()
    # the papers' episode: the sources and shots a study plans unless others are asked for explicitly
    # (`--datasets`/`--shots`, or [study] transfer_sources/transfer_shots); () = the study's lists
    paper_sources: ClassVar[tuple[str, ...]] = ()
    paper_shots: ClassVar[tuple[int, ...]] = ()

    def __init__(self, targets: tuple[str, ...] = ()):
        self.target_names = tuple(targets)

    def val_shots(self, shots: int, request: str = "default") -> int:
        """Validation shots per class the sampler draws for a method asking for `request` (`Method.val_request`):
        min(K, 4) (CLIP-LoRA and CoOp's rule), or K for "shots" (LP++'s official regime; a class with fewer
        validation images gives all of them). A protocol that validates otherwise (the whole val split, shots
        carved from the train draw) overrides this or ignores the draw's validation in `episode`."""
        return shots if request == "shots" else min(shots, MAX_VAL_SHOTS)

    def targets(self, source: str) -> list[str]:
        """Datasets to load besides the source."""
        return [t for t in self.target_names if t != source]

    def episode(self, source: DatasetSplits, draw: FewShotSplit, targets: dict[str, DatasetSplits]) -> Episode:
        """The run's episode from the sampler's `draw` of the source (positions in `draw.train_split` /
        `draw.val_split`) and the loaded target datasets."""
        raise NotImplementedError

    def metrics(self, accuracies: dict[str, float | None]) -> dict[str, float | None]:
        """Per-set accuracies -> the reported metrics (default: as they are)."""
        return dict(accuracies)

    def logit_metrics(self, sets: dict[str, tuple[Any, Any]], cosine_scale: float | None = None
                      ) -> dict[str, float | None]:
        """Metrics computed from the evaluation sets' logits rather than their accuracies, added to `metrics`'
        (default: none). `sets` maps each scored set's metric name to (logits, labels): float numpy arrays
        (N, C) over the set's classes, and int labels, or None for an unlabelled set; `cosine_scale` is the
        method's `Method.cosine_scale()`."""
        return {}

    def settings(self) -> dict[str, str]:
        """What configures this protocol beyond its targets ({} for most): part of every result's identity."""
        return {}

    def folder(self, source: str) -> str:
        """The result path segment under the method's folder ("" keeps the few-shot layout)."""
        return f"{self.name}-from-{source}" if self.source_result else self.name

    @classmethod
    def off_paper(cls, source: str, shots: int) -> str:
        """"" when (source, shots) is the papers' setting (or the protocol has none), else what it is."""
        if (not cls.paper_sources or source in cls.paper_sources) and (not cls.paper_shots or shots in cls.paper_shots):
            return ""
        return f"the papers fit on {'/'.join(cls.paper_sources)} with {'/'.join(map(str, cls.paper_shots))} shots"


# Third-party protocols arrive as methods do: the entry-point group `fsbench.protocols` (an installed package's
# `[project.entry-points."fsbench.protocols"]`, loaded on the first lookup) or a `--plugin` file.
PROTOCOLS: Registry[type[Protocol]] = Registry("protocol", entry_point_group="fsbench.protocols", base=Protocol)
UNLABELLED_USES = {"none": (), "online": ("online",), "transductive": ("online", "transductive")}


def test_time_mode(protocol: Protocol, method_test_time: str) -> str:
    """How a method with `method_test_time` scores under `protocol`: its test-time mode where the protocol
    allows it, else "none" (plain inductive `logits`)."""
    return method_test_time if method_test_time in UNLABELLED_USES.get(protocol.unlabelled, ()) else "none"


def register_protocol(name: str) -> Callable[[type[Protocol]], type[Protocol]]:
    return PROTOCOLS.register(name)


def whole_test(data: DatasetSplits, classes: ClassSet, metric: str = "top1") -> EvalSet:
    """Every test image of `data`, scored against all of `classes` (labels are class indices)."""
    return EvalSet(metric, data.name, tuple(range(len(data.test))), tuple(it.label for it in data.test), classes)


def _targets_of(data: DatasetSplits, positions: tuple[int, ...], split: str, keep: dict[int, int]) -> tuple:
    items = data.split(split)
    return tuple(keep[items[i].label] for i in positions)


def fit_all(source: DatasetSplits, draw: FewShotSplit, results: tuple[Target, ...],
            classes: ClassSet | None = None) -> Episode:
    """An episode fitted on every class of `source` with the draw as it is."""
    classes = classes or class_set(source)
    every = {c: c for c in range(len(classes))}
    return Episode(source.name, classes, draw.train, _targets_of(source, draw.train, draw.train_split, every),
                   draw.val, _targets_of(source, draw.val, draw.val_split, every), results,
                   draw.train_split, draw.val_split)


@register_protocol("fewshot")
class FewShot(Protocol):
    """K shots of every class; top-1 on the whole test split (the CLIP-LoRA paper's protocol)."""

    summary = "K shots of every class, top-1 on the full test split"
    title = "Few-shot"
    metric_info = (MetricInfo("top1", "Top-1"),)

    def folder(self, source: str) -> str:
        return ""  # results written before protocols existed live here, and still load

    def episode(self, source, draw, targets):
        classes = class_set(source)
        return fit_all(source, draw, (Target(source.name, (whole_test(source, classes),)),), classes)


def base_new_labels(n_classes: int) -> tuple[list[int], list[int]]:
    """CoCoOp's class split: sorted labels, the first ceil(n/2) are base, the rest new.

    Zhou et al., CVPR 2022; KaiyangZhou/CoOp `datasets/oxford_pets.py`, `subsample_classes`:
    `m = math.ceil(n / 2)`, base = labels[:m], new = labels[m:], each relabelled from 0.
    """
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def harmonic_mean(base: float | None, new: float | None) -> float | None:
    """H = 2BN / (B + N) (CoCoOp, Table 1); None when either is missing, 0 when both are 0."""
    if base is None or new is None:
        return None
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


@register_protocol("base2new")
class BaseToNew(Protocol):
    """CoCoOp's base-to-new generalisation: fit on K shots of the base half of the classes; score
    the base classes' test images against the base classes and the new classes' against the new."""

    metric_names = ("base", "new", "hm")
    headline = "hm"
    summary = "fit on the base half of the classes; Base, New and their harmonic mean"
    title = "Base-to-new generalisation"
    metric_info = (MetricInfo("base", "Base"), MetricInfo("new", "New"),
                   MetricInfo("hm", "H", seeds="hm_of_means", average="hm_of_averages", of=("base", "new"),
                              help="H = 2BN/(B+N) of the mean Base and New; the Average's H is that of the "
                                   "Average Base and New (CoCoOp, Table 1)."))
    table = TableShape(columns="metrics", average_first=True, reference="CoCoOp, Table 1")

    def episode(self, source, draw, targets):
        everything = class_set(source)
        base, new = base_new_labels(len(everything))
        if len(new) < 2:  # a one-class half scores 100 whatever the method does
            raise DataError(f"{source.name}: base-to-new needs at least 2 classes in each half; its "
                            f"{len(everything)} classes give {len(base)} base and {len(new)} new")
        keep = {c: i for i, c in enumerate(base)}
        train_items, val_items = source.split(draw.train_split), source.split(draw.val_split)
        train = tuple(i for i in draw.train if train_items[i].label in keep)
        val = tuple(i for i in draw.val if val_items[i].label in keep)
        evals = []
        for metric, labels in (("base", base), ("new", new)):
            local = {c: i for i, c in enumerate(labels)}
            pos = tuple(i for i, it in enumerate(source.test) if it.label in local)
            evals.append(EvalSet(metric, source.name, pos, tuple(local[source.test[i].label] for i in pos),
                                 everything.subset(labels)))
        fit = everything.subset(base)
        return Episode(source.name, fit, train, _targets_of(source, train, draw.train_split, keep), val,
                       _targets_of(source, val, draw.val_split, keep), (Target(source.name, tuple(evals)),),
                       draw.train_split, draw.val_split)

    def metrics(self, accuracies):
        base, new = accuracies.get("base"), accuracies.get("new")
        return {"base": base, "new": new, "hm": harmonic_mean(base, new)}


class _Transfer(Protocol):
    """Fit once on the source (all classes, K shots), then score the same fitted method on each
    target's whole test split against the target's classes, without refitting.

    The papers' setting, planned by default: source ImageNet, 16 shots (CoCoOp, Section 5.2 and
    KaiyangZhou/CoOp ff61507 scripts/cocoop/xd_train.sh:10,15, `DATASET=imagenet`, `SHOTS=16`,
    the CoOp variant commented in at :8,14; xd_test.sh:15,29 evaluates that model).
    """

    source_result = True
    paper_sources = ("imagenet",)
    paper_shots = (16,)

    def episode(self, source, draw, targets):
        classes = class_set(source)
        results = [Target(source.name, (whole_test(source, classes),))]
        results += [Target(name, (whole_test(data, class_set(data, source)),)) for name, data in targets.items()]
        return fit_all(source, draw, tuple(results), classes)


CROSS_TARGETS = ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
                 "sun397", "dtd", "eurosat", "ucf101")
DG_TARGETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


@register_protocol("cross_dataset")
class CrossDataset(_Transfer):
    """CoCoOp's cross-dataset transfer (Zhou et al., CVPR 2022, Table 2): source ImageNet by default,
    the ten other datasets as targets (`[study] cross_targets`)."""

    summary = "fit on a source dataset, evaluate on other datasets' classes without refitting"
    title = "Cross-dataset transfer"
    metric_info = (MetricInfo("top1", "Top-1"),)
    table = TableShape(average="targets", source_fallback="fewshot", reference="CoCoOp, Table 2")


@register_protocol("domain_generalisation")
class DomainGeneralisation(_Transfer):
    """CoCoOp's domain generalisation (Table 3): source ImageNet; targets ImageNet-V2, -Sketch, -A and -R
    (`[study] dg_targets`); A and R score against their 200 ImageNet classes."""

    summary = "fit on ImageNet, evaluate on ImageNet-V2/-Sketch/-A/-R"
    title = "Domain generalisation"
    metric_info = (MetricInfo("top1", "Top-1"),)
    table = TableShape(average="targets", source_fallback="fewshot", reference="CoCoOp, Table 3")


MS_PER_IMAGE, SCORING_PEAK_MIB = "ms_per_image", "scoring_peak_mib"
SCORING_COST = (
    MetricInfo(MS_PER_IMAGE, "ms / image", higher_is_better=False, digits=3,
               help="ms / image: wall-clock milliseconds inside the method's scoring calls per test image (the "
                    "scores back on the CPU, so GPU work counts; image decoding and the cached frozen features of "
                    "feature-input methods do not); an inductive method scores in batches, a test-time one as the "
                    "protocol feeds it."),
    MetricInfo(SCORING_PEAK_MIB, "Peak MiB", higher_is_better=False, digits=4,
               help="Peak MiB: peak memory while scoring: on CUDA the GPU memory allocated by torch (frozen "
                    "backbone included); on CPU the process's peak resident set size so far, an upper bound that "
                    "includes everything the process did before."),
)


def shuffled_test(data: DatasetSplits, classes: ClassSet, seed: int, salt: str, metric: str = "top1") -> EvalSet:
    """Every test image of `data` in an order drawn from (`salt`, dataset, `seed`): the order an online
    test-time method meets them in. With `Protocol.seeded_order` the order is the result identity's per-seed
    component "order", beside the images' content digest."""
    order = list(range(len(data.test)))
    random.Random(f"{salt}|{data.name}|{seed}").shuffle(order)
    return EvalSet(metric, data.name, tuple(order), tuple(data.test[i].label for i in order), classes)


@register_protocol("test_time")
class TestTime(Protocol):
    """Online test-time adaptation (TPT, Shu et al. 2022; TDA, Karmanov et al. 2024): one pass over the
    test split in a seeded order, `online_batch` (1, as TPT/TDA) unlabelled images at a time; a test-time
    method adapts as it goes and is reset before the next evaluation set. The fit is the few-shot episode's
    (training-free test-time methods ignore it); an inductive method scores as in `fewshot`."""

    summary = "one pass over the test split in a seeded order, one unlabelled image at a time"
    title = "Test-time adaptation"
    metric_names = ("top1", "ece", MS_PER_IMAGE, SCORING_PEAK_MIB)
    metric_info = (MetricInfo("top1", "Top-1"),
                   MetricInfo("ece", "ECE", higher_is_better=False,
                              help="ECE: expected calibration error (15 bins, %) of the softmax scores."),
                   *SCORING_COST)
    unlabelled = "online"
    online_batch = 1
    scoring_cost = True
    cost_plot = ("top1", MS_PER_IMAGE)
    seeded_order = True

    def episode(self, source, draw, targets):
        classes = class_set(source)
        return fit_all(source, draw, (Target(source.name, (shuffled_test(source, classes, draw.seed, self.name),)),),
                       classes)


@register_protocol("transductive")
class Transductive(Protocol):
    """Transductive inference (TransCLIP, Zanella et al., NeurIPS 2024): the method sees each whole unlabelled
    test split at once (online methods also run). Not the inductive few-shot setting: its numbers are compared
    with each other, and with the inductive method they build on, not with `fewshot`'s table."""

    summary = "the whole unlabelled test split at once (not comparable with inductive few-shot)"
    title = "Transductive"
    metric_info = (MetricInfo("top1", "Top-1", help="Not comparable with the inductive few-shot table: a transductive "
                              "method sees every unlabelled test image of a dataset before it scores any of them; "
                              "compare it with other transductive results and with the inductive method it builds "
                              "on."),)
    unlabelled = "transductive"

    def episode(self, source, draw, targets):
        classes = class_set(source)
        return fit_all(source, draw, (Target(source.name, (whole_test(source, classes),)),), classes)


OOD_TARGETS = ("ood_inaturalist", "ood_sun", "ood_places", "ood_textures")
OOD_SCORES = ("mcm", "max_logit", "energy")  # fsbench.ood.SCORES (that module imports numpy)


def unlabelled_test(data: DatasetSplits, classes: ClassSet, metric: str) -> EvalSet:
    """Every test image of `data` as an unlabelled set scored over `classes` (OOD images: their own classes,
    if any, are none of `classes`)."""
    return EvalSet(metric, data.name, tuple(range(len(data.test))), (), classes, labelled=False)


@register_protocol("ood")
class OodDetection(Protocol):
    """Out-of-distribution detection as MCM evaluates it (Ming et al., NeurIPS 2022, deeplearning-wisc/MCM
    ea7130f eval_ood_detection.py:63-98): fit on the in-distribution (ID) dataset as in `fewshot`; score its
    test split once and each OOD set (`[study] ood_targets`; MOS's iNaturalist, SUN, Places and Textures,
    Huang & Li, CVPR 2021) with `[study] ood_score` (`fsbench.ood`); one result per OOD set with its AUROC and
    FPR95 (ID = positive) and the ID top-1, and a first result on the ID dataset with its top-1 alone (the
    headline `top1` of every result is that ID top-1). No accuracy is ever computed on OOD images."""

    metric_names = ("auroc", "fpr95", "id_top1")
    headline = "id_top1"
    summary = "fit on the ID dataset; AUROC and FPR95 of its test split against each OOD set, and ID top-1"
    title = "OOD detection"
    metric_info = (
        MetricInfo("auroc", "AUROC", help="AUROC and FPR95 (%): the ID test images as positives against each OOD "
                                          "set (MCM); FPR95 at the threshold whose ID TPR is nearest 95%."),
        MetricInfo("fpr95", "FPR95", higher_is_better=False),
        MetricInfo("id_top1", "ID top-1", help="ID top-1: the accuracy on the ID test split, the same in each row "
                                               "of one method."),
    )
    table = TableShape(columns="metrics", average="targets")
    source_result = True  # a result per OOD set, stored under ood-from-<ID dataset>
    paper_sources = ("imagenet",)

    def __init__(self, targets: tuple[str, ...] = OOD_TARGETS, score: str = "mcm"):
        super().__init__(targets)
        if score not in OOD_SCORES:
            raise ValueError(f"unknown OOD score {score!r}; known: {', '.join(OOD_SCORES)}")
        self.score = score

    def settings(self) -> dict[str, str]:
        return {"score": self.score}

    def episode(self, source, draw, targets):
        classes = class_set(source)
        id_set = whole_test(source, classes, "id_top1")  # the same set in every result: scored once per run
        for name, data in targets.items():
            if data.image_root == source.image_root:  # ood_textures reads dtd's own image folder
                raise DataError(f"{name} reads the same images as the in-distribution dataset {source.name} "
                                f"({data.image_root}); leave it out of [study] ood_targets")
        results = (Target(source.name, (id_set,)),) + tuple(
            Target(name, (id_set, unlabelled_test(data, classes, "ood"))) for name, data in targets.items())
        return fit_all(source, draw, results, classes)

    def logit_metrics(self, sets, cosine_scale=None):
        from fsbench.ood import detection_metrics

        if "id_top1" not in sets or "ood" not in sets:  # a set could not be scored: no detection metrics
            return {}
        return detection_metrics(sets["id_top1"][0], sets["ood"][0], self.score, cosine_scale)

    @classmethod
    def off_paper(cls, source: str, shots: int) -> str:
        if source in cls.paper_sources:
            return ""
        return "the MOS OOD sets were curated against ImageNet-1k's classes (Huang & Li, CVPR 2021)"


def make_protocol(name: str, cross_targets: list[str] | tuple[str, ...] = CROSS_TARGETS,
                  dg_targets: list[str] | tuple[str, ...] = DG_TARGETS,
                  ood_targets: list[str] | tuple[str, ...] = OOD_TARGETS, ood_score: str = "mcm") -> Protocol:
    """The protocol `name` with the study's target lists (did-you-mean on an unknown name)."""
    cls = PROTOCOLS.get(name)
    if cls is CrossDataset:
        return cls(tuple(cross_targets))
    if cls is DomainGeneralisation:
        return cls(tuple(dg_targets))
    if cls is OodDetection:
        return cls(tuple(ood_targets), ood_score)
    return cls()
