"""`fsbench sweep` and `fsbench ablate`: a whole study, or Figure 3's grid, in one resumable command.

Runs whose result exists with the same config are skipped. Runs whose stored result *failed*
with the same config are skipped too (and counted in the plan), until `--retry failed` reruns
them; `--force` reruns everything. Exit codes: 0 when every run this sweep started succeeded
(earlier failures it skipped are reported, not counted); 5 when a run failed or was lost with its
worker; 2 for a configuration error; 130 on Ctrl-C (finished runs are kept: run again to resume).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from fsbench.catalog import check_names, static_methods
from fsbench.cli.app import app, console
from fsbench.cli.common import int_list, load_config, progress_bars, sampler_set, split_list
from fsbench.cli.run import _given, _validate_names, expand
from fsbench.config import BenchConfig
from fsbench.errors import ConfigError, RunFailed
from fsbench.registry import load_plugin

if TYPE_CHECKING:  # the sweep machinery imports torch: loaded by the commands, not by `import fsbench.cli`
    from fsbench.spec import RunSpec
    from fsbench.sweep import Plan, Tally

Opt = typer.Option
# Options shared by `sweep` and `ablate`.
CONFIG = typer.Argument(None, help="Study file (default: ./bench.toml if present).", show_default=False)
BACKBONES = Opt(None, "--backbones", help="Backbones, e.g. ViT-B/16,ViT-L/14 (overrides the file's list).")
DATASETS = Opt(None, "--datasets", help="Datasets, e.g. eurosat,dtd (overrides the file's list).")
SHOTS = Opt(None, "--shots", help="Shots per class, e.g. 1,2,4 (overrides the file's list).")
SEEDS = Opt(None, "--seeds", help="Seeds, e.g. 1,2,3 (overrides the file's list).")
RESULTS = Opt(None, "--results", help="Results folder (default results/runs).")
DATA_ROOT = Opt(None, "--data-root", help="Folder holding the datasets.")
DEVICE = Opt(None, "--device", help="auto | cpu | cuda | cuda:N (local executor).")
DRY_RUN = Opt(False, "--dry-run", help="Print the plan and its size, run nothing.")
RETRY = Opt("", "--retry", help="'failed': also rerun runs whose stored result failed (skipped by default); "
            "'changed': rerun runs whose stored finished result has another identity, replacing it.")
EXECUTOR = Opt(None, "--executor", help="local (this process, one device) | ray (default: sweep.executor).")
RAY_ADDRESS = Opt(None, "--ray-address", help="Ray cluster to join ('auto', host:port); default: a local instance.")
SET = Opt(None, "--set", help="Override SECTION.KEY=VALUE, e.g. lora.rank=4 or sweep.max_failures=10.")
FORCE = Opt(False, "--force", help="Rerun every run, even those with a result.")
PLUGIN = Opt(None, "--plugin", help="Python file registering extra methods.")
SAMPLER = Opt(None, "--sampler", help="Few-shot sampler: fsbench | clip_lora | coop (default: [study] sampler).")
SAVE_ADAPTER = Opt(None, "--save-adapter", help="Save what each run learned (safetensors + JSON) under DIR "
                                                "(default: runtime.save_adapters).")


@app.command()
def sweep(
    config: Path = CONFIG,
    methods: list[str] = Opt(None, "--methods", help="Methods, e.g. lora,coop (overrides the file's list)."),
    protocols: list[str] = Opt(None, "--protocols", help="Protocols, e.g. fewshot,base2new (overrides the file's "
                               "list)."),
    backbones: list[str] = BACKBONES, datasets: list[str] = DATASETS, shots: list[str] = SHOTS,
    seeds: list[str] = SEEDS, results: str = RESULTS, data_root: str = DATA_ROOT, device: str = DEVICE,
    dry_run: bool = DRY_RUN, retry: str = RETRY, executor: str = EXECUTOR, ray_address: str = RAY_ADDRESS,
    set_: list[str] = SET, force: bool = FORCE, plugin: list[Path] = PLUGIN, save_adapter: Path = SAVE_ADAPTER,
    sampler: str = SAMPLER,
) -> None:
    """Run the whole study (and the ablation grid when enabled), resumable, locally or on Ray."""
    with _planning(dry_run):
        cfg = _load(config, sampler_set(set_, sampler), plugin, executor, ray_address, results=results,
                    data_root=data_root, device=device, save_adapters=_absolute(save_adapter))
        specs = expand(cfg, _given(methods, split_list), _given(backbones, split_list),
                       _given(datasets, split_list), _given(shots, int_list, "--shots"),
                       _given(seeds, int_list, "--seeds"), protocols=_given(protocols, split_list))
        if cfg.ablation.enabled:
            from fsbench.sweep.plan import ablation_specs

            specs += ablation_specs(cfg)
        _sweep(cfg, specs, dry_run, retry, force, plugin or [])


@app.command()
def ablate(
    config: Path = CONFIG, backbones: list[str] = BACKBONES, datasets: list[str] = DATASETS,
    shots: list[str] = SHOTS, seeds: list[str] = SEEDS, results: str = RESULTS, data_root: str = DATA_ROOT,
    device: str = DEVICE, dry_run: bool = DRY_RUN, retry: str = RETRY, executor: str = EXECUTOR,
    ray_address: str = RAY_ADDRESS, set_: list[str] = SET, force: bool = FORCE, plugin: list[Path] = PLUGIN,
    save_adapter: Path = SAVE_ADAPTER, sampler: str = SAMPLER,
) -> None:
    """Run CLIP-LoRA's Figure 3 ablation grid (bench.toml's ablation table), one label per variant."""
    from fsbench.sweep.plan import ablation_specs

    with _planning(dry_run):
        cfg = _load(config, sampler_set(set_, sampler), plugin, executor, ray_address, results=results,
                    data_root=data_root, device=device, save_adapters=_absolute(save_adapter))
        specs = ablation_specs(cfg, split_list(backbones), split_list(datasets), int_list(shots, "--shots"),
                               int_list(seeds, "--seeds"))
        _sweep(cfg, specs, dry_run, retry, force, plugin or [])


def _planning(dry_run: bool) -> contextlib.AbstractContextManager:
    """A dry run plans without torch: fsbench's own methods are read from the static catalog
    (`catalog.static_methods`); a run that will execute loads them (their code checks their settings)."""
    return static_methods() if dry_run else contextlib.nullcontext()


def _load(config: Path | None, sets: list[str] | None, plugins: list[Path] | None, executor: str | None,
          ray_address: str | None, **runtime) -> BenchConfig:
    """Plugins, then bench.toml < --set < flags, as `fsbench run` does; --executor/--ray-address set [sweep]."""
    for path in plugins or []:
        load_plugin(path)
    flags = {"executor": executor, "ray_address": ray_address}
    sweep_sets = [f"sweep.{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    return load_config(config, [*(sets or []), *sweep_sets], **runtime)


def _absolute(path: Path | None) -> str | None:
    return str(path.absolute()) if path is not None else None


def _sweep(cfg: BenchConfig, specs: list[RunSpec], dry_run: bool, retry: str, force: bool,
           plugins: list[Path]) -> None:
    from fsbench.resolve import Resolver, ResultConflict
    from fsbench.sweep.plan import build_plan, remove_stale_temp
    from fsbench.sweep.summary import plan_line, plan_table

    if retry not in ("", "failed", "changed"):
        raise ConfigError(f"--retry takes 'failed' or 'changed', got {retry!r}")
    if dry_run:  # a plan builds no backbone: names are checked against the static catalog
        check_names({s.method for s in specs}, {s.backbone for s in specs}, {s.dataset for s in specs},
                    {s.protocol for s in specs})
    else:
        _validate_names(specs)
    # Planning only reads result files and data lists: a CPU runner, so a GPU-less Ray head can plan a GPU
    # sweep, and a read-only results folder can be planned.
    planner = Resolver(cfg, writable=not dry_run)
    plan = build_plan(planner, specs, force, retry_failed=retry == "failed", replace_changed=retry == "changed")
    if dry_run:
        console.print(plan_table(plan))
        console.print(f"plan: {plan_line(plan)}")
        _report_conflicts(plan)
        return
    if plan.conflicts:
        _report_conflicts(plan)
        raise ResultConflict(f"{len(plan.conflicts)} run(s) would replace a finished result of a different identity; "
                             "nothing ran. Rerun them with --retry changed, everything with --force, or use "
                             "--results DIR to keep both")
    if removed := remove_stale_temp(cfg.runtime.results):
        console.print(f"[dim]removed {removed} temp files left by a killed writer[/]")
    console.print(f"plan: {plan_line(plan)} [dim](executor: {cfg.sweep.executor})[/]")
    tally = _execute(cfg, plan, force, plugins)
    _summarise(cfg, tally, plan)


def _report_conflicts(plan: Plan) -> None:
    for _spec, reason in plan.conflicts[:5]:
        console.print(f"[yellow]changed[/] {escape(reason)}", highlight=False)
    if len(plan.conflicts) > 5:
        console.print(f"[yellow]... and {len(plan.conflicts) - 5} more changed runs[/]")


def _execute(cfg: BenchConfig, plan: Plan, force: bool, plugins: list[Path]) -> Tally:
    """Run the plan's runs with an overall progress bar (done/total, ETA, failures)."""
    from fsbench.sweep.local import run_local
    from fsbench.sweep.ray_executor import run_ray
    from fsbench.sweep.summary import Tally

    with progress_bars() as (bars, track):
        overall = bars.add_task(f"sweep ({len(plan.todo)} left)", total=len(plan.todo))

        def on_record(tally: Tally) -> None:
            last = tally.outcomes[-1]
            if last.failed:
                s = last.spec
                console.print(f"[red]failed[/] {escape(s.label or s.method)} {s.backbone} {s.dataset} "
                              f"K={s.shots} seed={s.seed}: {escape(last.message)}", highlight=False)
            failed = len(tally.failures)
            left = f"{tally.total - len(tally.outcomes)} left" + (f", [red]{failed} failed[/]" if failed else "")
            bars.update(overall, completed=len(tally.outcomes), description=f"sweep ({left})")

        tally = Tally(len(plan.todo), cfg.sweep.max_failures, on_record)
        if plan.todo and cfg.sweep.executor == "ray":
            run_ray(cfg, plan.todo, force, tally, plugins)
        elif plan.todo:
            run_local(cfg, plan.todo, force, tally, track)
    return tally


def _summarise(cfg: BenchConfig, tally: Tally, plan: Plan) -> None:
    """The failures table and the summary line; failed runs make the command fail (exit code 5)."""
    from fsbench.sweep.summary import failures_table, summary_line

    if tally.failures:
        console.print(failures_table(tally))
    console.print(f"sweep: {summary_line(tally, plan)}")
    console.print(f"results in {cfg.runtime.results}")
    if plan.failed:
        console.print(f"[yellow]{len(plan.failed)} runs failed in an earlier sweep and were skipped; "
                      "rerun them with --retry failed[/]")
    if tally.failures:
        stopped = f" (stopped after more than sweep.max_failures={cfg.sweep.max_failures})" if tally.stop else ""
        raise RunFailed(f"{len(tally.failures)} of {len(tally.outcomes)} runs failed{stopped}; "
                        "rerun them with --retry failed")
