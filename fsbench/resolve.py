"""What a run depends on, and whether it must run: the runner's first two jobs, without a model.

`Resolver.prepare(spec)` resolves the method config and the protocol, loads and validates the
datasets, takes the few-shot draw, builds the protocol's episode and the identity of every result
the run will write (`fsbench.identity`). `Resolver.decide(prepared)` compares them with the stored
results: reuse, run, or refuse (a finished result of another identity). The sweep planner uses a
`Resolver` alone: no backbone, feature cache or device is built to plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsbench import adapters, identity
from fsbench.config import BenchConfig, method_config
from fsbench.data import DATASETS, DatasetSplits, load_dataset
from fsbench.errors import DataError, FsbenchError
from fsbench.images import drop_bad_images
from fsbench.io import ensure_writable
from fsbench.method import METHODS, Method
from fsbench.protocols import Episode, Protocol, make_protocol
from fsbench.results import Result, read_result, result_path
from fsbench.spec import PROTOCOL_VERSION, RunSpec
from fsbench.splits import (
    FewShotSplit,
    SplitStore,
    read_splits_file,
    split_from_entry,
    val_per_class,
    validate_lists,
    validate_source,
)

Track = Callable[[Iterable, int, str], Iterable]


class ResultConflict(FsbenchError):
    """A finished result of a different identity is in the way; replacing it needs --force."""

    exit_code = 2

@dataclass
class Prepared:
    """Everything known about a run before any model is built."""

    spec: RunSpec
    cls: type[Method]
    config: Any
    protocol: Protocol
    split: FewShotSplit
    episode: Episode
    identities: dict[str, dict[str, str]]  # target dataset -> identity
    paths: dict[str, Path]  # target dataset -> result file
    reference: Episode | None = None  # the episode of `Method.reference_seed`'s draw, if the method has one

    def identity_hash(self, target: str) -> str:
        return identity.identity_hash(self.identities[target])


@dataclass
class Decision:
    """What to do with a prepared run: "reuse" the stored results, "run" it, or "conflict"."""

    action: str
    stored: dict[str, Result | None]
    reason: str = ""


class Resolver:
    """Prepares runs and decides whether they must run; caches datasets and draws across runs."""

    def __init__(self, cfg: BenchConfig, track: Track | None = None, writable: bool = True):
        self.cfg = cfg
        rt = cfg.runtime
        if writable:  # a planner (`sweep --dry-run`) only reads
            ensure_writable(rt.results, "--results DIR")
            ensure_writable(rt.cache_dir, "--set runtime.cache_dir=DIR")
            if rt.save_adapters:
                ensure_writable(rt.save_adapters, "--save-adapter DIR")
        # (dataset, K, seed) -> an imported split (`fsbench run --splits FILE`), used instead of a local draw
        self.imported = read_splits_file(rt.splits) if rt.splits else {}
        self.track: Track = track or (lambda it, total, desc: it)
        self.splits = SplitStore(rt.cache_dir, repeat=rt.allow_repeat, persist=writable)
        self._datasets: dict[str, DatasetSplits] = {}

    # ---- 1. prepare: config, data, draw, episode, identity (no model) ----------------------------
    def dataset(self, name: str) -> DatasetSplits:
        name = DATASETS.canonical(name)
        if name not in self._datasets:
            data = load_dataset(name, self.cfg.runtime.data_root)
            if self.cfg.runtime.skip_bad_images:
                data = drop_bad_images(data, self.cfg.runtime.cache_dir, self.track)
            validate_lists(data)
            self._datasets[name] = data
        return self._datasets[name]

    def method_and_config(self, spec: RunSpec) -> tuple[type[Method], Any]:
        cls = METHODS.get(spec.method)
        overrides = {**self.cfg.methods.get(cls.name, {}), **spec.overrides}
        return cls, method_config(cls, overrides)

    def protocol(self, spec: RunSpec) -> Protocol:
        study = self.cfg.study
        return make_protocol(spec.protocol, study.cross_targets, study.dg_targets)

    def prepare(self, spec: RunSpec) -> Prepared:
        """Resolve and validate everything a run depends on, and the identity of each result."""
        cls, config = self.method_and_config(spec)
        protocol = self.protocol(spec)
        source = self.dataset(spec.dataset)
        validate_source(source)
        targets = {DATASETS.canonical(t): self.dataset(t) for t in protocol.targets(source.name)}
        split = self._split(source, spec, cls)
        episode = protocol.episode(source, split.train, split.val, targets)
        base = self._base_identity(spec, cls, config, protocol, source, split, episode)
        reference = self._reference(spec, cls, config, protocol, source)
        if reference is not None:
            base["reference"] = reference[1]
        identities, paths = {}, {}
        for target in episode.results:
            evals = {f"eval:{target.dataset}/{ev.metric}": identity.eval_digest(self._data(ev.dataset), ev.positions)
                     for ev in target.evals}
            classes = identity.digest([[ev.classes.names, ev.classes.templates] for ev in target.evals])
            identities[target.dataset] = {**base, **evals, "classes": identity.digest([base["classes"], classes])}
            paths[target.dataset] = result_path(self.cfg.runtime.results, spec.label or cls.name, spec.backbone,
                                                target.dataset, spec.shots, spec.seed,
                                                protocol.folder(source.name))
        return Prepared(spec, cls, config, protocol, split, episode, identities, paths,
                        reference[0] if reference is not None else None)

    def _reference(self, spec: RunSpec, cls: type[Method], config: Any, protocol: Protocol,
                   source: DatasetSplits) -> tuple[Episode, str] | None:
        """The episode of the draw a method's shared stage trains on (`Method.reference_seed`) and its digest."""
        seed = cls.reference_seed(config)
        if seed is None:
            return None
        split = self._split(source, dataclasses.replace(spec, seed=seed), cls)
        episode = protocol.episode(source, split.train, split.val, {})
        drawn = [source.train[i] for i in episode.train]
        return episode, identity.digest([seed, split.checksum(source), identity.items_digest(source.image_root, drawn)])

    def _data(self, name: str) -> DatasetSplits:
        return self._datasets[DATASETS.canonical(name)]

    def _base_identity(self, spec: RunSpec, cls: type[Method], config: Any, protocol: Protocol,
                       source: DatasetSplits, split: FewShotSplit, episode: Episode) -> dict[str, str]:
        rt = self.cfg.runtime
        drawn = [source.train[i] for i in split.train] + [source.val[i] for i in split.val]
        return {
            "protocol": f"{protocol.name}/v{protocol.version}/sampling-v{PROTOCOL_VERSION}",
            "method": identity.digest([cls.name, dataclasses.asdict(config)]),
            "weights": identity.weights_identity(spec.backbone, spec.pretrained, spec.checkpoint),
            "classes": identity.digest([episode.classes.names, episode.classes.templates,
                                        episode.classes.train_template]),
            "train_list": identity.list_digest(source, "train"),
            "val_list": identity.list_digest(source, "val"),
            "fewshot": identity.digest([split.checksum(source), identity.items_digest(source.image_root, drawn)]),
            "flags": identity.digest({"allow_repeat": rt.allow_repeat, "skip_bad_images": rt.skip_bad_images}),
        }

    def _split(self, data: DatasetSplits, spec: RunSpec, cls: type[Method]) -> FewShotSplit:
        """The imported split of (dataset, K, seed) if `--splits` was given, else the store's own draw.
        Imported splits are never written to the store, so they cannot replace a local draw."""
        val = val_per_class(spec.shots, cls.val_shots)
        if not self.imported:
            return self.splits.get(data, spec.shots, spec.seed, val)
        entry = self.imported.get((data.name, spec.shots, spec.seed))
        if entry is None:
            have = sorted({f"{d} K={k} seed={s}" for d, k, s in self.imported})
            raise DataError(f"{self.cfg.runtime.splits} has no split for {data.name} K={spec.shots} "
                            f"seed={spec.seed} (it has: {', '.join(have[:6])}{' ...' if len(have) > 6 else ''}); "
                            "export one with `fsbench data export-splits` or drop --splits")
        return split_from_entry(entry, data, self.cfg.runtime.splits)

    # ---- 2. decide: reuse, run, or refuse ---------------------------------------------------------
    def decide(self, prep: Prepared, force: bool = False) -> Decision:
        """Reuse when every stored result has the same identity; a finished result of another identity
        is a conflict (kept unless --force); anything else runs."""
        stored = {t: read_result(p) if p.is_file() else None for t, p in prep.paths.items()}
        if force:
            return Decision("run", stored)
        same = {t: r is not None and r.identity_hash == prep.identity_hash(t) for t, r in stored.items()}
        for t, r in stored.items():
            if r is not None and r.status == "ok" and not same[t]:
                what = identity.describe_change(r.identity or None, prep.identities[t])
                return Decision("conflict", stored, f"{prep.paths[t]} holds a finished result (top1 {_fmt(r.top1)}) "
                                f"of a different run: {what} changed; pass --force to replace it, or --results DIR "
                                "to keep both")
        if all(same.values()) and all(r.status == "ok" for r in stored.values()) and self._adapter_ok(prep):
            return Decision("reuse", stored)
        if all(same.values()):
            return Decision("failed" if any(r.status != "ok" for r in stored.values()) else "run", stored)
        return Decision("run", stored)

    def _adapter_ok(self, prep: Prepared) -> bool:
        """With `--save-adapter`, a result counts as done only if its adapter was saved by the same run."""
        root = self.cfg.runtime.save_adapters
        if not root:
            return True
        first = prep.episode.results[0].dataset
        return adapters.is_saved(self.adapter_dir(prep), prep.identity_hash(first))

    def adapter_dir(self, prep: Prepared) -> Path:
        return adapters.adapter_dir(self.cfg.runtime.save_adapters, prep.spec, prep.protocol.folder(prep.spec.dataset))

    def previous(self, spec: RunSpec) -> Result | None:
        """The stored result of `spec` if it has the same identity (ok or failed), else None."""
        prep = self.prepare(spec)
        decision = self.decide(prep)
        first = next(iter(decision.stored.values()))
        return first if decision.action in ("reuse", "failed") else None

    def existing(self, spec: RunSpec) -> Result | None:
        """The finished result of `spec` with the same identity, if there is one."""
        old = self.previous(spec)
        return old if old is not None and old.status == "ok" else None



def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
