"""Renderers of a `main_table` (a frame of `Cell`s): Markdown, LaTeX (booktabs) and rich."""

from __future__ import annotations

import pandas as pd

from fsbench.report.style import AVERAGE, dataset_label, method_label
from fsbench.report.tables import STD_LABELS, Cell

MISSING = "–"
DAGGER = "†"


def title(table: pd.DataFrame) -> str:
    """"ViT-B/16, 4 shots" for a table's attrs."""
    shots = table.attrs.get("shots", "?")
    unit = "shot" if shots == 1 else "shots"
    return f"{table.attrs.get('backbone', '?')}, {shots} {unit}"


def std_label(table: pd.DataFrame) -> str:
    """Which standard deviation a table's "±" is, e.g. "sample std (ddof=1)"."""
    return STD_LABELS[table.attrs.get("std", "sample")]


def legend_line(table: pd.DataFrame) -> str:
    """The line under every table saying what a cell holds."""
    return f"Cells: mean ± {std_label(table)} over seeds (number of seeds)."


def footnotes(table: pd.DataFrame) -> list[str]:
    """One line per method whose Average misses some of the table's datasets."""
    notes = []
    for method in table.index:
        cell: Cell = table.at[method, AVERAGE]
        if cell.partial:
            names = ", ".join(dataset_label(d) for d in cell.missing)
            notes.append(f"{DAGGER} {method_label(method)}: Average over {cell.n} of "
                         f"{table.attrs.get('n_datasets', '?')} datasets (missing {names}).")
    return notes


def _cell_text(cell: Cell, decimals: int, pm: str, is_average: bool) -> str:
    if cell.empty:
        return ""
    if is_average:  # the paper's Average has no std; its n is a dataset count
        return cell.text(decimals, seeds=False) + (DAGGER if cell.partial else "")
    return cell.text(decimals, pm=pm)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table, best per column in **bold**, missing as "–", with footnotes."""
    decimals = table.attrs.get("decimals", 1)
    header = ["Method"] + [dataset_label(d) for d in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + [":---:"] * len(table.columns)) + "|"]
    for method in table.index:
        cells = []
        for dataset in table.columns:
            cell: Cell = table.at[method, dataset]
            text = _cell_text(cell, decimals, " ± ", dataset == AVERAGE) or MISSING
            cells.append(f"**{text}**" if cell.best else text)
        lines.append("| " + " | ".join([method_label(method)] + cells) + " |")
    notes = [legend_line(table)] + footnotes(table)
    return "\n".join(lines + [""] + notes) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters in a label."""
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
             "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}
    return "".join(table.get(c, c) for c in text)


def to_latex(table: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs `table` environment, best per column in \\textbf, missing as "--"."""
    decimals = table.attrs.get("decimals", 1)
    header = ["Method"] + [latex_escape(dataset_label(d)) for d in table.columns]
    rows = []
    for method in table.index:
        cells = []
        for dataset in table.columns:
            cell: Cell = table.at[method, dataset]
            text = _cell_text(cell, decimals, r" $\pm$ ", dataset == AVERAGE)
            text = text.replace(DAGGER, r"$^\dagger$") if text else "--"
            cells.append(rf"\textbf{{{text}}}" if cell.best else text)
        rows.append(" & ".join([latex_escape(method_label(method))] + cells) + r" \\")
    notes = [latex_escape(n).replace(DAGGER, r"$^\dagger$") for n in footnotes(table)]
    caption = caption or (f"Top-1 accuracy (\\%), {latex_escape(title(table))}; mean $\\pm$ "
                          f"{latex_escape(std_label(table))} over seeds (n).")
    body = [r"\begin{table*}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}",
            r"\resizebox{\textwidth}{!}{%", rf"\begin{{tabular}}{{l{'c' * len(table.columns)}}}",
            r"\toprule", " & ".join(header) + r" \\", r"\midrule", *rows, r"\bottomrule",
            r"\end{tabular}}"]
    body += [r"\par\footnotesize " + n for n in notes] + [r"\end{table*}"]
    return "\n".join(body) + "\n"


def to_rich(table: pd.DataFrame, transpose: bool | None = None):
    """A `rich.table.Table` for the terminal: compact "mean±std" cells, best in bold.

    `transpose` (default: when there are fewer methods than columns) puts datasets in rows so
    that the paper's wide layout fits an 80-column terminal.
    """
    from rich.markup import escape
    from rich.table import Table

    decimals = table.attrs.get("decimals", 1)
    transpose = len(table.index) < len(table.columns) if transpose is None else transpose
    rows, cols = (table.columns, table.index) if transpose else (table.index, table.columns)
    row_label, col_label = (dataset_label, method_label) if transpose else (method_label, dataset_label)
    out = Table(title=title(table), title_style="bold",
                caption=f"mean±{std_label(table)} over seeds; seed counts in report.md")
    out.add_column("Dataset" if transpose else "Method", no_wrap=True)
    for col in cols:
        out.add_column(escape(col_label(col)), justify="center")
    for row in rows:
        cells = []
        for col in cols:
            method, dataset = (col, row) if transpose else (row, col)
            cell: Cell = table.at[method, dataset]
            text = _cell_text(cell, decimals, "±", dataset == AVERAGE)
            text = escape(text.rsplit(" (", 1)[0]) if text else f"[dim]{MISSING}[/dim]"
            cells.append(f"[bold]{text}[/bold]" if cell.best else text)
        out.add_row(escape(row_label(row)), *cells)
    notes = footnotes(table)
    if notes:
        out.caption += "\n" + escape("\n".join(notes))
    return out
