"""The report's "Statistics" section: confidence intervals, paired differences, Wilcoxon tests,
critical-difference diagrams and calibration, as Markdown, CSV and figures (see docs/statistics.md)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pandas as pd

from fsbench.errors import ConfigError
from fsbench.report.render import MISSING
from fsbench.report.stats import (
    ZERO_RULE,
    RankAnalysis,
    calibration_table,
    clip_interval,
    left_out_lines,
    paired_table,
    rank_analysis,
    seed_ci_table,
    seed_runs,
    significant,
    wilcoxon_table,
)
from fsbench.report.style import HIGHLIGHT, dataset_label, method_label, order_datasets, order_methods
from fsbench.results import slug

DEFAULT_REFERENCE = HIGHLIGHT  # CLIP-LoRA, the method the report is built around
NA = "n/a"


def resolve_reference(df: pd.DataFrame, reference: str | None) -> str | None:
    """The paired tables' reference method: `reference` (an error when absent from the results, with a
    suggestion) or, when None, "lora" if it has results (else None: the paired tables are skipped)."""
    present = sorted(set(seed_runs(df)["method"]))
    if reference is None:
        return DEFAULT_REFERENCE if DEFAULT_REFERENCE in present else None
    if reference not in present:
        close = difflib.get_close_matches(reference, present, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; present: {', '.join(present)}"
        raise ConfigError(f"no results for reference method {reference!r}{hint}")
    return reference


def _grid(frame: pd.DataFrame, text) -> str:
    """A Markdown table of one block: methods (rows) × datasets (columns), `text(row)` per cell."""
    methods, datasets = order_methods(frame["method"]), order_datasets(frame["dataset"])
    cells = {(r.method, r.dataset): text(r) for r in frame.itertuples(index=False)}
    lines = ["| Method | " + " | ".join(dataset_label(d) for d in datasets) + " |",
             "|:---|" + "|".join([":---:"] * len(datasets)) + "|"]
    for m in methods:
        lines.append(f"| {method_label(m)} | " + " | ".join(cells.get((m, d), MISSING) for d in datasets) + " |")
    return "\n".join(lines) + "\n"


CLIPPED = "‡"


def _ci_text(r, d: int = 1) -> str:
    """"72.3 ± 0.4 [71.3, 73.3] (3)"; an interval reaching past [0, 100] is shown clipped, marked ‡."""
    out = f"{r.mean:.{d}f}"
    if r.n > 1:
        low, high = clip_interval(r.ci_low, r.ci_high)
        out += f" ± {r.std:.{d}f} [{low:.{d}f}, {high:.{d}f}]" + (CLIPPED if r.clipped else "")
    return out + f" ({r.n})"


def _paired_text(r, d: int = 1) -> str:
    """"−1.2 [−2.0, −0.4] (5)", bold when significant; a difference equal on every seed has no test."""
    out = f"{r.mean_diff:+.{d}f}"
    if r.n > 1 and r.p_value != r.p_value and r.ci_low == r.ci_high:
        return out + f", same on every seed ({r.n})"
    if r.n > 1:
        out += f" [{r.ci_low:+.{d}f}, {r.ci_high:+.{d}f}]"
        if significant(r):
            out = f"**{out}**"
    return out + f" ({r.n})"


def _calibration_text(r, d: int = 1) -> str:
    ece = NA if pd.isna(r.ece) else f"{r.ece:.{d}f}"
    partial = f" (ECE of {r.n_ece} of {r.n} seeds)" if 0 < r.n_ece < r.n else ""
    return f"{r.top1:.{d}f} / {ece}{partial}"


def _block(frame: pd.DataFrame, backbone: str, shots: int) -> pd.DataFrame:
    return frame[(frame["backbone"] == backbone) & (frame["shots"] == shots)]


def _wilcoxon_markdown(table: pd.DataFrame) -> str:
    lines = ["| Method A | Method B | datasets | A wins / ties / losses | mean A − B | W | p | p from |",
             "|:---|:---|---:|:---:|---:|---:|---:|:---|"]
    for r in table.itertuples(index=False):
        w = MISSING if pd.isna(r.statistic) else f"{r.statistic:g}"
        p = MISSING if pd.isna(r.p_value) else f"{r.p_value:.3g}"
        how = r.p_method or "no test (all differences 0)"
        lines.append(f"| {method_label(r.method_a)} | {method_label(r.method_b)} | {r.n_datasets} | "
                     f"{r.wins} / {r.ties} / {r.losses} | {r.mean_diff:+.2f} | {w} | {p} | {how} |")
    return "\n".join(lines) + "\n"


def friedman_text(a: RankAnalysis) -> str:
    """"Friedman χ²_F = ..., p = ...; Iman-Davenport ..." or why there is no Friedman test."""
    f = a.friedman
    if f["chi2"] != f["chi2"]:
        return f"Friedman test not computed ({a.friedman_reason()})"
    return (f"Friedman χ²_F = {f['chi2']:.2f}, p = {f['p_value']:.3g}; Iman-Davenport F_F = "
            f"{f['iman_davenport_f']:.2f}, p = {f['iman_davenport_p']:.3g}")


def _ranks_markdown(a: RankAnalysis, image: Path | None) -> list[str]:
    ranks = ", ".join(f"{method_label(m)} {r:.2f}" for m, r in a.ranks.items())
    groups = "; ".join("{" + ", ".join(method_label(m) for m in g) + "}" for g in a.groups) or "none"
    parts = [f"Average ranks over the {a.n_datasets} datasets every ranked method has (1 = best): {ranks}.", "",
             f"{friedman_text(a)}; Nemenyi CD = {a.cd:.2f} at α = {a.alpha:g}; not significantly different: "
             f"{groups}.", ""]
    left = left_out_lines(a)
    if left:
        parts += ["Left out, as ranks need every method on every dataset (chosen to keep the most method × "
                  "dataset cells): " + "; ".join(left) + ".", ""]
    if image is not None:
        parts += [f"![{image.stem}]({image.name})", ""]
    return parts


INTRO = (
    "Seeds are independent few-shot draws. **CI**: mean ± sample std [95% Student-t confidence interval "
    "of the mean over seeds, t with n−1 degrees of freedom] (seeds); an interval reaching below 0 or above "
    "100 is shown clipped to [0, 100] and marked ‡ (the unclipped bounds are in stats_ci.csv, `clipped` = "
    "true). **Paired**: method − reference on "
    "the seeds both share (the same support sets), mean difference [95% paired-t CI] (shared seeds); "
    "**bold** = the interval excludes 0 (p < 0.05); a difference equal on every seed has no interval "
    "and no test and is never bold. **Across datasets**: seed-mean top-1 per dataset; Wilcoxon "
    f"signed-rank test per method pair sharing 2 or more datasets (two-sided, {ZERO_RULE}; p exact "
    "from the signed-rank distribution without ties or zeros, exact by enumerating all sign flips "
    "with ties or zeros up to 13 datasets, else the normal approximation: the table says which; "
    "unadjusted for multiplicity; with fewer than 6 "
    "datasets it cannot reach p < 0.05); average ranks, Friedman test and Nemenyi critical difference "
    "(Demšar 2006) on the datasets every ranked method has. **Calibration**: top-1 / ECE (%, 15 "
    "equal-width confidence bins, mean over seeds; n/a = not recorded or not applicable). See "
    "docs/statistics.md.")


def statistics_markdown(df: pd.DataFrame, blocks: list[tuple[str, int]], reference: str | None,
                        images: dict[tuple[str, int], Path] | None = None) -> str:
    """The "Statistics" section of report.md for the given (backbone, shots) blocks."""
    images = images or {}
    ci, cal = seed_ci_table(df), calibration_table(df)
    paired = paired_table(df, reference) if reference else None
    parts = ["## Statistics", "", INTRO, ""]
    for backbone, shots in blocks:
        parts += [f"### {_title(backbone, shots)}", "",
                  "CI (95%, Student t over seeds):", "", _grid(_block(ci, backbone, shots), _ci_text)]
        if paired is not None and not _block(paired, backbone, shots).empty:
            parts += [f"Paired difference vs {method_label(reference)} (95% paired-t CI):", "",
                      _grid(_block(paired, backbone, shots), _paired_text)]
        wil = wilcoxon_table(df, backbone, shots)
        if not wil.empty:
            parts += ["Wilcoxon signed-rank tests across datasets:", "", _wilcoxon_markdown(wil)]
        analysis = rank_analysis(df, backbone, shots)
        if analysis is not None:
            parts += _ranks_markdown(analysis, images.get((backbone, shots)))
        parts += ["Top-1 / ECE (%):", "", _grid(_block(cal, backbone, shots), _calibration_text)]
    return "\n".join(parts)


def _title(backbone: str, shots: int) -> str:
    return f"{backbone}, {shots} {'shot' if shots == 1 else 'shots'}"


def statistics_csvs(df: pd.DataFrame, out: Path, blocks: list[tuple[str, int]], reference: str | None) -> list[Path]:
    """stats_ci.csv, stats_paired.csv, stats_wilcoxon.csv, stats_ranks.csv and calibration.csv."""
    frames = {"stats_ci.csv": seed_ci_table(df), "calibration.csv": calibration_table(df)}
    if reference:
        frames["stats_paired.csv"] = paired_table(df, reference)
    wil = [wilcoxon_table(df, b, s) for b, s in blocks]
    frames["stats_wilcoxon.csv"] = pd.concat(wil, ignore_index=True) if wil else pd.DataFrame()
    frames["stats_ranks.csv"] = _ranks_frame(df, blocks)
    for name, frame in frames.items():
        frame.to_csv(out / name, index=False, float_format="%.6g")
    return [out / name for name in frames]


def _ranks_frame(df: pd.DataFrame, blocks: list[tuple[str, int]]) -> pd.DataFrame:
    """One row per (block, method): average rank, with the block's N, CD and Friedman results."""
    rows = []
    for backbone, shots in blocks:
        a = rank_analysis(df, backbone, shots)
        if a is None:
            continue
        for method, rank in a.ranks.items():
            rows.append({"backbone": backbone, "shots": shots, "method": method, "average_rank": rank,
                         "n_datasets": a.n_datasets, "cd": a.cd, "alpha": a.alpha, **a.friedman,
                         "datasets": ";".join(a.datasets), "left_out": "; ".join(left_out_lines(a))})
    return pd.DataFrame(rows)


def cd_figures(df: pd.DataFrame, out: Path, blocks: list[tuple[str, int]], formats: list[str],
               notes: list[str]) -> dict[tuple[str, int], list[Path]]:
    """A critical-difference diagram per block with 2+ methods on 2+ complete datasets (png/pdf)."""
    from fsbench.report.cd_diagram import plot_cd_diagram

    written: dict[tuple[str, int], list[Path]] = {}
    skipped = []
    for backbone, shots in blocks:
        analysis = rank_analysis(df, backbone, shots)
        if analysis is None:
            if _block(seed_runs(df), backbone, shots)["method"].nunique() > 1:
                skipped.append(_title(backbone, shots))
            continue
        fig = plot_cd_diagram(analysis)
        stem = out / f"cd_{slug(backbone)}_{shots}shots"
        for ext in (e for e in ("png", "pdf") if e in formats):
            fig.savefig(stem.with_suffix(f".{ext}"), dpi=200, bbox_inches="tight")
            written.setdefault((backbone, shots), []).append(stem.with_suffix(f".{ext}"))
    if skipped:
        notes.append(f"Critical-difference diagram skipped for {', '.join(skipped)}: no two methods have "
                     "results on two common datasets.")
    return written


def write_statistics(df: pd.DataFrame, out: Path, formats: list[str], reference: str | None,
                     notes: list[str]) -> tuple[str, list[Path]]:
    """Write the statistics CSVs and critical-difference figures under `out` (as `formats` ask) and
    return the Markdown section with the written paths. `reference`: from `resolve_reference`."""
    from fsbench.report.tables import blocks

    chosen = blocks(df)
    written = statistics_csvs(df, out, chosen, reference) if "csv" in formats else []
    figures = cd_figures(df, out, chosen, formats, notes) if {"png", "pdf"} & set(formats) else {}
    written += [p for paths in figures.values() for p in paths]
    images = {key: p for key, paths in figures.items() for p in paths if p.suffix == ".png"}
    if reference is None and seed_runs(df)["method"].nunique() > 1:
        notes.append("Paired differences skipped: no results for the default reference method 'lora' "
                     "(choose one with --reference-method).")
    return statistics_markdown(df, chosen, reference, images), written
