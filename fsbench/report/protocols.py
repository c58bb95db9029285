"""Tables and a figure of the generalisation protocols (base-to-new, cross-dataset, domain
generalisation), as the field publishes them since CoCoOp (Zhou et al., "Conditional Prompt
Learning for Vision-Language Models", CVPR 2022; code github.com/KaiyangZhou/CoOp):

- base-to-new as CoCoOp's Table 1: Base / New / H per dataset and their Average;
- cross-dataset as CoCoOp's Table 2: the source, each target and the Average over the targets;
- domain generalisation as CoCoOp's Table 3: the source, ImageNet-V2 / -Sketch / -A / -R and the
  Average over the targets.

Cells are the mean ± sample std (ddof=1) over seeds of a result's named `metrics` (result schema
2), with the number of seeds. H follows CoCoOp: per dataset H = 2BN/(B+N) of the seed-mean Base B
and New N (its std is the std of the per-seed H); the Average's H is the harmonic mean of the
Average Base and the Average New, not the mean of per-dataset H (CoCoOp's Table 1(a): CLIP 69.34 /
74.22 / 71.70, and 2·69.34·74.22/(69.34+74.22) = 71.70). A metric a method cannot produce (in the
result's `not_applicable`) is "n/a" with its reason in a footnote, never a number, and so is any
Average or H that would need it. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fsbench.protocols import PROTOCOLS
from fsbench.protocols import harmonic_mean as protocol_hm
from fsbench.report.render import latex_escape
from fsbench.report.style import AVERAGE, dataset_label, method_colors, method_label, order_methods, rc_context
from fsbench.report.tables import clean, fewshot_rows
from fsbench.results import slug

PROTOCOL_METRICS = {"base2new": ("base", "new", "hm"), "cross_dataset": ("top1",),
                    "domain_generalisation": ("top1",)}
PROTOCOL_TITLES = {"base2new": "Base-to-new generalisation", "cross_dataset": "Cross-dataset transfer",
                   "domain_generalisation": "Domain generalisation"}
METRIC_LABELS = {"base": "Base", "new": "New", "hm": "H", "top1": "Top-1"}
TRANSFER = ("cross_dataset", "domain_generalisation")
# CoCoOp's Tables 1-3 column order; datasets not listed follow, sorted
COCOOP_ORDER = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch",
                "imagenet_a", "imagenet_r"]
DG_LABELS = {"imagenet_v2": "ImageNet-V2", "imagenet_sketch": "ImageNet-Sketch", "imagenet_a": "ImageNet-A",
             "imagenet_r": "ImageNet-R"}
NA, DAGGER, DDAGGER, MISSING = "n/a", "†", "‡", "–"
LONG_COLUMNS = ["backbone", "shots", "method", "source", "dataset", "seed", "metric", "value", "reason"]
SUMMARY_COLUMNS = ["backbone", "shots", "method", "source", "dataset", "metric", "mean", "std", "n", "na",
                   "partial", "missing", "fallback"]
CELL_KEYS = ["backbone", "shots", "method", "source", "dataset", "metric"]


def harmonic_mean(base: float, new: float) -> float:
    """`fsbench.protocols.harmonic_mean` (H = 2BN/(B+N)) for frame values: NaN in, NaN out."""
    if pd.isna(base) or pd.isna(new):
        return np.nan
    return float(protocol_hm(float(base), float(new)))


def protocol_label(name: str) -> str:
    """Display name of a dataset in these tables (ImageNet-V2 ... for the DG targets)."""
    return DG_LABELS.get(name, dataset_label(name))


def order_cocoop(names) -> list[str]:
    """CoCoOp's dataset order (Tables 1-3), then unknown names sorted; "average" left out."""
    names = set(names) - {AVERAGE}
    return [d for d in COCOOP_ORDER if d in names] + sorted(names - set(COCOOP_ORDER))


def protocol_rows(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Finished runs of one protocol (none when the frame has no `protocol` column: schema 1)."""
    if df.empty or "protocol" not in df.columns:
        return df.iloc[:0]
    return df[(df["status"] == "ok") & (df["protocol"] == protocol)]


def _metric(row: dict, name: str, protocol: str) -> tuple[float | None, str]:
    """(value, not-applicable reason) of one metric of one result row."""
    metrics = row.get("metrics") if isinstance(row.get("metrics"), dict) else {}
    na = row.get("not_applicable") if isinstance(row.get("not_applicable"), dict) else {}
    if name == "hm" and not na.get("hm"):
        reason = na.get("new") or na.get("base") or ""
        if reason:
            return None, reason
        value = metrics.get("hm")
        return (value, "") if value is not None else (harmonic_mean(metrics.get("base", np.nan),
                                                                    metrics.get("new", np.nan)), "")
    value = metrics.get(name, row.get("top1") if protocol in TRANSFER and name == "top1" else None)
    return (None if value is None or pd.isna(value) else float(value)), str(na.get(name) or "")


def metric_long(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """One row per (run, metric): value (NaN when not applicable) and the not-applicable reason."""
    rows = []
    for row in protocol_rows(df, protocol).to_dict("records"):
        source = row.get("source_dataset") if protocol in TRANSFER else ""
        for name in PROTOCOL_METRICS[protocol]:
            value, reason = _metric(row, name, protocol)
            if (value is None or pd.isna(value)) and not reason:
                continue  # not measured (a failed evaluation): an empty cell, not "n/a"
            rows.append({"backbone": row["backbone"], "shots": int(row["shots"]), "method": row["method"],
                         "source": source or "", "dataset": row["dataset"], "seed": row["seed"], "metric": name,
                         "value": np.nan if reason else value, "reason": reason})
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def _seed_cells(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and count over seeds per cell; a cell with any n/a seed is n/a."""
    rows = []
    for key, group in long.groupby(CELL_KEYS, sort=False):
        reasons = sorted({r for r in group["reason"] if r})
        values = group["value"].astype(float)
        rows.append({**dict(zip(CELL_KEYS, key, strict=True)), "n": len(group), "na": "; ".join(reasons),
                     "mean": np.nan if reasons else values.mean(),
                     "std": np.nan if reasons or len(values) < 2 else values.std(ddof=1),
                     "partial": False, "missing": (), "fallback": False})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _h_of_means(cells: pd.DataFrame) -> pd.DataFrame:
    """CoCoOp's H: the harmonic mean of the cell's Base and New means (std stays per-seed H's)."""
    keys = [k for k in CELL_KEYS if k != "metric"]
    means = cells.pivot_table(index=keys, columns="metric", values="mean", aggfunc="first", dropna=False)
    cells = cells.copy()
    for i in cells.index[(cells["metric"] == "hm") & (cells["na"] == "")]:
        key = tuple(cells.loc[i, keys])
        base, new = (means.at[key, m] if key in means.index and m in means.columns else np.nan
                     for m in ("base", "new"))
        cells.at[i, "mean"] = harmonic_mean(base, new)
    return cells


def _averages(cells: pd.DataFrame) -> pd.DataFrame:
    """Average rows: mean over the block's datasets of the seed-means, per method and metric.

    Partial (†) when the method lacks datasets its block has; n/a when any dataset is n/a.
    """
    rows = []
    for key, block in cells.groupby(["backbone", "shots", "source", "metric"], sort=False):
        datasets = set(block["dataset"])
        for method, sub in block.groupby("method", sort=False):
            missing = tuple(d for d in order_cocoop(datasets) if d not in set(sub["dataset"]))
            na = sorted({x for x in sub["na"] if x})
            rows.append({**dict(zip(["backbone", "shots", "source", "metric"], key, strict=True)),
                         "method": method, "dataset": AVERAGE, "n": len(sub), "na": "; ".join(na),
                         "mean": np.nan if na else float(sub["mean"].mean()), "std": np.nan,
                         "partial": bool(missing) and not na, "missing": missing, "fallback": False})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _average_h(avg: pd.DataFrame) -> pd.DataFrame:
    """The Average's H from the Average Base and New (CoCoOp's Table 1(a)); n/a if either is."""
    keys = ["backbone", "shots", "source", "method"]
    parts = {m: avg[avg["metric"] == m].set_index(keys) for m in ("base", "new")}
    rows = []
    for key, base in parts["base"].iterrows():
        if key not in parts["new"].index:
            continue
        new = parts["new"].loc[key]
        na = "; ".join(sorted({x for x in (base["na"], new["na"]) if x}))
        rows.append({**dict(zip(keys, key, strict=True)), "dataset": AVERAGE, "metric": "hm", "std": np.nan,
                     "mean": np.nan if na else harmonic_mean(base["mean"], new["mean"]), "na": na,
                     "n": min(base["n"], new["n"]), "partial": bool(base["partial"] or new["partial"]),
                     "missing": tuple(dict.fromkeys(base["missing"] + new["missing"])), "fallback": False})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _source_cells(df: pd.DataFrame, cells: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Source-column cells: the protocol's own result on the source when it has one, else the
    few-shot run of the same (backbone, method, shots) on the source, marked `fallback` (‡)."""
    have = set(zip(cells["backbone"], cells["shots"], cells["method"], cells["source"], cells["dataset"],
                   strict=True))
    fewshot = clean(fewshot_rows(df))
    rows = []
    for backbone, shots, method, source in cells[["backbone", "shots", "method", "source"]].drop_duplicates(
            ).itertuples(index=False):
        if not source or (backbone, shots, method, source, source) in have:
            continue
        runs = fewshot[(fewshot["backbone"] == backbone) & (fewshot["shots"] == shots)
                       & (fewshot["method"] == method) & (fewshot["dataset"] == source)]["top1"].astype(float)
        if len(runs):
            rows.append({"backbone": backbone, "shots": shots, "method": method, "source": source,
                         "dataset": source, "metric": "top1", "mean": runs.mean(), "n": len(runs), "na": "",
                         "std": runs.std(ddof=1) if len(runs) > 1 else np.nan, "partial": False, "missing": (),
                         "fallback": True})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def protocol_summary(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Every cell of one protocol's tables, long and numeric, Average rows included.

    Columns: `SUMMARY_COLUMNS` (source: the fitted-on dataset, "" for base2new; na: the reasons a
    cell is not applicable, "" otherwise; fallback: a source cell taken from the few-shot run).
    """
    cells = _seed_cells(metric_long(df, protocol))
    if cells.empty:
        return cells
    if protocol == "base2new":
        cells = _h_of_means(cells)
        avg = _averages(cells[cells["metric"] != "hm"])
        avg = pd.concat([avg, _average_h(avg)], ignore_index=True)
    else:
        cells = pd.concat([cells, _source_cells(df, cells, protocol)], ignore_index=True)
        avg = _averages(cells[cells["dataset"] != cells["source"]])
    out = pd.concat([cells, avg], ignore_index=True)
    return out.astype({"shots": int, "n": int, "partial": bool, "fallback": bool})


@dataclass
class Grid:
    """A rendered table: plain-text cells (with "±", "†", "‡", "n/a") and its footnotes."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    rules: list[int] = field(default_factory=list)  # a horizontal rule after these row indices


def cell_text(row, decimals: int = 2) -> str:
    """"72.34 ± 0.41 (3)"; an Average "72.34" (+ † when partial); "n/a"; "–" when there is no result."""
    if row is None:
        return MISSING
    if row["na"]:
        return NA
    text = f"{row['mean']:.{decimals}f}"
    if row["dataset"] == AVERAGE:
        return text + (DAGGER if row["partial"] else "")
    if not pd.isna(row["std"]):
        text += f" ± {row['std']:.{decimals}f}"
    return text + f" ({row['n']})" + (DDAGGER if row["fallback"] else "")


def _notes(block: pd.DataFrame) -> list[str]:
    """Footnotes: n/a reasons per method, partial Averages, source cells from few-shot runs."""
    notes = []
    na = block[block["na"] != ""]
    for method, sub in na.groupby("method", sort=False):
        for reason, rows in sub.groupby("na", sort=False):
            metrics = ", ".join(METRIC_LABELS[m] for m in dict.fromkeys(rows["metric"]))
            notes.append(f"{NA}: {method_label(method)} ({metrics}): {reason}")
    for r in block[block["partial"]].drop_duplicates(["method"]).to_dict("records"):
        names = ", ".join(protocol_label(d) for d in r["missing"])
        notes.append(f"{DAGGER} {method_label(r['method'])}: Average without {names} (no result).")
    if block["fallback"].any():
        notes.append(f"{DDAGGER} Source column from the few-shot run of the same method, backbone and shots.")
    return notes


def _lookup(block: pd.DataFrame) -> dict:
    return {(r["method"], r["dataset"], r["metric"]): r for r in block.to_dict("records")}


def base2new_grid(summary: pd.DataFrame, backbone: str, shots: int, decimals: int = 2) -> Grid:
    """CoCoOp's Table 1 for one (backbone, shots): rows (dataset, method), columns Base, New, H;
    the Average first, then each dataset in CoCoOp's order."""
    block = summary[(summary["backbone"] == backbone) & (summary["shots"] == shots)]
    cells, methods = _lookup(block), order_methods(block["method"])
    rows, rules = [], []
    for dataset in [AVERAGE] + order_cocoop(block["dataset"]):
        for i, method in enumerate(m for m in methods if any((m, dataset, x) in cells for x in ("base", "new"))):
            name = protocol_label(dataset) if i == 0 else ""
            rows.append([name, method_label(method)]
                        + [cell_text(cells.get((method, dataset, m)), decimals) for m in ("base", "new", "hm")])
        rules.append(len(rows) - 1)
    title = f"{PROTOCOL_TITLES['base2new']}, {backbone}, {shots} shots"
    return Grid(title, ["Dataset", "Method", "Base", "New", "H"], rows, _notes(block), rules[:-1])


def transfer_grid(summary: pd.DataFrame, protocol: str, backbone: str, shots: int, source: str,
                  decimals: int = 2) -> Grid:
    """CoCoOp's Table 2 (cross-dataset) or 3 (domain generalisation) for one (backbone, shots,
    source): rows methods, columns the source, each target, the Average over the targets."""
    block = summary[(summary["backbone"] == backbone) & (summary["shots"] == shots) & (summary["source"] == source)]
    cells = _lookup(block)
    columns = [source] + [d for d in order_cocoop(block["dataset"]) if d != source] + [AVERAGE]
    header = ["Method", f"Source: {protocol_label(source)}"] + [protocol_label(d) for d in columns[1:]]
    rows = [[method_label(m)] + [cell_text(cells.get((m, d, "top1")), decimals) for d in columns]
            for m in order_methods(block["method"])]
    title = f"{PROTOCOL_TITLES[protocol]}, {backbone}, {shots} shots, fitted on {protocol_label(source)}"
    off_paper = PROTOCOLS.get(protocol).off_paper(source, shots) if protocol in PROTOCOLS else ""
    if off_paper:  # asked for explicitly (--datasets / --shots, [study] transfer_*): say it is not the papers'
        title += f" (not the papers' setting: {off_paper})"
    return Grid(title, header, rows, _notes(block))


def grid_markdown(grid: Grid) -> str:
    """GitHub Markdown of a `Grid`, footnotes below."""
    lines = ["| " + " | ".join(grid.header) + " |",
             "|" + "|".join(":---" if i == 0 or grid.header[i] in ("Method",) else ":---:"
                            for i in range(len(grid.header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in grid.rows]
    return "\n".join(lines + ([""] + grid.notes if grid.notes else [])) + "\n"


def _latex_cell(text: str) -> str:
    text = latex_escape(text).replace("±", r"$\pm$").replace(MISSING, "--")
    return text.replace(DAGGER, r"$^\dagger$").replace(DDAGGER, r"$^\ddagger$")


def grid_latex(grid: Grid) -> str:
    """A booktabs `table` of a `Grid` (a midrule between datasets), footnotes below."""
    body = [r"\begin{table*}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(grid.title)}; "
            r"mean $\pm$ std over seeds (n).}", r"\resizebox{\textwidth}{!}{%",
            rf"\begin{{tabular}}{{ll{'c' * (len(grid.header) - 2)}}}", r"\toprule",
            " & ".join(latex_escape(h) for h in grid.header) + r" \\", r"\midrule"]
    for i, row in enumerate(grid.rows):
        body.append(" & ".join(_latex_cell(c) for c in row) + r" \\")
        if i in grid.rules:
            body.append(r"\midrule")
    body += [r"\bottomrule", r"\end{tabular}}"] + [r"\par\footnotesize " + _latex_cell(n) for n in grid.notes]
    return "\n".join(body + [r"\end{table*}"]) + "\n"


def protocol_grids(df: pd.DataFrame, decimals: int = 2) -> list[tuple[str, Grid]]:
    """Every protocol table of `df` as (protocol, Grid), in protocol, backbone, shots, source order."""
    grids = []
    for protocol in PROTOCOL_METRICS:
        summary = protocol_summary(df, protocol)
        if summary.empty:
            continue
        for key in sorted(set(zip(summary["backbone"], summary["shots"], summary["source"], strict=True))):
            backbone, shots, source = key
            grid = (base2new_grid(summary, backbone, shots, decimals) if protocol == "base2new" else
                    transfer_grid(summary, protocol, backbone, shots, source, decimals))
            grids.append((protocol, grid))
    return grids


def protocol_markdown(df: pd.DataFrame) -> str:
    """The protocol sections of report.md ("" when no result has another protocol than few-shot)."""
    parts, current = [], None
    for protocol, grid in protocol_grids(df):
        if protocol != current:
            current = protocol
            parts += [f"## {PROTOCOL_TITLES[protocol]}\n", "Top-1 (%) mean ± sample std (ddof=1) over seeds "
                      "(seeds in parentheses); n/a = the method cannot produce the number (reason below)."
                      + (" H = 2BN/(B+N) of the mean Base and New; the Average's H is that of the Average Base "
                         "and New (CoCoOp, Table 1)." if protocol == "base2new" else
                         " Average = mean over the targets (the source excluded).") + "\n"]
        parts += [f"### {grid.title}\n", grid_markdown(grid)]
    return "\n".join(parts)


def protocol_latex(df: pd.DataFrame) -> str:
    """Every protocol table as booktabs LaTeX ("" when there is none)."""
    return "\n".join(grid_latex(grid) for _, grid in protocol_grids(df))


def protocol_csvs(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{"base2new.csv": summary, ...}: the long, numeric cells of each protocol present."""
    out = {}
    for protocol in PROTOCOL_METRICS:
        summary = protocol_summary(df, protocol)
        if not summary.empty:
            out[f"{protocol}.csv"] = summary.assign(missing=summary["missing"].map(";".join))
    return out


def _iso_h(ax, low: float, high: float) -> None:
    """Dotted curves of equal H (every 10 points) behind a Base-vs-New scatter."""
    base = np.linspace(max(low, 1e-3), high, 200)
    for h in range(10, 100, 10):
        with np.errstate(divide="ignore", invalid="ignore"):
            new = np.where(2 * base > h, h * base / (2 * base - h), np.nan)
        inside = (new >= low) & (new <= high)
        if inside.sum() > 1:
            ax.plot(base[inside], new[inside], ls=":", lw=0.7, color="0.6", zorder=1)
            ax.annotate(f"H={h}", (base[inside][-1], new[inside][-1]), fontsize="xx-small", color="0.5",
                        ha="right", va="bottom")


def _base_new_panel(ax, block: pd.DataFrame, dataset: str, colors: dict) -> None:
    """One panel: a point per method at (Base, New); methods with New n/a are named, not drawn."""
    sub = block[block["dataset"] == dataset]
    means = sub.pivot_table(index="method", columns="metric", values="mean", aggfunc="first")
    na = sorted(set(sub.loc[sub["na"] != "", "method"]))
    drawn = means.dropna(subset=[c for c in ("base", "new") if c in means.columns]).reindex(
        [m for m in order_methods(means.index) if m not in na]).dropna()
    values = drawn[["base", "new"]].to_numpy().ravel() if {"base", "new"} <= set(drawn.columns) else []
    low, high = (max(0.0, min(values) - 5), min(100.0, max(values) + 5)) if len(values) else (0.0, 100.0)
    _iso_h(ax, low, high)
    for method, row in drawn.iterrows():
        ax.scatter(row["base"], row["new"], s=30, color=colors.get(method), label=method_label(method), zorder=3)
    if na:
        ax.text(0.03, 0.97, f"New {NA}: " + ", ".join(method_label(m) for m in na), transform=ax.transAxes,
                fontsize="xx-small", color="0.3", va="top", bbox={"fc": "white", "ec": "none", "pad": 1})
    ax.set(xlim=(low, high), ylim=(low, high), title=protocol_label(dataset), xlabel="Base (%)", ylabel="New (%)")
    ax.set_aspect("equal", adjustable="box")


def plot_base_new(df: pd.DataFrame, backbone: str, shots: int, summary: pd.DataFrame | None = None) -> Figure | None:
    """Base vs New accuracy per method: the Average, then one panel per dataset (CoCoOp order),
    with dotted curves of equal H. None when the block has no base-to-new result."""
    from fsbench.report.style import shared_legend

    summary = protocol_summary(df, "base2new") if summary is None else summary
    if summary.empty:
        return None
    block = summary[(summary["backbone"] == backbone) & (summary["shots"] == shots)
                    & summary["metric"].isin(["base", "new"])]
    if block.empty:
        return None
    datasets = [AVERAGE] + order_cocoop(block["dataset"])
    ncols = min(4, len(datasets))
    nrows = -(-len(datasets) // ncols)
    with rc_context(font_scale=0.8):
        fig = Figure(figsize=(2.4 * ncols, 2.4 * nrows + 0.6), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        colors = method_colors(block["method"])
        for ax, dataset in zip(axes, datasets, strict=False):
            _base_new_panel(ax, block, dataset, colors)
        for ax in axes[len(datasets):]:
            ax.set_axis_off()
        shared_legend(fig, axes[:len(datasets)], ncols=4)
        fig.suptitle(f"Base vs New, {backbone}, {shots} shots (mean over seeds)", fontweight="bold")
    return fig


def protocol_figures(df: pd.DataFrame) -> list[tuple[str, Figure]]:
    """(file stem, figure) for every base-to-new (backbone, shots) block: "base2new_ViT-B-16_16shots"."""
    summary = protocol_summary(df, "base2new")
    if summary.empty:
        return []
    out = []
    for backbone, shots in sorted(set(zip(summary["backbone"], summary["shots"], strict=True))):
        fig = plot_base_new(df, backbone, shots, summary)
        if fig is not None:
            out.append((f"base2new_{slug(backbone)}_{shots}shots", fig))
    return out
