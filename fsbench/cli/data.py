"""`fsbench data check | prepare | export-splits | import-splits`: get datasets onto disk, check them, share splits.

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
from fsbench.errors import ConfigError, DataError

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
    out: Annotated[Path, typer.Option("--out", help="JSON file to write (--format coop: CoOp's data root).")],
    dataset: Annotated[list[str] | None, typer.Option("--dataset", "-d", help="Default: the study's.")] = None,
    shots: Annotated[list[str] | None, typer.Option("--shots", "-k", help="e.g. 1,2,4 (default: the study's).")] = None,
    seeds: Annotated[list[str] | None, typer.Option("--seeds", "-s", help="e.g. 1,2,3 (default: the study's).")] = None,
    root: RootOpt = None,
    config: ConfigOpt = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="fsbench | clip_lora | coop (default: the "
                                                 "study's; `fsbench ls samplers`).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json (for `run --splits`) or coop (CoOp's "
                                     "<out>/<dataset>/split_fewshot/shot_K-seed_S.pkl).")] = "json",
) -> None:
    """Write the few-shot files of (dataset, shots, seed) to one JSON; `fsbench run --splits FILE`
    elsewhere then trains on exactly these images. `--format coop` writes CoOp's split files instead, so
    the official CoOp-based codes run on the same images."""
    from fsbench.cli.common import sampler_set
    from fsbench.data import load_dataset
    from fsbench.samplers import get_sampler
    from fsbench.splits import SplitStore, split_to_json, write_splits_file

    if fmt not in ("json", "coop"):
        raise ConfigError(f"--format must be json or coop, not {fmt!r}")
    cfg = load_config(config, sampler_set(None, sampler), data_root=root)
    get_sampler(cfg.study.sampler)
    store = SplitStore(cfg.runtime.cache_dir, repeat=cfg.runtime.allow_repeat)
    shot_list = int_list(shots, "--shots") or cfg.study.shots
    seed_list = int_list(seeds, "--seeds") or cfg.study.seeds
    entries = []
    for name in split_list(dataset) or cfg.study.datasets:
        data = load_dataset(name, cfg.runtime.data_root)
        for k in shot_list:
            for s in seed_list:
                split = store.get(data, k, s, sampler=cfg.study.sampler)
                entries.append(write_coop_split(out, split, data) if fmt == "coop" else split_to_json(split, data))
    if fmt == "coop":
        console.print(f"wrote {len(entries)} CoOp split files under {out} (its <dataset>/split_fewshot/ "
                      "folders go into CoOp's data root)", highlight=False)
        return
    write_splits_file(out, entries)
    console.print(f"wrote {len(entries)} splits to {out}", highlight=False)


def write_coop_split(out: Path, split, data) -> Path:
    """One draw as CoOp's `<out>/<dataset folder>/split_fewshot/shot_{K}-seed_{S}.pkl`."""
    from fsbench.coop_pickle import coop_folder, coop_pickle_bytes, coop_roles
    from fsbench.io import atomic_write

    path = out / coop_folder(data.name) / "split_fewshot" / f"shot_{split.shots}-seed_{split.seed}.pkl"
    blob = coop_pickle_bytes(coop_roles(split, data))
    return atomic_write(path, lambda tmp: tmp.write_bytes(blob))


@data_app.command("import-splits")
def import_splits(
    files: Annotated[list[Path], typer.Argument(help="CoOp split files split_fewshot/shot_K-seed_S.pkl.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="The dataset they were drawn from.")],
    out: Annotated[Path, typer.Option("--out", help="fsbench splits JSON to write (for `run --splits`).")],
    root: RootOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Read CoOp's few-shot split files (without Dassl; any pickled global but Dassl's Datum is refused),
    map their paths onto the local data root and write a splits file `fsbench run --splits` trains on."""
    from fsbench.coop_pickle import import_coop_split
    from fsbench.data import load_dataset
    from fsbench.splits import split_to_json, write_splits_file

    data = load_dataset(dataset, load_config(config, None, data_root=root).runtime.data_root)
    entries, seen = [], {}
    for f in files:
        split = import_coop_split(f, data)
        key = (split.shots, split.seed)
        if key in seen:
            raise DataError(f"{f} and {seen[key]} both hold {data.name} K={key[0]} seed={key[1]}")
        seen[key] = f
        entries.append(split_to_json(split, data))
    write_splits_file(out, entries)
    console.print(f"imported {len(entries)} CoOp splits of {data.name} into {out}", highlight=False)
