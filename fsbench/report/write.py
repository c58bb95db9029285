"""`write_report`: the one function of the report that touches the file system."""

from __future__ import annotations

import difflib
from pathlib import Path

import pandas as pd

from fsbench.errors import ConfigError
from fsbench.report.ablation import lora_variants_markdown, plot_ablation
from fsbench.report.compare import (
    PaperSections,
    base2new_markdown,
    compare_to_reference,
    delta_markdown,
    delta_table,
    load_reference,
    paper_sections,
)
from fsbench.report.cost import cost_markdown, cost_table, plot_pareto
from fsbench.report.curves import curve_cells, curves_markdown, plot_training_curves
from fsbench.report.figures import plot_average_curves, plot_shots_curves
from fsbench.report.gain import gain_csvs, gain_latex, gain_markdown
from fsbench.report.protocols import protocol_csvs, protocol_figures, protocol_latex, protocol_markdown
from fsbench.report.render import title, to_latex, to_markdown
from fsbench.report.stats_report import resolve_reference, write_statistics
from fsbench.report.tables import (
    STD_LABELS,
    blocks,
    clean,
    is_fewshot,
    main_runs,
    main_table,
    missing_top1,
    std_ddof,
    summary,
)
from fsbench.results import slug

FORMATS = ("md", "csv", "tex", "png", "pdf", "html")


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
              protocols: str = "", std: str = "sample") -> str:
    """The whole report as Markdown: main tables (+ Δ paper), statistics, cost, figures, notes."""
    parts = ["# fsbench report", "",
             f"Top-1 accuracy (%) on the test split: mean ± {STD_LABELS[std]} over seeds, with the "
             "number of seeds in parentheses ((2 of 3): a run of the cell has no top-1); **bold** = best "
             "mean of the column; – = no result; Average = mean over the block's datasets of the "
             "per-dataset means.", ""]
    current = None
    for backbone, shots in blocks(df):
        if backbone != current:
            parts += [f"## {backbone}", ""]
            current = backbone
        table = main_table(df, backbone, shots, std=std)
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
    parts += [curves_markdown(df)]
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


def _figures(df: pd.DataFrame, out: Path, formats: list[str], notes: list[str], std: str = "sample") -> list[Path]:
    """Figure 2 per backbone (+ the backbone-average figure), Figure 3, the Pareto plot."""
    written: list[Path] = []
    backbones = sorted(set(df["backbone"]))
    for backbone in backbones:
        fig = plot_shots_curves(df, backbone, std=std)
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
    for backbone, shots, dataset in curve_cells(df):
        fig = plot_training_curves(df, backbone, shots, dataset)
        _save_figure(fig, out / f"curves_{slug(backbone)}_{slug(dataset)}_{shots}shots", formats, written)
    return written


def _csvs(df: pd.DataFrame, out: Path, comparison: pd.DataFrame | None,
          more: dict[str, pd.DataFrame], std: str = "sample") -> list[Path]:
    cells = summary(df, std=std).assign(std_kind=std)
    cells["missing"] = cells["missing"].map(";".join)
    frames = {"main_table.csv": cells, "cost.csv": cost_table(df), **more}
    if comparison is not None:
        frames["compare_paper.csv"] = comparison
    for name, frame in frames.items():
        frame.to_csv(out / name, index=False, float_format="%.4f")
    return [out / name for name in frames]


def _warn_missing_top1(df: pd.DataFrame, warn) -> None:
    """One line naming the runs with status "ok" but no top-1 (NaN or null): they are not averaged."""
    bad = missing_top1(df)
    if bad.empty:
        return
    runs = ", ".join(f"{r.method} {r.backbone} {r.dataset} {r.shots} shots seed {r.seed}"
                     for r in bad.itertuples(index=False))
    warn(f"{len(bad)} run(s) with status 'ok' have no top-1 (NaN or null) and are left out of every mean; "
         f"their cells show 'n of runs': {runs}")


def write_report(df: pd.DataFrame, out_dir: str | Path, formats=FORMATS, compare=None,
                 backbones: list[str] | None = None, notes: list[str] | None = None,
                 reference_method: str | None = None, std: str = "sample", warn=None,
                 results_dir: str | Path | None = None) -> list[Path]:
    """Write tables (md, csv, tex), figures (png, pdf) and the results page (html) of `df` under `out_dir`.

    Args:
        df: the results frame (`fsbench.load_results`); rows whose status is not "ok" are ignored.
        formats: subset of md, csv, tex, png, pdf, html (a list or "md,csv"); html embeds the PNG
            figures, so it writes them too.
        compare: None, "paper" (the shipped CLIP-LoRA reference), a CSV path or a frame.
        backbones: restrict to these backbones.
        notes: if a list is given, what was skipped and why is appended to it.
        reference_method: the method the paired differences are taken against (default "lora" when
            it has results); a method without results is a ConfigError.
        std: the "±" of the main tables and Figure 2's band: "sample" (ddof=1) or "population" (ddof=0).
        warn: receives one line per problem a reader must know (runs "ok" without a top-1); default: notes.
        results_dir: the store `df` was loaded from: report.html names each run's result file in it.
    Returns the written paths.
    """
    formats, notes = parse_formats(formats), (notes if notes is not None else [])
    std_ddof(std)
    formats += ["png"] if "html" in formats and "png" not in formats else []  # the page inlines the PNGs
    df = select_backbones(df[df["status"] == "ok"], backbones)
    gain = df  # METHOD+STEP paired with METHOD across protocols (fsbench.report.gain)
    fewshot = is_fewshot(df)
    others = df[~fewshot]  # base2new, cross_dataset, ...: their own tables
    df = df[fewshot]  # the paper's tables, figures, cost and statistics: few-shot only
    _warn_missing_top1(df, warn or notes.append)
    if clean(df).empty and others.empty:
        raise ConfigError("no finished runs to report (no result with status 'ok')")
    variants = len(clean(df)) - len(main_runs(df))
    if variants:
        notes.append(f"{variants} LoRA ablation runs (own method labels) are shown in Figure 3 only.")
    reference = resolve_reference(df, reference_method)
    comparison, paper = _comparisons(df, compare, notes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    more = {**paper.frames, **protocol_csvs(others), **gain_csvs(gain)}
    written = _csvs(df, out, comparison, more, std) if "csv" in formats else []
    if "tex" in formats:
        tex = "\n".join(to_latex(main_table(df, b, s, std=std)) for b, s in blocks(df)) + protocol_latex(others)
        tex += gain_latex(gain)
        (out / "tables.tex").write_text("% needs \\usepackage{booktabs,graphicx}\n" + tex)
        written.append(out / "tables.tex")
    written += _figures(df, out, formats, notes, std) if {"png", "pdf"} & set(formats) else []
    for stem, fig in protocol_figures(others) if {"png", "pdf"} & set(formats) else []:
        _save_figure(fig, out / stem, formats, written)
    statistics, stats_files = write_statistics(df, out, formats, reference, notes)
    if "md" in formats:
        images = [p for p in written if p.suffix == ".png"]
        protocols = protocol_markdown(others) + base2new_markdown(others, _reference(compare)) + gain_markdown(gain)
        (out / "report.md").write_text(_markdown(df, comparison, notes, images, statistics, paper, protocols, std))
        written.append(out / "report.md")
    written += stats_files
    if "html" in formats:
        from fsbench.report.html import Sections, write_html

        sections = Sections(statistics, protocol_markdown(others) + gain_markdown(gain), paper.main, paper.cost, notes,
                            [p for p in written if p.suffix == ".png"])
        written.append(write_html(out / "report.html", df, others, comparison, sections, results_dir))
    return written
