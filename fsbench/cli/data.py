"""`fsbench data check | prepare | export-splits`: get datasets onto disk, check them, share splits.

Exit status (docs/exit-codes.md): 0 when every dataset asked for is present, complete and
readable; 3 (`DataError`) when any is not, or a download or extraction failed; 2 for an unknown
name or a bad option.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from fsbench.cli.app import app, console
from fsbench.cli.common import int_list, load_config, progress_bars, split_list
from fsbench.config import PAPER_DATASETS
from fsbench.errors import DataError

if TYPE_CHECKING:  # the checks import every dataset reader (numpy): only when a data command runs
    from fsbench.dataprep.check import CheckReport

data_app = typer.Typer(help="Download, check and share datasets and few-shot splits.", no_args_is_help=True)
app.add_typer(data_app, name="data")

RootOpt = Annotated[str | None, typer.Option("--root", help="Data root (default: bench.toml's data_root, or data).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Study file (default: ./bench.toml).")]


@data_app.command("check")
def check(
    datasets: Annotated[list[str] | None, typer.Argument(help="Datasets (default: the paper's 11).")] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    verify_images: Annotated[bool, typer.Option("--verify-images", help="Decode every image (slow).")] = False,
) -> None:
    """Is each dataset present, in which layout, complete, readable? Prints the fix for each problem."""
    from fsbench.dataprep.check import check_dataset

    data_root = load_config(config, None, data_root=root).runtime.data_root
    names = split_list(datasets) or list(PAPER_DATASETS)
    with progress_bars() as (_, track):
        reports = [check_dataset(n, data_root, verify_images, track) for n in names]
    console.print(report_table(reports, data_root))
    print_findings(reports)
    bad = [r.name for r in reports if not r.ok]
    if bad:
        raise DataError(f"{len(bad)} of {len(reports)} datasets need attention: {', '.join(bad)} "
                        "(fixes listed above)")


def report_table(reports: list[CheckReport], root: str) -> Table:
    """The `data check` table: one row per dataset (problems and fixes are listed below it)."""
    from fsbench.dataprep.sources import SOURCES

    table = Table(title=f"datasets under {root}")
    for col in ("dataset", "status", "layout", "train/val/test\n(expected)", "classes", "missing/bad"):
        table.add_column(col, overflow="fold", justify="right" if col != "dataset" else "left")
    for r in reports:
        src = SOURCES.get(r.name)
        status = "[green]ok[/]" if r.ok else ("[red]problem[/]" if r.present else "[red]absent[/]")
        counts = "/".join(f"{r.counts[s]:,}" for s in ("train", "val", "test")) if r.present else "-"
        if src is not None:
            counts += "\n(" + "/".join(f"{n:,}" for n in src.expected) + ")"
        table.add_row(r.name, status, r.layout, counts, str(r.classes) if r.present else "-",
                      f"{len(r.missing):,}/{len(r.unreadable):,}" if r.present else "-")
    return table


def print_findings(reports: list[CheckReport]) -> None:
    """Each problem, note and fix on its own line under the table."""
    for r in reports:
        if r.present:
            console.print(f"[dim]{r.name}: layout {r.layout}, {r.per_class[0]} to {r.per_class[1]} train "
                          "images per class[/]", highlight=False, soft_wrap=True)
        for line in r.problems:
            line = line.removeprefix(f"{r.name}: ")
            console.print(f"[red]{r.name}:[/] {line}", highlight=False, soft_wrap=True)
        for line in r.notes:
            console.print(f"[yellow]{r.name}:[/] {line}", highlight=False, soft_wrap=True)
        for line in dict.fromkeys(r.fixes):
            console.print(f"[bold]{r.name} fix:[/] {line}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def byte_bars() -> Iterator:
    """Rich download bars: yields `progress(filename) -> on_bytes(done, total)`."""
    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console)

    def progress(filename: str):
        task = bars.add_task(filename, total=None)
        return lambda done, total: bars.update(task, completed=done, total=total)

    with bars:
        yield progress


@data_app.command("prepare")
def prepare(
    dataset: Annotated[str, typer.Argument(help="Dataset to fetch, e.g. eurosat.")],
    root: RootOpt = None,
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and extract again even if done before.")] = False,
    keep_archives: Annotated[bool, typer.Option("--keep-archives", help="Keep archives after extraction.")] = False,
) -> None:
    """Download what is public (resumable, checksum-verified), extract it into the standard layout,
    and print the manual steps a dataset needs (ImageNet, Stanford Cars)."""
    from fsbench.dataprep.check import check_dataset
    from fsbench.dataprep.prepare import prepare as run_prepare

    data_root = load_config(config, None, data_root=root).runtime.data_root
    with byte_bars() as progress:
        done = run_prepare(dataset, data_root, progress=progress, force=force, keep_archives=keep_archives)
    for label, files in (("fetched", done.fetched), ("already there", done.skipped)):
        if files:
            console.print(f"{label}: {', '.join(files)}", highlight=False)
    if done.unverified:
        console.print(f"[yellow]no published checksum (not verified): {', '.join(done.unverified)}[/]")
    if done.manual:
        console.print(f"[bold yellow]manual step for {done.name}:[/] {done.manual}", highlight=False)
    report = check_dataset(done.name, data_root)
    console.print(report_table([report], data_root))
    print_findings([report])
    if not report.ok:
        raise DataError(f"{done.name} is not complete yet: {report.problems[0]}")


@data_app.command("export-splits")
def export_splits(
    out: Annotated[Path, typer.Option("--out", help="JSON file to write.")],
    dataset: Annotated[list[str] | None, typer.Option("--dataset", "-d", help="Default: the study's.")] = None,
    shots: Annotated[list[str] | None, typer.Option("--shots", "-k", help="e.g. 1,2,4 (default: the study's).")] = None,
    seeds: Annotated[list[str] | None, typer.Option("--seeds", "-s", help="e.g. 1,2,3 (default: the study's).")] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="fsbench | clip_lora | coop (default: the "
                                                 "study's; `fsbench ls samplers`).")] = None,
) -> None:
    """Write the few-shot files of (dataset, shots, seed) to one JSON; `fsbench run --splits FILE`
    elsewhere then trains on exactly these images."""
    from fsbench.cli.common import sampler_set
    from fsbench.data import load_dataset
    from fsbench.samplers import get_sampler
    from fsbench.splits import SplitStore, split_to_json, write_splits_file

    cfg = load_config(config, sampler_set(None, sampler), data_root=root)
    get_sampler(cfg.study.sampler)
    store = SplitStore(cfg.runtime.cache_dir, repeat=cfg.runtime.allow_repeat)
    shot_list = int_list(shots, "--shots") or cfg.study.shots
    seed_list = int_list(seeds, "--seeds") or cfg.study.seeds
    entries = []
    for name in split_list(dataset) or cfg.study.datasets:
        data = load_dataset(name, cfg.runtime.data_root)
        entries += [split_to_json(store.get(data, k, s, sampler=cfg.study.sampler), data)
                    for k in shot_list for s in seed_list]
    write_splits_file(out, entries)
    console.print(f"wrote {len(entries)} splits to {out}", highlight=False)
