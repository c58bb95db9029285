"""A sweep's plan: the study expanded into runs, finished ones skipped, the rest ordered.

`build_plan` sorts every run into to do, done (an ok result with the same config exists) and
failed (a failed result with the same config exists: skipped unless retried), using
`Runner.previous`, the same check `fsbench run` uses. Runs are ordered so that those sharing a
(backbone, dataset) are adjacent, groups in the order the study lists them: a worker then loads
each model and dataset once and reuses its feature cache.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsbench import adapters
from fsbench.config import BenchConfig, method_config
from fsbench.engine import Runner, RunSpec
from fsbench.errors import ConfigError
from fsbench.method import METHODS

GroupKey = tuple[str, str]
ABLATION_FIELDS = ("matrices", "rank", "position", "encoder")  # the method config fields Figure 3 varies
STALE_TEMP_SECONDS = 600  # an atomic write lasts milliseconds; older temp files were left by a killed writer


@dataclass
class Plan:
    """The runs of a sweep, split by what the results store already holds."""

    todo: list[RunSpec] = field(default_factory=list)
    done: list[RunSpec] = field(default_factory=list)
    failed: list[RunSpec] = field(default_factory=list)  # failed earlier, skipped (rerun: retry_failed)


def group_key(spec: RunSpec) -> GroupKey:
    return spec.backbone, spec.dataset


def order_runs(specs: list[RunSpec]) -> list[RunSpec]:
    """Runs grouped by (backbone, dataset), groups in first-seen order, duplicates dropped."""
    unique = list(dict.fromkeys(specs))
    backbones = {b: i for i, b in enumerate(dict.fromkeys(s.backbone for s in unique))}
    datasets = {d: i for i, d in enumerate(dict.fromkeys(s.dataset for s in unique))}
    return sorted(unique, key=lambda s: (backbones[s.backbone], datasets[s.dataset]))


def build_plan(runner: Runner, specs: list[RunSpec], force: bool = False, retry_failed: bool = False) -> Plan:
    """Split `specs` into to do / done / failed; every run's config is resolved (and validated) here."""
    plan = Plan()
    for spec in order_runs(specs):
        old = runner.previous(spec)
        saving = runner.cfg.runtime.save_adapters
        if saving and old is not None and old.status == "ok" and not adapters.is_saved(
                adapters.adapter_dir(saving, spec)):
            old = None  # `--save-adapter`: a result whose adapter was never saved runs again
        if force or old is None or (old.status != "ok" and retry_failed):
            plan.todo.append(spec)
        elif old.status == "ok":
            plan.done.append(spec)
        else:
            plan.failed.append(spec)
    return plan


def variant_label(method: str, variant: dict[str, Any]) -> str:
    """"lora@qv-r4-all-both": the method, then matrices (q, k, v, o order), rank, position, encoder."""
    matrices = "".join(sorted(variant["matrices"], key="qkvo".find))
    return f"{method}@{matrices}-r{variant['rank']}-{variant['position']}-{variant['encoder']}"


def ablation_variants(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """Figure 3's variants by label: (a) matrices x ranks, (b) positions, (c) encoders, each
    around the method's configured values ([methods.lora], else the paper's defaults)."""
    ab = cfg.ablation
    cls = METHODS.get(ab.method)
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


def remove_stale_temp(results_dir: str | Path, older_than: float = STALE_TEMP_SECONDS) -> int:
    """Delete temp files that a killed writer left under `results_dir`; returns how many."""
    cutoff = time.time() - older_than
    stale = [p for p in Path(results_dir).rglob(".*.tmp") if p.is_file() and p.stat().st_mtime < cutoff]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


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
