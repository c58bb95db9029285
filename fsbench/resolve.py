"""What a run depends on, and whether it must run: the runner's first two jobs, without a model.

`Resolver.prepare(spec)` resolves the method config and the protocol, loads and validates the
datasets, takes the few-shot draw, builds the protocol's episode and the identity of every result
the run will write (`fsbench.identity`). `Resolver.decide(prepared)` compares them with the stored
results: reuse, run, or refuse (a finished result of another identity). The sweep planner uses a
`Resolver` alone: no backbone, feature cache or device is built to plan, and this module imports no torch
(within `catalog.static_methods()`, as `fsbench sweep --dry-run` plans, neither does planning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsbench import identity
from fsbench.catalog import method_class
from fsbench.config import BenchConfig, method_config
from fsbench.data import DATASETS, DatasetSplits, load_dataset
from fsbench.errors import ConfigError, DataError, FsbenchError
from fsbench.io import ensure_writable
from fsbench.protocols import Episode, Protocol, class_set, make_protocol
from fsbench.results import Result, ResultFileError, file_fingerprint, read_result_strict, result_path, write_result
from fsbench.samplers import get_sampler
from fsbench.spec import PROTOCOL_VERSION, RunSpec
from fsbench.splits import (
    FewShotSplit,
    SplitStore,
    read_splits_file,
    split_from_entry,
    validate_lists,
    validate_source,
)

if TYPE_CHECKING:  # the planner imports no torch: a method's class comes from `catalog.method_class`
    from fsbench.method import Method

Track = Callable[[Iterable, int, str], Iterable]


def sampler_tag(name: str) -> str:
    """A sampler's identity component ("clip_lora/v1"); fsbench's own sampler has none, so results drawn
    before samplers had names keep their identity (`identity.sampler_of` reads it as "fsbench/v1")."""
    return get_sampler(name).tag()


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
    seen: dict[str, str | None] = dataclasses.field(default_factory=dict)  # target -> its file when decided
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
        self.writable = writable
        self._datasets: dict[str, DatasetSplits] = {}
        identity.load_index(rt.cache_dir)  # content digests of files seen before (git's index)

    # ---- 1. prepare: config, data, draw, episode, identity (no model) ----------------------------
    def dataset(self, name: str) -> DatasetSplits:
        name = DATASETS.canonical(name)
        if name not in self._datasets:
            data = load_dataset(name, self.cfg.runtime.data_root)
            if self.cfg.runtime.skip_bad_images:
                from fsbench.images import drop_bad_images  # decoding images needs torch's loader

                data = drop_bad_images(data, self.cfg.runtime.cache_dir, self.track)
            validate_lists(data)
            self._datasets[name] = data
        return self._datasets[name]

    def method_and_config(self, spec: RunSpec) -> tuple[type[Method], Any]:
        """The method's class (within `catalog.static_methods()`, its torch-free stand-in) and resolved config."""
        cls = method_class(spec.method)
        overrides = {**cls.user_overrides(self.cfg.methods), **spec.overrides}
        return cls, method_config(cls, overrides)

    def protocol(self, spec: RunSpec) -> Protocol:
        study = self.cfg.study
        protocol = make_protocol(spec.protocol, study.cross_targets, study.dg_targets, study.ood_targets,
                                 study.ood_score)
        _check_targets(protocol.name, DATASETS.canonical(spec.dataset), study)
        return protocol

    def prepare(self, spec: RunSpec) -> Prepared:
        """Resolve and validate everything a run depends on, and the identity of each result."""
        cls, config = self.method_and_config(spec)
        protocol = self.protocol(spec)
        source = self.dataset(spec.dataset)
        validate_source(source)
        targets = {DATASETS.canonical(t): self.dataset(t) for t in protocol.targets(source.name)}
        split = self._split(source, spec, protocol.val_shots(spec.shots, cls.val_request))
        episode = protocol.episode(source, split, targets)
        base = self._base_identity(spec, cls, config, protocol, source, split, episode)
        reference = self._reference(spec, cls, config, protocol, source)
        if reference is not None:
            base["reference"] = reference[1]
        identities, paths = {}, {}
        for target in episode.results:
            # a protocol whose order of the test images is drawn per seed (test_time): the images by content
            # (seed-independent, so a cell's seeds are averaged) and their order as a per-seed component
            seeded = protocol.seeded_order
            evals = {f"eval:{target.dataset}/{ev.metric}": identity.eval_digest(
                self._data(ev.dataset), tuple(sorted(ev.positions)) if seeded else ev.positions)
                for ev in target.evals}
            if seeded:
                evals["order"] = identity.digest([[ev.metric, ev.positions] for ev in target.evals])
            classes = identity.digest([[ev.classes.names, ev.classes.templates] for ev in target.evals])
            identities[target.dataset] = {**base, **evals, "classes": identity.digest([base["classes"], classes])}
            paths[target.dataset] = result_path(self.cfg.runtime.results, spec.label or cls.name, spec.backbone,
                                                target.dataset, spec.shots, spec.seed,
                                                protocol.folder(source.name))
        if self.writable:
            identity.save_index(self.cfg.runtime.cache_dir)
        return Prepared(spec, cls, config, protocol, split, episode, identities, paths,
                        reference=reference[0] if reference is not None else None)

    def _reference(self, spec: RunSpec, cls: type[Method], config: Any, protocol: Protocol,
                   source: DatasetSplits) -> tuple[Episode, str] | None:
        """The episode of the draw a method's shared stage trains on (`Method.reference_seed`) and its digest."""
        seed = cls.reference_seed(config)
        if seed is None:
            return None
        val = protocol.val_shots(spec.shots, cls.val_request)
        split = self._split(source, dataclasses.replace(spec, seed=seed), val)
        episode = protocol.episode(source, split, {})
        drawn = [source.split(episode.train_split)[i] for i in episode.train]
        return episode, identity.digest([seed, split.checksum(source), identity.items_digest(source.image_root, drawn)])

    def _data(self, name: str) -> DatasetSplits:
        return self._datasets[DATASETS.canonical(name)]

    def _base_identity(self, spec: RunSpec, cls: type[Method], config: Any, protocol: Protocol,
                       source: DatasetSplits, split: FewShotSplit, episode: Episode) -> dict[str, str]:
        rt = self.cfg.runtime
        drawn = split.items(source, "train") + split.items(source, "val")
        sampler = {} if split.sampler == "fsbench" else {"sampler": sampler_tag(split.sampler)}
        return {**sampler,
            "protocol": f"{protocol.name}/v{protocol.version}/sampling-v{PROTOCOL_VERSION}"
                        + "".join(f"/{k}={v}" for k, v in sorted(protocol.settings().items())),
            "method": identity.method_identity(cls, dataclasses.asdict(config)),
            "weights": identity.weights_identity(spec.backbone, spec.pretrained, spec.checkpoint),
            "classes": identity.digest([episode.classes.names, episode.classes.templates,
                                        episode.classes.train_template]),
            "train_list": identity.list_digest(source, "train"),
            "val_list": identity.list_digest(source, "val"),
            "fewshot": identity.digest([split.checksum(source), identity.items_digest(source.image_root, drawn)]),
            "flags": identity.digest({"allow_repeat": rt.allow_repeat, "skip_bad_images": rt.skip_bad_images}),
            "files": identity.FILES,
            **episode_images(source, split, episode),
        }

    def _legacy_identity(self, prep: Prepared, target: str) -> dict[str, str]:
        """`target`'s identity as it was computed before content stamps (files stamped by size and mtime),
        to verify a result stored then: verified, it is reused and its identity rewritten in today's form."""
        source = self._data(prep.episode.source)
        drawn = [source.train[i] for i in prep.split.train] + [source.val[i] for i in prep.split.val]
        old = {k: v for k, v in prep.identities[target].items() if k != "files"}
        old["fewshot"] = identity.digest([prep.split.checksum(source),
                                          identity.items_digest(source.image_root, drawn, legacy=True)])
        for t in prep.episode.results:
            for ev in t.evals if t.dataset == target else ():
                old[f"eval:{t.dataset}/{ev.metric}"] = identity.eval_digest(self._data(ev.dataset), ev.positions,
                                                                             legacy=True)
        return old

    def _split(self, data: DatasetSplits, spec: RunSpec, val: int) -> FewShotSplit:
        """The imported split of (dataset, K, seed) if `--splits` was given, else the store's own draw with `val`
        validation shots per class (the protocol's `val_shots`). Imported splits are never written to the
        store, so they cannot replace a local draw."""
        if not self.imported:
            return self.splits.get(data, spec.shots, spec.seed, val, self.cfg.study.sampler)
        entry = self.imported.get((data.name, spec.shots, spec.seed))
        if entry is None:
            have = sorted({f"{d} K={k} seed={s}" for d, k, s in self.imported})
            raise DataError(f"{self.cfg.runtime.splits} has no split for {data.name} K={spec.shots} "
                            f"seed={spec.seed} (it has: {', '.join(have[:6])}{' ...' if len(have) > 6 else ''}); "
                            "export one with `fsbench data export-splits` or drop --splits")
        return split_from_entry(entry, data, self.cfg.runtime.splits)

    # ---- 2. decide: reuse, run, or refuse ---------------------------------------------------------
    def decide(self, prep: Prepared, force: bool = False) -> Decision:
        """Reuse when every stored result has the same identity; a finished result of another identity, or a
        file that cannot be verified, is a conflict (kept unless --force); anything else runs."""
        stored: dict[str, Result | None] = {}
        unreadable: dict[str, str] = {}
        for t, p in prep.paths.items():
            prep.seen[t] = file_fingerprint(p)
            try:
                stored[t] = read_result_strict(p) if p.is_file() else None
            except ResultFileError as exc:  # unknown fields, corrupt: never taken for "no result"
                stored[t], unreadable[t] = None, str(exc)
        if force:
            return Decision("run", stored)
        for why in unreadable.values():
            return Decision("conflict", stored, f"{why}: it cannot be verified, so it is kept; pass --force to "
                                                "replace it, or --results DIR to keep both")
        legacy = {t for t, r in stored.items() if r is not None and self._legacy_same(prep, t, r)}
        same = {t: r is not None and (r.identity_hash == prep.identity_hash(t) or t in legacy)
                for t, r in stored.items()}
        for t, r in stored.items():
            if r is not None and r.status == "ok" and not same[t]:
                return Decision("conflict", stored, self._conflict(prep, t, r))
        if all(same.values()) and all(r.status == "ok" for r in stored.values()) and self._adapter_ok(prep):
            self._upgrade(prep, {t: stored[t] for t in legacy})
            return Decision("reuse", stored)
        if all(same.values()):
            return Decision("failed" if any(r.status != "ok" for r in stored.values()) else "run", stored)
        return Decision("run", stored)

    def _legacy_same(self, prep: Prepared, target: str, stored: Result) -> bool:
        """A result of before content stamps (no "files" component) whose identity, computed as it was then, is ours."""
        if not stored.identity or "files" in stored.identity or stored.identity_hash == prep.identity_hash(target):
            return False
        return stored.identity_hash == identity.identity_hash(self._legacy_identity(prep, target))

    def _upgrade(self, prep: Prepared, verified: dict[str, Result | None]) -> None:
        """Rewrite results verified by their old identity with today's (same number, same run)."""
        for t, r in verified.items():
            if r is None or not self.writable:
                continue
            r.identity, r.identity_hash = prep.identities[t], prep.identity_hash(t)
            try:
                write_result(self.cfg.runtime.results, r)
                prep.seen[t] = file_fingerprint(prep.paths[t])
            except OSError:
                pass  # verified again next time

    def _conflict(self, prep: Prepared, target: str, stored: Result) -> str:
        """The one-line refusal to replace `stored`, saying why it is not the same run."""
        head = f"{prep.paths[target]} holds a finished result (top1 {_fmt(stored.top1)})"
        if not stored.identity:
            why = "that predates result identities (fsbench < 0.2), so it cannot be verified"
        elif identity.identity_hash(stored.identity) != stored.identity_hash:
            why = "whose identity_hash does not match its identity (edited by hand?), so it cannot be verified"
        else:
            ours = prep.identities[target] if "files" in stored.identity else self._legacy_identity(prep, target)
            why = f"of a different run: {identity.describe_change(stored.identity, ours)} changed"
        return f"{head} {why}; pass --force to replace it, or --results DIR to keep both"

    def _adapter_ok(self, prep: Prepared) -> bool:
        """With `--save-adapter`, a result counts as done only if its adapter was saved by the same run."""
        root = self.cfg.runtime.save_adapters
        if not root:
            return True
        from fsbench import adapters  # saved adapters are safetensors files

        first = prep.episode.results[0].dataset
        return adapters.is_saved(self.adapter_dir(prep), prep.identity_hash(first))

    def adapter_dir(self, prep: Prepared) -> Path:
        from fsbench import adapters

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



def episode_images(source: DatasetSplits, draw: FewShotSplit, episode: Episode) -> dict[str, str]:
    """The `train_images` / `val_images` identity components: the images the episode fits and validates on,
    present only where they are not the draw's images of the fitted classes, in the draw's order (those are
    covered by `fewshot`, and are what every result written before these components used)."""
    fitted = set(episode.classes.rows_in(class_set(source)) or ())  # the source's labels of the fitted classes
    out = {}
    for role, split, positions, drawn_split, drawn in (
            ("train", episode.train_split, episode.train, draw.train_split, draw.train),
            ("val", episode.val_split, episode.val, draw.val_split, draw.val)):
        items = source.split(drawn_split)
        if split != drawn_split or tuple(positions) != tuple(i for i in drawn if items[i].label in fitted):
            out[f"{role}_images"] = identity.selection_digest(source, split, positions)
    return out


TARGET_LISTS = {"cross_dataset": "cross_targets", "domain_generalisation": "dg_targets", "ood": "ood_targets"}


def _check_targets(protocol: str, source: str, study: Any) -> None:
    """A transfer protocol's target list: not empty, and naming the source only in the default list (the
    paper's ten targets, used from any source); one-line ConfigError otherwise."""
    name = TARGET_LISTS.get(protocol)
    if name is None:
        return
    given = list(getattr(study, name))
    if not given:
        raise ConfigError(f"[study] {name} is empty: {protocol} needs at least one target dataset")
    targets = [DATASETS.canonical(t) for t in given]
    if source in targets and given != getattr(type(study)(), name):
        raise ConfigError(f"[study] {name} lists the source dataset {source}; a target is a dataset the method "
                          "was not fitted on: remove it")
    if not [t for t in targets if t != source]:
        raise ConfigError(f"[study] {name} has no dataset besides the source {source}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
