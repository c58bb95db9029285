"""`fsbench report`: the paper's tables and figures from a results store (never imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fsbench.cli.app import app, console, err_console
from fsbench.cli.plugins import PluginCommand
from fsbench.errors import ConfigError
from fsbench.io import ensure_writable
from fsbench.registry import load_plugin


@app.command(cls=PluginCommand)
def report(
    results: Annotated[Path, typer.Option("--results", help="Results store to read.")] = Path("results/runs"),
    out: Annotated[Path, typer.Option("--out", help="Folder the report is written to.")] = Path("results/report"),
    backbone: Annotated[list[str] | None, typer.Option(
        "--backbone", help="Only this backbone (repeatable).")] = None,
    plugin: Annotated[list[Path] | None, typer.Option(
        "--plugin", help="Python file registering protocols (or methods): their results get their own tables "
                         "(repeatable).")] = None,
    formats: Annotated[str, typer.Option(
        "--format", help="Comma-separated outputs among md,csv,tex,png,pdf,html (html: one self-contained "
                          "report.html, figures inlined).")] = "md,csv,tex,png,pdf,html",
    compare: Annotated[str | None, typer.Option(
        "--compare", help='"paper" (every number of the CLIP-LoRA paper: Tables 1-5, Figure 3) or a '
                          'reference CSV of top-1 cells.')] = None,
    reference_method: Annotated[str | None, typer.Option(
        "--reference-method", help="Method the paired differences are taken against (default: lora).")] = None,
    std: Annotated[str, typer.Option(
        "--std", help='The "±" of the tables and Figure 2: sample (ddof=1) or population (ddof=0, as the '
                      'CoOp and MaPLe log parsers print).')] = "sample",
) -> None:
    """Main table, Figure 2 (accuracy vs shots), Figure 3 (LoRA ablations), statistics (confidence
    intervals, paired differences, Wilcoxon tests, critical-difference diagrams, ECE), cost and Pareto plot;
    for every other protocol in the results, its tables as its metadata says (those listed below; results of a
    protocol not registered here get a generic table and a note)."""
    from fsbench.report import main_table, to_rich, write_report
    from fsbench.report.tables import blocks, std_ddof
    from fsbench.report.write import parse_formats, select_backbones
    from fsbench.results import load_results

    for path in plugin or []:
        load_plugin(path)
    formats = parse_formats(formats)
    std_ddof(std)  # an unknown --std: one line, before any work
    ensure_writable(str(out), "--out DIR")  # a file in the way, a read-only folder: one line, before any work
    if results.exists() and not results.is_dir():
        raise ConfigError(f"{results} is a file, not a results folder; pass the folder that holds the result "
                          "files with --results DIR")
    if not results.is_dir():
        raise ConfigError(f"results folder {results} does not exist; pass --results DIR")
    def warn(line: str) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)

    df = load_results(results, warn=warn)
    if df.empty:
        raise ConfigError(f"no finished results under {results}; run `fsbench run` first")
    df = select_backbones(df, backbone)
    notes: list[str] = []
    written = write_report(df, out, formats, compare=compare, notes=notes, reference_method=reference_method,
                           std=std, warn=warn, results_dir=results)
    for b, s in blocks(df):
        console.print(to_rich(main_table(df, b, s, std=std)))
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    _print_protocols(df)
    console.print(f"wrote {len(written)} files to {out}", highlight=False)


def _print_protocols(df) -> None:
    """Every other protocol's tables, as the report writes them, and a note per protocol whose plug-in is not
    loaded (its results are in a generic table)."""
    from fsbench.report.protocols import grid_rich, protocol_grids, protocol_notes

    for _, grid in protocol_grids(df):
        console.print(grid_rich(grid))
    for note in protocol_notes(df):
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
