"""The `ray` executor: runs spread over a Ray cluster, or a local Ray instance started for the sweep.

Granularity: one Ray actor per worker slot (`gpus_per_run` GPUs, or `cpus_per_run` CPUs on a
CPU-only cluster), each holding one `Runner`, and one actor call per run. The driver hands each
idle actor its next run from a `WorkQueue` that keeps the actor on one (backbone, dataset) group,
so an actor loads each model and dataset once and reuses its feature cache, as the local executor
does, while progress, failures and load balancing stay per run. Workers write their results into
the shared results directory (atomic per-run files). Paths are made absolute: on a multi-node
cluster, data, results and cache must live on a shared filesystem at the same path on every node.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from fsbench.config import BenchConfig, Sweep
from fsbench.engine import Runner
from fsbench.errors import ConfigError
from fsbench.registry import load_plugin
from fsbench.spec import RunSpec
from fsbench.sweep.local import run_one
from fsbench.sweep.plan import GroupKey, WorkQueue, group_key
from fsbench.sweep.summary import Outcome, Tally


def import_ray() -> ModuleType:
    """Ray is optional: without it, a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed: pip install ray "
                          "(the 'ray' extra of fsbench)") from None
    return ray


class SweepWorker:
    """The body of one Ray actor: a Runner kept across runs; plugins loaded once in its process."""

    def __init__(self, cfg: BenchConfig, plugins: list[str]):
        for path in plugins:
            load_plugin(path)
        self.runner = Runner(cfg)

    def run(self, spec: RunSpec, force: bool) -> Outcome:
        return run_one(self.runner, spec, force)


def ray_config(cfg: BenchConfig) -> BenchConfig:
    """`cfg` with absolute paths (workers start in other directories) and a device Ray can honour."""
    rt = cfg.runtime
    if rt.device.startswith("cuda:"):
        raise ConfigError(f"--device {rt.device} does not apply to --executor ray, which assigns the GPUs; "
                          "use --device auto or cuda")
    paths = {key: str(Path(getattr(rt, key)).resolve())
             for key in ("data_root", "results", "cache_dir", "splits") if getattr(rt, key)}
    return replace(cfg, runtime=replace(rt, **paths))


def connect(ray: ModuleType, sweep: Sweep) -> bool:
    """Join `sweep.ray_address`, or start a quiet local instance; True when this call initialised Ray."""
    if ray.is_initialized():
        return False
    if sweep.ray_address:
        ray.init(address=sweep.ray_address, log_to_driver=False, logging_level="warning")
    else:
        num_cpus = math.ceil(sweep.workers * sweep.cpus_per_run) if sweep.workers else None
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
    return True


def actor_options(ray: ModuleType, cfg: BenchConfig) -> tuple[dict[str, float], int]:
    """Resources of one worker (GPUs when the cluster has them and the device allows) and how many fit."""
    sweep, available = cfg.sweep, ray.cluster_resources()
    gpus = available.get("GPU", 0) if cfg.runtime.device != "cpu" else 0
    if cfg.runtime.device == "cuda" and not gpus:
        raise ConfigError("--device cuda was asked but the Ray cluster has no GPUs")
    if gpus:
        options, fit = {"num_gpus": sweep.gpus_per_run, "num_cpus": sweep.cpus_per_run}, gpus / sweep.gpus_per_run
    else:
        options, fit = {"num_cpus": sweep.cpus_per_run}, available.get("CPU", 0) / sweep.cpus_per_run
    if fit < 1:
        raise ConfigError(f"one sweep worker needs {options} but the Ray cluster has {available}")
    # More workers than fit would wait forever for resources held by the others.
    return options, min(sweep.workers or int(fit), int(fit))


class ActorPool:
    """Ray actors, one run in flight each, each kept on one (backbone, dataset) group."""

    def __init__(self, ray: ModuleType, actor_cls: Any, args: tuple, size: int):
        self.ray, self.actor_cls, self.args = ray, actor_cls, args
        self.actors = [actor_cls.remote(*args) for _ in range(size)]
        self.groups: list[GroupKey | None] = [None] * size
        self.inflight: dict[Any, tuple[int, RunSpec]] = {}

    def dispatch(self, queue: WorkQueue, force: bool) -> None:
        """Give every idle actor its next run."""
        running = {i for i, _ in self.inflight.values()}
        for i, actor in enumerate(self.actors):
            if i in running:
                continue
            spec = queue.take(self.groups[i], {g for j, g in enumerate(self.groups) if j != i and g})
            if spec is None:
                return
            self.groups[i] = group_key(spec)
            self.inflight[actor.run.remote(spec, force)] = (i, spec)

    def collect(self) -> Outcome:
        """The next finished run. A run whose actor died is lost (not written) and the actor replaced."""
        [ref], _ = self.ray.wait(list(self.inflight), num_returns=1)
        i, spec = self.inflight.pop(ref)
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            if isinstance(exc, self.ray.exceptions.RayActorError):
                self.actors[i], self.groups[i] = self.actor_cls.remote(*self.args), None
            first = (str(exc).strip().splitlines() or [""])[0]
            return Outcome(spec, None, 0.0, error=f"{type(exc).__name__}: {first}")

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def run_ray(cfg: BenchConfig, specs: list[RunSpec], force: bool, tally: Tally, plugins: list[Path]) -> None:
    """Run `specs` on Ray actors until done or `tally.stop`; Ctrl-C loses only the runs in flight."""
    ray = import_ray()
    cfg = ray_config(cfg)
    started = connect(ray, cfg.sweep)
    try:
        options, size = actor_options(ray, cfg)
        args = (cfg, [str(Path(p).resolve()) for p in plugins])
        pool = ActorPool(ray, ray.remote(SweepWorker).options(**options), args, min(size, len(specs)))
        queue = WorkQueue(specs)
        try:
            while True:
                if not tally.stop:
                    pool.dispatch(queue, force)
                if not pool.inflight:
                    return
                tally.record(pool.collect())
        finally:
            pool.close()
    finally:
        if started:
            ray.shutdown()
