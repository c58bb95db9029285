"""A sweep's plan: the study expanded into runs, finished ones skipped, the rest ordered.

`build_plan` sorts every run into to do, done (an ok result of the same identity exists), failed
(a failed result of the same identity exists: skipped unless retried) and conflicts (a finished
result of another identity: kept unless `--retry changed` or `--force`), using `Resolver.decide`,
the same decision `fsbench run` takes. Runs are ordered so that those sharing a
(backbone, dataset) are adjacent, groups in the order the study lists them: a worker then loads
each model and dataset once and reuses its feature cache.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from fsbench.catalog import method_class
from fsbench.config import BenchConfig, method_config
from fsbench.errors import ConfigError
from fsbench.io import remove_stale_temp  # noqa: F401 (re-exported)
from fsbench.resolve import Resolver
from fsbench.spec import RunSpec

GroupKey = tuple[str, str]
ABLATION_FIELDS = ("matrices", "rank", "position", "encoder")  # the method config fields Figure 3 varies


@dataclass
class Plan:
    """The runs of a sweep, split by what the results store already holds."""

    todo: list[RunSpec] = field(default_factory=list)
    done: list[RunSpec] = field(default_factory=list)
    failed: list[RunSpec] = field(default_factory=list)  # failed earlier, skipped (rerun: retry_failed)
    conflicts: list[tuple[RunSpec, str]] = field(default_factory=list)  # a finished result of another identity


def group_key(spec: RunSpec) -> GroupKey:
    return spec.backbone, spec.dataset


def order_runs(specs: list[RunSpec]) -> list[RunSpec]:
    """Runs grouped by (backbone, dataset), groups in first-seen order, duplicates dropped."""
    unique = list(dict.fromkeys(specs))
    backbones = {b: i for i, b in enumerate(dict.fromkeys(s.backbone for s in unique))}
    datasets = {d: i for i, d in enumerate(dict.fromkeys(s.dataset for s in unique))}
    return sorted(unique, key=lambda s: (backbones[s.backbone], datasets[s.dataset]))


def build_plan(planner: Resolver, specs: list[RunSpec], force: bool = False, retry_failed: bool = False,
               replace_changed: bool = False) -> Plan:
    """Split `specs` into to do / done / failed / conflicts by the identity of their stored results (the
    same decision `fsbench run` takes); every run's config, data and draw are resolved and validated here.
    `replace_changed` (`--retry changed`) puts the conflicts into to do, marked to replace their result."""
    plan = Plan()
    for spec in order_runs(specs):
        decision = planner.decide(planner.prepare(spec), force)
        if decision.action == "reuse":
            plan.done.append(spec)
        elif decision.action == "conflict" and replace_changed:
            plan.todo.append(dataclasses.replace(spec, replace=True))
        elif decision.action == "conflict":
            plan.conflicts.append((spec, decision.reason))
        elif decision.action == "failed" and not retry_failed:
            plan.failed.append(spec)
        else:
            plan.todo.append(spec)
    return plan


def variant_label(method: str, variant: dict[str, Any]) -> str:
    """"lora@qv-r4-all-both": the method, then matrices (q, k, v, o order), rank, position, encoder."""
    matrices = "".join(sorted(variant["matrices"], key="qkvo".find))
    return f"{method}@{matrices}-r{variant['rank']}-{variant['position']}-{variant['encoder']}"


def ablation_variants(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """Figure 3's variants by label: (a) matrices x ranks, (b) positions, (c) encoders, each
    around the method's configured values ([methods.lora], else the paper's defaults)."""
    ab = cfg.ablation
    cls = method_class(ab.method)
    base = method_config(cls, cfg.methods.get(cls.name, {}))
    missing = [name for name in ABLATION_FIELDS if not hasattr(base, name)]
    if missing:
        raise ConfigError(f"[ablation] method {ab.method!r} has no config field(s) {', '.join(missing)}")
    keep = {name: getattr(base, name) for name in ABLATION_FIELDS}
    variants = [{**keep, "matrices": list(m), "rank": r} for m in ab.matrices for r in ab.ranks]
    variants += [{**keep, "position": p} for p in ab.positions]
    variants += [{**keep, "encoder": e} for e in ab.encoders]
    return {variant_label(ab.method, v): v for v in variants}


def ablation_specs(cfg: BenchConfig, backbones: list[str] | None = None,
                   datasets: list[str] | None = None, shots: list[int] | None = None,
                   seeds: list[int] | None = None) -> list[RunSpec]:
    """Runs of the [ablation] grid (the lists override the section's), one label per variant."""
    ab, study = cfg.ablation, cfg.study
    grid = itertools.product(backbones or ab.backbones, datasets or ab.datasets, shots or ab.shots,
                             seeds or ab.seeds, ablation_variants(cfg).items())
    return [RunSpec(ab.method, b, d, k, s, study.pretrained, study.checkpoint, label=label, overrides=variant)
            for b, d, k, s, (label, variant) in grid]


class WorkQueue:
    """Runs handed to parallel workers so that each stays on one (backbone, dataset) group."""

    def __init__(self, specs: list[RunSpec]):
        self.groups: dict[GroupKey, deque[RunSpec]] = {}
        for spec in specs:
            self.groups.setdefault(group_key(spec), deque()).append(spec)

    def __len__(self) -> int:
        return sum(len(q) for q in self.groups.values())

    def take(self, current: GroupKey | None, busy: Collection[GroupKey] = ()) -> RunSpec | None:
        """Next run for a worker on group `current`: more of it; else a group no other worker is on
        (one on the same backbone first, to keep the model); else help on the largest group left."""
        if not self.groups:
            return None
        if current in self.groups:
            key = current
        else:
            free = [k for k in self.groups if k not in busy]
            free.sort(key=lambda k: current is None or k[0] != current[0])
            key = free[0] if free else max(self.groups, key=lambda k: len(self.groups[k]))
        spec = self.groups[key].popleft()
        if not self.groups[key]:
            del self.groups[key]
        return spec
