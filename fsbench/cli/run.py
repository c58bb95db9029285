"""`fsbench run`: run methods x backbones x datasets x shots x seeds in this process."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import typer
from rich.markup import escape

from fsbench.cli.app import app, console
from fsbench.cli.common import int_list, load_config, progress_bars, results_table, sampler_set, split_list
from fsbench.config import BenchConfig
from fsbench.errors import ConfigError, RunFailed
from fsbench.registry import load_plugin
from fsbench.results import Result

Opt = typer.Option


def expand(cfg: BenchConfig, methods, backbones, datasets, shots, seeds, pretrained: str = "",
           checkpoint: str = "", protocols=None):
    """RunSpecs for the product of the lists (flags override the study's lists; None = not given).
    Dataset aliases become their main name, so "pets" and "oxford_pets" are one dataset."""
    from fsbench.data import DATASETS
    from fsbench.spec import RunSpec

    study = cfg.study
    lists = {"--method": methods, "--backbone": backbones, "--dataset": datasets, "--shots": shots,
             "--seed": seeds, "--protocol": protocols}
    for flag, given in lists.items():
        if given is not None and not given:
            raise ConfigError(f"{flag} was given an empty value; name at least one (or leave the flag out "
                              "to use the study's list from bench.toml)")
    if any(k < 1 for k in shots or []):
        raise ConfigError(f"--shots must be >= 1, got {min(shots)}")
    from fsbench.catalog import check_names  # a mistyped name answers before torch is imported

    check_names(methods or study.methods, backbones or study.backbones, datasets or study.datasets,
                protocols or study.protocols)
    specs = []
    for p in protocols or study.protocols:
        sources, ks = _episode_lists(cfg, p, datasets, shots)
        grid = itertools.product(methods or study.methods, backbones or study.backbones,
                                 [DATASETS.canonical(d) for d in sources], ks, seeds or study.seeds)
        specs += [RunSpec(m, b, d, k, s, pretrained or study.pretrained, checkpoint or study.checkpoint, protocol=p)
                  for m, b, d, k, s in grid]
    return specs


def _episode_lists(cfg: BenchConfig, protocol: str, datasets, shots) -> tuple[list[str], list[int]]:
    """The datasets and shots `protocol` is planned with: the flags when given; else, for a protocol with
    the papers' setting (cross-dataset, DG: ImageNet, 16 shots), [study] transfer_sources/transfer_shots
    or that setting; else the study's lists."""
    from fsbench.protocols import PROTOCOLS

    study, cls = cfg.study, PROTOCOLS.get(protocol)
    sources, ks = study.datasets, study.shots
    if cls.paper_sources:
        sources = study.transfer_sources or list(cls.paper_sources)
    if cls.paper_shots:
        ks = study.transfer_shots or list(cls.paper_shots)
    return list(datasets or sources), list(shots or ks)


def execute(cfg: BenchConfig, specs, force: bool) -> list[Result]:
    """Run `specs` with progress bars, ordered so runs sharing a backbone and dataset are adjacent."""
    from fsbench.engine import Runner

    specs = sorted(specs, key=lambda s: (s.backbone, s.dataset, s.method, s.shots, s.seed))
    results = []
    with progress_bars() as (bars, track):
        runner = Runner(cfg, track)
        overall = bars.add_task("runs", total=len(specs))
        for spec in specs:
            bars.update(overall, description=f"{spec.method} {spec.backbone} {spec.dataset} "
                                             f"K={spec.shots} seed={spec.seed}")
            done, reused = runner.run_all(spec, force=force)
            results += done
            bars.advance(overall)
            if reused:
                console.print(f"[dim]skipped (already done, same identity): {spec.method} {spec.backbone} "
                              f"{spec.dataset} K={spec.shots} seed={spec.seed}{_protocol(spec)}[/]")
    return results


@app.command()
def run(
    method: list[str] = Opt(None, "--method", "-m", help="Method name(s); default: the study's."),
    backbone: list[str] = Opt(None, "--backbone", "-b", help="e.g. ViT-B/16, test-tiny."),
    dataset: list[str] = Opt(None, "--dataset", "-d", help="Dataset name(s)."),
    shots: list[str] = Opt(None, "--shots", "-k", help="Shots per class, e.g. 1,2,4."),
    seed: list[str] = Opt(None, "--seed", "-s", help="Seeds, e.g. 1,2,3 or 1-10."),
    protocol: list[str] = Opt(None, "--protocol", "-p", help="fewshot (default) | base2new | cross_dataset | "
                              "domain_generalisation | a plug-in's (`fsbench ls protocols`)."),
    pretrained: str = Opt("", help="open_clip pretrained tag; 'none' = seeded random weights."),
    checkpoint: str = Opt("", help="Local checkpoint file instead of a pretrained tag."),
    config: Path = Opt(None, "--config", "-c", help="Study file (default: ./bench.toml if present)."),
    set_: list[str] = Opt(None, "--set", help="Override SECTION.KEY=VALUE, e.g. lora.rank=4."),
    data_root: str = Opt(None, help="Folder holding the datasets."),
    results: str = Opt(None, help="Results folder (default results/runs)."),
    device: str = Opt(None, help="auto | cpu | cuda | cuda:N."),
    workers: int = Opt(None, help="Image loader processes (default: one per core, max 8)."),
    allow_repeat: bool = Opt(None, "--allow-repeat", help="Sample with replacement in small classes."),
    skip_bad_images: bool = Opt(None, "--skip-bad-images", help="Leave out undecodable images (counted)."),
    splits: Path = Opt(None, "--splits", help="Few-shot splits file from `fsbench data export-splits`."),
    sampler: str = Opt(None, "--sampler", help="Few-shot sampler: fsbench | clip_lora | coop (`fsbench ls "
                       "samplers`; default: the study's)."),
    force: bool = Opt(False, "--force", help="Re-run even when a result of the same identity exists, and replace "
                      "a finished result of a different identity (refused without it)."),
    save_adapter: Path = Opt(None, "--save-adapter", help="Save what each run learned (safetensors + JSON) "
                             "under DIR/<backbone>/<dataset>/<method>/shots<K>_seed<S>/."),
    plugin: list[Path] = Opt(None, "--plugin", help="Python file registering extra methods."),
    dry_run: bool = Opt(False, "--dry-run", help="Print the plan (runs to do, done, failed, changed), run nothing."),
) -> None:
    """Run few-shot experiments and write one result JSON per run."""
    from fsbench.catalog import static_methods

    for p in plugin or []:
        load_plugin(p)
    with static_methods() if dry_run else contextlib.nullcontext():  # a plan imports no torch
        cfg = load_config(config, sampler_set(set_, sampler), data_root=data_root, results=results, device=device,
                          workers=workers, allow_repeat=allow_repeat, skip_bad_images=skip_bad_images,
                          splits=splits, save_adapters=save_adapter.absolute() if save_adapter else None)
        specs = expand(cfg, _given(method, split_list), _given(backbone, split_list), _given(dataset, split_list),
                       _given(shots, int_list, "--shots"), _given(seed, int_list, "--seed"), pretrained, checkpoint,
                       _given(protocol, split_list))
        if dry_run:
            return _print_plan(cfg, specs, force)
    _validate_names(specs, cfg)
    done = execute(cfg, specs, force)
    console.print(results_table(done))
    console.print(f"results in {cfg.runtime.results}")
    failed = [r for r in done if r.status != "ok"]
    if failed:
        raise RunFailed(f"{len(failed)} of {len(done)} runs failed (first: {failed[0].error})")


def _print_plan(cfg: BenchConfig, specs, force: bool) -> None:
    """`run --dry-run`: the decision `run` would take for each run (the sweep's plan table), nothing run."""
    from fsbench.resolve import Resolver
    from fsbench.sweep.plan import build_plan
    from fsbench.sweep.summary import plan_line, plan_table

    plan = build_plan(Resolver(cfg, writable=False), specs, force)
    console.print(plan_table(plan))
    console.print(f"plan: {plan_line(plan)}")
    for _spec, reason in plan.conflicts:
        console.print(f"[yellow]changed[/] {escape(reason)}", highlight=False)


def _given(values, parse, *args):
    """None when the flag was not given, else its parsed list (possibly empty: an error in `expand`)."""
    return None if values is None else parse(values, *args)


def _protocol(spec) -> str:
    return "" if spec.protocol == "fewshot" else f" ({spec.protocol})"


def _validate_names(specs, cfg: BenchConfig | None = None) -> None:
    """Fail fast on unknown names, before any model is built."""
    from fsbench.backbones import check_weights, resolve_factory
    from fsbench.data import DATASETS
    from fsbench.method import METHODS
    from fsbench.protocols import PROTOCOLS
    from fsbench.samplers import get_sampler

    for name in {s.protocol for s in specs}:
        PROTOCOLS.get(name)
    for name in {s.method for s in specs}:
        METHODS.get(name)
    for name in {s.dataset for s in specs}:
        DATASETS.get(name)
    for name in {s.backbone for s in specs}:
        resolve_factory(name)
    for backbone, pretrained, checkpoint in {(s.backbone, s.pretrained, s.checkpoint) for s in specs}:
        check_weights(backbone, pretrained, checkpoint)
    if cfg is not None:
        get_sampler(cfg.study.sampler)
