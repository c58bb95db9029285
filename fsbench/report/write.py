"""`write_report`: the one function of the report that touches the file system."""

from __future__ import annotations

import difflib
from pathlib import Path

import pandas as pd

from fsbench.errors import ConfigError
from fsbench.report.ablation import lora_variants_markdown, plot_ablation
from fsbench.report.compare import (
    PaperSections,
    compare_to_reference,
    delta_markdown,
    delta_table,
    load_reference,
    paper_sections,
)
from fsbench.report.cost import cost_markdown, cost_table, plot_pareto
from fsbench.report.figures import plot_average_curves, plot_shots_curves
from fsbench.report.protocols import protocol_csvs, protocol_figures, protocol_latex, protocol_markdown
from fsbench.report.render import title, to_latex, to_markdown
from fsbench.report.stats_report import resolve_reference, write_statistics
from fsbench.report.tables import blocks, clean, is_fewshot, main_runs, main_table, summary
from fsbench.results import slug

FORMATS = ("md", "csv", "tex", "png", "pdf")


def parse_formats(formats: str | list[str] | tuple[str, ...]) -> list[str]:
    """"md,csv" or ["md", "csv"] -> validated list; unknown formats are a ConfigError."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    items = [f.strip().lower().lstrip(".") for f in items if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise ConfigError(f"unknown report format(s) {bad or items}; choose from {', '.join(FORMATS)}")
    return items


def select_backbones(df: pd.DataFrame, backbones: list[str] | None) -> pd.DataFrame:
    """Rows of the given backbones; an unknown name is a ConfigError with a suggestion."""
    if not backbones:
        return df
    present = sorted(set(df["backbone"]))
    for name in backbones:
        if name not in present:
            close = difflib.get_close_matches(name, present, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; present: {', '.join(present)}"
            raise ConfigError(f"no results for backbone {name!r}{hint}")
    return df[df["backbone"].isin(backbones)]


def _reference(compare) -> pd.DataFrame | None:
    if compare is None or isinstance(compare, pd.DataFrame):
        return compare
    return load_reference(None if str(compare) == "paper" else compare)


def _comparisons(df: pd.DataFrame, compare, notes: list[str]) -> tuple[pd.DataFrame | None, PaperSections]:
    """Deltas to the reference's top-1 cells; with "paper" also Figure 3's and Table 1's sections."""
    ref = _reference(compare)
    comparison = compare_to_reference(df, ref) if ref is not None else None
    if comparison is not None and comparison.empty:
        notes.append("No reproduced cell matches a published number (backbone, method, dataset, shots).")
    is_paper = comparison is not None and not isinstance(compare, pd.DataFrame) and str(compare) == "paper"
    return comparison, (paper_sections(df, comparison, ref) if is_paper else PaperSections())


def _markdown(df: pd.DataFrame, comparison: pd.DataFrame | None, notes: list[str],
              images: list[Path], statistics: str = "", paper: PaperSections | None = None,
              protocols: str = "") -> str:
    """The whole report as Markdown: main tables (+ Δ paper), statistics, cost, figures, notes."""
    parts = ["# fsbench report", "",
             "Top-1 accuracy (%) on the test split: mean ± sample std (ddof=1) over seeds, with the "
             "number of seeds in parentheses; **bold** = best mean of the column; – = no result; "
             "Average = mean over the block's datasets of the per-dataset means.", ""]
    current = None
    for backbone, shots in blocks(df):
        if backbone != current:
            parts += [f"## {backbone}", ""]
            current = backbone
        table = main_table(df, backbone, shots)
        parts += [f"### {title(table)}", "", to_markdown(table)]
        if comparison is not None:
            wide = delta_table(comparison, backbone, shots)
            if not wide.empty:
                parts += ["Δ vs published (reproduced mean − published):", "", delta_markdown(wide)]
    paper = paper or PaperSections()
    parts += [paper.main, ""] if paper.main else []
    parts += [protocols, ""] if protocols else []
    variants = lora_variants_markdown(df)
    parts += [variants, ""] if variants else []
    parts += [statistics, ""] if statistics else []
    parts += ["## Cost", "", cost_markdown(cost_table(df))] + ([paper.cost] if paper.cost else [])
    if images:
        parts += ["## Figures", ""] + [f"![{p.stem}]({p.name})\n" for p in images]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def _save_figure(fig, stem: Path, formats: list[str], written: list[Path]) -> None:
    for ext in ("png", "pdf"):
        if ext in formats:
            path = stem.with_suffix(f".{ext}")
            fig.savefig(path, dpi=200, bbox_inches="tight")
            written.append(path)


def _figures(df: pd.DataFrame, out: Path, formats: list[str], notes: list[str]) -> list[Path]:
    """Figure 2 per backbone (+ the backbone-average figure), Figure 3, the Pareto plot."""
    written: list[Path] = []
    backbones = sorted(set(df["backbone"]))
    for backbone in backbones:
        fig = plot_shots_curves(df, backbone)
        if fig is not None:
            _save_figure(fig, out / f"fig2_shots_{slug(backbone)}", formats, written)
        fig = plot_ablation(df, backbone)
        if fig is None:
            notes.append(f"Figure 3 (LoRA ablations) skipped for {backbone}: no 4-shot runs with "
                         "at least two variants of config matrices/rank/position/encoder.")
        else:
            _save_figure(fig, out / f"fig3_ablation_{slug(backbone)}", formats, written)
    fig = plot_average_curves(df, backbones)
    if fig is not None:
        _save_figure(fig, out / "fig2_shots_average", formats, written)
    fig = plot_pareto(df, backbones)
    if fig is None:
        notes.append("Pareto plot skipped: no run records a positive train_seconds.")
    else:
        _save_figure(fig, out / "pareto_accuracy_vs_time", formats, written)
    return written


def _csvs(df: pd.DataFrame, out: Path, comparison: pd.DataFrame | None,
          more: dict[str, pd.DataFrame]) -> list[Path]:
    cells = summary(df)
    cells["missing"] = cells["missing"].map(";".join)
    frames = {"main_table.csv": cells, "cost.csv": cost_table(df), **more}
    if comparison is not None:
        frames["compare_paper.csv"] = comparison
    for name, frame in frames.items():
        frame.to_csv(out / name, index=False, float_format="%.4f")
    return [out / name for name in frames]


def write_report(df: pd.DataFrame, out_dir: str | Path, formats=FORMATS, compare=None,
                 backbones: list[str] | None = None, notes: list[str] | None = None,
                 reference_method: str | None = None) -> list[Path]:
    """Write tables (md, csv, tex) and figures (png, pdf) of `df` under `out_dir`.

    Args:
        df: the results frame (`fsbench.load_results`); rows whose status is not "ok" are ignored.
        formats: subset of md, csv, tex, png, pdf (a list or "md,csv").
        compare: None, "paper" (the shipped CLIP-LoRA reference), a CSV path or a frame.
        backbones: restrict to these backbones.
        notes: if a list is given, what was skipped and why is appended to it.
        reference_method: the method the paired differences are taken against (default "lora" when
            it has results); a method without results is a ConfigError.
    Returns the written paths.
    """
    formats, notes = parse_formats(formats), (notes if notes is not None else [])
    df = select_backbones(df[df["status"] == "ok"], backbones)
    fewshot = is_fewshot(df)
    others = df[~fewshot]  # base2new, cross_dataset, ...: their own tables
    df = clean(df[fewshot])  # the paper's tables, figures, cost and statistics: few-shot only
    if df.empty and others.empty:
        raise ConfigError("no finished runs to report (no result with status 'ok')")
    variants = len(df) - len(main_runs(df))
    if variants:
        notes.append(f"{variants} LoRA ablation runs (own method labels) are shown in Figure 3 only.")
    reference = resolve_reference(df, reference_method)
    comparison, paper = _comparisons(df, compare, notes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = _csvs(df, out, comparison, {**paper.frames, **protocol_csvs(others)}) if "csv" in formats else []
    if "tex" in formats:
        tex = "\n".join(to_latex(main_table(df, b, s)) for b, s in blocks(df)) + protocol_latex(others)
        (out / "tables.tex").write_text("% needs \\usepackage{booktabs,graphicx}\n" + tex)
        written.append(out / "tables.tex")
    written += _figures(df, out, formats, notes) if {"png", "pdf"} & set(formats) else []
    for stem, fig in protocol_figures(others) if {"png", "pdf"} & set(formats) else []:
        _save_figure(fig, out / stem, formats, written)
    statistics, stats_files = write_statistics(df, out, formats, reference, notes)
    if "md" in formats:
        images = [p for p in written if p.suffix == ".png"]
        (out / "report.md").write_text(_markdown(df, comparison, notes, images, statistics, paper,
                                                 protocol_markdown(others)))
        written.append(out / "report.md")
    written += stats_files
    return written
