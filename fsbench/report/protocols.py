"""Tables and figures of every protocol besides few-shot, read from the protocols' metadata.

As lm-eval's `make_table` reads `results[task][metric]`, one builder reads each protocol's
`MetricInfo`s and `TableShape` (`fsbench/protocols.py`) and writes its tables: a protocol a
plug-in registers gets its own with no code here. The built-in ones keep the shapes the field
publishes since CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models",
CVPR 2022; code github.com/KaiyangZhou/CoOp), through their metadata:

- base-to-new as CoCoOp's Table 1: Base / New / H per dataset and their Average;
- cross-dataset as CoCoOp's Table 2: the source, each target and the Average over the targets;
- domain generalisation as CoCoOp's Table 3: the source, ImageNet-V2 / -Sketch / -A / -R and the
  Average over the targets.

Cells are the mean ± sample std (ddof=1) over seeds of a result's named `metrics` (result schema
2), with the number of seeds. A harmonic-mean metric follows CoCoOp: per dataset H = 2BN/(B+N) of
the seed-mean Base B and New N (its std is the std of the per-seed H); the Average's H is the
harmonic mean of the Average Base and the Average New, not the mean of per-dataset H (CoCoOp's
Table 1(a): CLIP 69.34 / 74.22 / 71.70, and 2·69.34·74.22/(69.34+74.22) = 71.70). A metric a
method cannot produce (in the result's `not_applicable`) is "n/a" with its reason in a footnote,
never a number, and so is any Average or H that would need it. Results of a protocol that is not
registered in this process (its plug-in not loaded) still get a generic table of their stored
metrics, with a note. A protocol that names a `cost_plot` (test_time: top-1 against ms per test image)
gets that scatter per backbone (`fsbench.report.cost.plot_accuracy_vs_cost`). The few-shot protocol's
results make the paper's main table (`fsbench.report.tables`). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fsbench.protocols import PROTOCOLS, MetricInfo, TableShape, metric_infos
from fsbench.protocols import harmonic_mean as protocol_hm
from fsbench.report.render import latex_escape
from fsbench.report.style import AVERAGE, dataset_label, method_colors, method_label, order_methods, rc_context
from fsbench.report.tables import is_fewshot
from fsbench.results import Result, slug

# CoCoOp's Tables 1-3 column order; datasets not listed follow, sorted
COCOOP_ORDER = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch",
                "imagenet_a", "imagenet_r", "ood_inaturalist", "ood_sun", "ood_places", "ood_textures"]  # + MCM's
DG_LABELS = {"imagenet_v2": "ImageNet-V2", "imagenet_sketch": "ImageNet-Sketch", "imagenet_a": "ImageNet-A",
             "imagenet_r": "ImageNet-R", "ood_inaturalist": "iNaturalist", "ood_sun": "SUN",
             "ood_places": "Places", "ood_textures": "Textures"}
NA, DAGGER, DDAGGER, MISSING = "n/a", "†", "‡", "–"
LONG_COLUMNS = ["backbone", "shots", "method", "source", "dataset", "seed", "metric", "value", "reason"]
SUMMARY_COLUMNS = ["backbone", "shots", "method", "source", "dataset", "metric", "mean", "std", "n", "na",
                   "partial", "missing", "fallback"]
CELL_KEYS = ["backbone", "shots", "method", "source", "dataset", "metric"]
LEGACY_PROTOCOL = Result.protocol  # what a result without a `protocol` field (schema 1) ran


@dataclass(frozen=True)
class ProtocolView:
    """What a report knows of one protocol in the results: its registered metadata, or for a protocol
    not registered in this process, a generic view of the metrics its results store."""

    name: str
    title: str
    metrics: tuple[MetricInfo, ...]
    table: TableShape
    source_result: bool
    headline: str = "top1"
    summary: str = ""
    registered: bool = True
    cost_plot: tuple[str, ...] = ()  # (accuracy metric, cost metric) to plot against each other

    def metric(self, name: str) -> MetricInfo:
        return next((m for m in self.metrics if m.name == name), MetricInfo(name))


def protocol_view(name: str, df: pd.DataFrame | None = None) -> ProtocolView:
    """The registered protocol `name`'s metadata; an unknown name gets the metrics its rows in `df` store
    (the engine's calibration extras `ece*` left out) in a methods x datasets table."""
    if name in PROTOCOLS:
        cls = PROTOCOLS.get(name)
        return ProtocolView(name, cls.title or name, metric_infos(cls), cls.table, cls.source_result,
                            cls.headline, cls.summary, cost_plot=tuple(cls.cost_plot))
    rows = protocol_rows(df, name) if df is not None else pd.DataFrame()
    stored = [k for col in ("metrics", "not_applicable") if col in rows.columns
              for d in rows[col] if isinstance(d, dict) for k in d if not k.startswith("ece")]
    names = tuple(dict.fromkeys(stored)) or ("top1",)
    source = "source_dataset" in rows.columns and bool(rows["source_dataset"].notna().any())
    return ProtocolView(name, name, tuple(MetricInfo(n) for n in names),
                        TableShape(average="targets" if source else "datasets"), source, registered=False)


def unregistered_note(view: ProtocolView) -> str:
    """The one line a report prints for results of a protocol that is not registered here."""
    return (f"Protocol {view.name!r} is not registered (its plug-in was not loaded: `fsbench report --plugin "
            f"FILE`); its stored metrics ({', '.join(m.name for m in view.metrics)}) are shown in a generic table.")


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
    """Finished runs of one protocol (a frame without a `protocol` column, schema 1, is all few-shot)."""
    if df is None or df.empty:
        return pd.DataFrame() if df is None else df.iloc[:0]
    names = (df["protocol"].fillna(LEGACY_PROTOCOL) if "protocol" in df.columns
             else pd.Series(LEGACY_PROTOCOL, index=df.index))
    return df[(df["status"] == "ok") & (names == protocol)]


def present_protocols(df: pd.DataFrame) -> list[str]:
    """Protocols with finished results in `df` besides few-shot (the main table's): registered ones in
    registry order, then unknown ones sorted."""
    if df.empty or "protocol" not in df.columns:
        return []
    names = set(df.loc[(df["status"] == "ok") & ~is_fewshot(df), "protocol"].dropna())
    return [n for n in PROTOCOLS.names() if n in names] + sorted(names - set(PROTOCOLS.names()))


def _dict(row: dict, key: str) -> dict:
    return row.get(key) if isinstance(row.get(key), dict) else {}


def _metric(row: dict, info: MetricInfo, headline: str) -> tuple[float | None, str]:
    """(value, not-applicable reason) of one metric of one result row. A harmonic-mean metric the file
    does not store is computed from its parts, and is n/a when a part is; the headline metric falls back
    to the row's `top1`."""
    metrics, na = _dict(row, "metrics"), _dict(row, "not_applicable")
    reason = str(na.get(info.name) or "")
    if info.of and not reason:
        reason = "; ".join(dict.fromkeys(str(na[p]) for p in info.of if na.get(p)))
    if reason:
        return None, reason
    value = metrics.get(info.name)
    if value is None and len(info.of) == 2:
        value = harmonic_mean(metrics.get(info.of[0], np.nan), metrics.get(info.of[1], np.nan))
    if value is None and info.name == headline:
        value = row.get("top1")
    return (None if value is None or pd.isna(value) else float(value)), ""


def metric_long(df: pd.DataFrame, protocol: str, view: ProtocolView | None = None) -> pd.DataFrame:
    """One row per (run, metric): value (NaN when not applicable) and the not-applicable reason."""
    view = view or protocol_view(protocol, df)
    rows = []
    for row in protocol_rows(df, protocol).to_dict("records"):
        source = (row.get("source_dataset") or "") if view.source_result else ""
        for info in view.metrics:
            value, reason = _metric(row, info, view.headline)
            if value is None and not reason:
                continue  # not measured (a failed evaluation): an empty cell, not "n/a"
            rows.append({"backbone": row["backbone"], "shots": int(row["shots"]), "method": row["method"],
                         "source": source, "dataset": row["dataset"], "seed": row["seed"], "metric": info.name,
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


def _hm_of_means(cells: pd.DataFrame, info: MetricInfo) -> pd.DataFrame:
    """`seeds="hm_of_means"` (CoCoOp's H): the harmonic mean of the cell's means of `info.of`; the std
    stays that of the per-seed values."""
    keys = [k for k in CELL_KEYS if k != "metric"]
    means = cells.pivot_table(index=keys, columns="metric", values="mean", aggfunc="first", dropna=False)
    cells = cells.copy()
    for i in cells.index[(cells["metric"] == info.name) & (cells["na"] == "")]:
        key = tuple(cells.loc[i, keys])
        a, b = (means.at[key, m] if key in means.index and m in means.columns else np.nan for m in info.of)
        cells.at[i, "mean"] = harmonic_mean(a, b)
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


def _hm_of_averages(avg: pd.DataFrame, info: MetricInfo) -> pd.DataFrame:
    """`average="hm_of_averages"`: the Average of `info` from the Averages of its two parts (CoCoOp's
    Table 1(a)); n/a if either is."""
    keys = ["backbone", "shots", "source", "method"]
    first, second = (avg[avg["metric"] == m].set_index(keys) for m in info.of)
    rows = []
    for key, a in first.iterrows():
        if key not in second.index:
            continue
        b = second.loc[key]
        na = "; ".join(sorted({x for x in (a["na"], b["na"]) if x}))
        rows.append({**dict(zip(keys, key, strict=True)), "dataset": AVERAGE, "metric": info.name, "std": np.nan,
                     "mean": np.nan if na else harmonic_mean(a["mean"], b["mean"]), "na": na,
                     "n": min(a["n"], b["n"]), "partial": bool(a["partial"] or b["partial"]),
                     "missing": tuple(dict.fromkeys(a["missing"] + b["missing"])), "fallback": False})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _source_cells(df: pd.DataFrame, cells: pd.DataFrame, view: ProtocolView) -> pd.DataFrame:
    """Source-column cells the protocol has no own result for: the `table.source_fallback` protocol's
    run of the same (backbone, method, shots) on the source, marked `fallback` (‡)."""
    fallback = view.table.source_fallback
    if not fallback or not view.source_result:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    have = set(zip(cells["backbone"], cells["shots"], cells["method"], cells["source"], cells["dataset"],
                   strict=True))
    other = metric_long(df, fallback, protocol_view(fallback, df))
    rows = []
    for backbone, shots, method, source in cells[["backbone", "shots", "method", "source"]].drop_duplicates(
            ).itertuples(index=False):
        if not source or (backbone, shots, method, source, source) in have:
            continue
        for info in view.metrics:
            runs = other[(other["backbone"] == backbone) & (other["shots"] == shots) & (other["method"] == method)
                         & (other["dataset"] == source) & (other["metric"] == info.name)]["value"].astype(float)
            if len(runs) and runs.notna().all():
                rows.append({"backbone": backbone, "shots": shots, "method": method, "source": source,
                             "dataset": source, "metric": info.name, "mean": runs.mean(), "n": len(runs), "na": "",
                             "std": runs.std(ddof=1) if len(runs) > 1 else np.nan, "partial": False,
                             "missing": (), "fallback": True})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SUMMARY_COLUMNS)


def protocol_summary(df: pd.DataFrame, protocol: str, view: ProtocolView | None = None) -> pd.DataFrame:
    """Every cell of one protocol's tables, long and numeric, Average rows included, as its metadata says.

    Columns: `SUMMARY_COLUMNS` (source: the fitted-on dataset, "" unless the protocol's results carry
    one; na: the reasons a cell is not applicable, "" otherwise; fallback: a source cell taken from
    the `source_fallback` protocol's run).
    """
    view = view or protocol_view(protocol, df)
    cells = _seed_cells(metric_long(df, protocol, view))
    if cells.empty:
        return cells
    for info in view.metrics:
        if info.seeds == "hm_of_means":
            cells = _hm_of_means(cells, info)
    cells = _concat([cells, _source_cells(df, cells, view)])
    if view.table.average == "none":
        return cells.astype({"shots": int, "n": int, "partial": bool, "fallback": bool})
    pool = cells[cells["dataset"] != cells["source"]] if view.table.average == "targets" else cells
    plain = [m.name for m in view.metrics if m.average == "mean"]
    avg = _averages(pool[pool["metric"].isin(plain)])
    avg = _concat([avg] + [_hm_of_averages(avg, m) for m in view.metrics if m.average == "hm_of_averages"])
    out = _concat([cells, avg])
    return out.astype({"shots": int, "n": int, "partial": bool, "fallback": bool})


@dataclass
class Grid:
    """A rendered table: plain-text cells (with "±", "†", "‡", "n/a") and its footnotes."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    rules: list[int] = field(default_factory=list)  # a horizontal rule after these row indices
    labels: int = 1  # leading label columns (left-aligned)


def cell_text(row, decimals: int = 2, digits: int = 0) -> str:
    """"72.34 ± 0.41 (3)"; an Average "72.34" (+ † when partial); "n/a"; "–" when there is no result. `digits`
    > 0: that many significant digits instead of `decimals` fixed ones (`MetricInfo.digits`)."""
    if row is None:
        return MISSING
    if row["na"]:
        return NA
    spec = f".{digits}g" if digits else f".{decimals}f"
    text = f"{row['mean']:{spec}}"
    if row["dataset"] == AVERAGE:
        return text + (DAGGER if row["partial"] else "")
    if not pd.isna(row["std"]):
        text += f" ± {row['std']:{spec}}"
    return text + f" ({row['n']})" + (DDAGGER if row["fallback"] else "")


def _notes(block: pd.DataFrame, view: ProtocolView) -> list[str]:
    """Footnotes: n/a reasons per method, partial Averages, source cells from another protocol's runs."""
    notes = []
    na = block[block["na"] != ""]
    for method, sub in na.groupby("method", sort=False):
        for reason, rows in sub.groupby("na", sort=False):
            metrics = ", ".join(view.metric(m).display or m for m in dict.fromkeys(rows["metric"]))
            notes.append(f"{NA}: {method_label(method)} ({metrics}): {reason}")
    for r in block[block["partial"]].drop_duplicates(["method"]).to_dict("records"):
        names = ", ".join(protocol_label(d) for d in r["missing"])
        notes.append(f"{DAGGER} {method_label(r['method'])}: Average without {names} (no result).")
    if block["fallback"].any():
        title = protocol_view(view.table.source_fallback).title
        notes.append(f"{DDAGGER} Source column from the {title[:1].lower() + title[1:]} run of the same method, "
                     "backbone and shots.")
    return notes


def _lookup(block: pd.DataFrame) -> dict:
    return {(r["method"], r["dataset"], r["metric"]): r for r in block.to_dict("records")}


def _title(view: ProtocolView, backbone: str, shots: int, source: str = "", metric: str = "") -> str:
    fitted = f", fitted on {protocol_label(source)}" if source else ""
    title = f"{view.title}, {backbone}, {shots} shots{fitted}" + (f": {metric}" if metric else "")
    off_paper = PROTOCOLS.get(view.name).off_paper(source, shots) if source and view.name in PROTOCOLS else ""
    if off_paper:  # asked for explicitly (--datasets / --shots, [study] transfer_*): say it is not the papers'
        title += f" (not the papers' setting: {off_paper})"
    return title


def metrics_grid(summary: pd.DataFrame, view: ProtocolView, backbone: str, shots: int, source: str = "",
                 decimals: int = 2) -> Grid:
    """`columns="metrics"` (CoCoOp's Table 1): rows (dataset, method), a column per metric; the Average
    first or last as the shape says, datasets in CoCoOp's order."""
    block = summary[(summary["backbone"] == backbone) & (summary["shots"] == shots) & (summary["source"] == source)]
    cells, methods, names = _lookup(block), order_methods(block["method"]), [m.name for m in view.metrics]
    datasets = sorted(order_cocoop(block["dataset"]), key=lambda d: d != source)  # the source first (ood: the ID)
    has_avg = (block["dataset"] == AVERAGE).any()
    datasets = ([AVERAGE] + datasets if view.table.average_first else datasets + [AVERAGE]) if has_avg else datasets
    rows, rules = [], []
    for dataset in datasets:
        for i, method in enumerate(m for m in methods if any((m, dataset, x) in cells for x in names)):
            rows.append([protocol_label(dataset) if i == 0 else "", method_label(method)]
                        + [cell_text(cells.get((method, dataset, x)), decimals, view.metric(x).digits)
                           for x in names])
        rules.append(len(rows) - 1)
    header = ["Dataset", "Method"] + [m.label for m in view.metrics]
    return Grid(_title(view, backbone, shots, source), header, rows, _notes(block, view), rules[:-1], labels=2)


def datasets_grid(summary: pd.DataFrame, view: ProtocolView, metric: MetricInfo, backbone: str, shots: int,
                  source: str = "", decimals: int = 2) -> Grid:
    """`columns="datasets"` (the few-shot table; CoCoOp's Tables 2 and 3 with a source): rows methods,
    columns the source (if any), each dataset, the Average; one grid per metric."""
    block = summary[(summary["backbone"] == backbone) & (summary["shots"] == shots) & (summary["source"] == source)
                    & (summary["metric"] == metric.name)]
    cells = _lookup(block)
    first = [source] if source else []
    average = [] if view.table.average == "none" else [AVERAGE]
    columns = first + [d for d in order_cocoop(block["dataset"]) if d != source] + average
    header = (["Method"] + [f"Source: {protocol_label(source)}" for _ in first]
              + [protocol_label(d) for d in columns[len(first):]])
    rows = [[method_label(m)] + [cell_text(cells.get((m, d, metric.name)), decimals, metric.digits) for d in columns]
            for m in order_methods(block["method"])]
    label = metric.label if len(view.metrics) > 1 else ""
    return Grid(_title(view, backbone, shots, source, label), header, rows, _notes(block, view))


def grids_of(df: pd.DataFrame, protocol: str, decimals: int = 2,
             summary: pd.DataFrame | None = None) -> list[Grid]:
    """Every table of one protocol, per (backbone, shots, source), as its `TableShape` says."""
    view = protocol_view(protocol, df)
    summary = protocol_summary(df, protocol, view) if summary is None else summary
    grids = []
    for backbone, shots, source in sorted(set(zip(summary["backbone"], summary["shots"], summary["source"],
                                                  strict=True))):
        if view.table.columns == "metrics":
            grids.append(metrics_grid(summary, view, backbone, shots, source, decimals))
        else:
            grids += [datasets_grid(summary, view, m, backbone, shots, source, decimals) for m in view.metrics
                      if (summary["metric"] == m.name).any()]
    return grids


def protocol_grids(df: pd.DataFrame, decimals: int = 2) -> list[tuple[str, Grid]]:
    """Every protocol table of `df` but few-shot's as (protocol, Grid), in protocol, backbone, shots, source
    order."""
    return [(protocol, grid) for protocol in present_protocols(df) for grid in grids_of(df, protocol, decimals)]


def grid_markdown(grid: Grid) -> str:
    """GitHub Markdown of a `Grid`, footnotes below."""
    lines = ["| " + " | ".join(grid.header) + " |",
             "|" + "|".join(":---" if i == 0 or grid.header[i] in ("Method",) else ":---:"
                            for i in range(len(grid.header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in grid.rows]
    return "\n".join(lines + ([""] + grid.notes if grid.notes else [])) + "\n"



def grid_rich(grid: Grid):
    """A `rich.table.Table` of a `Grid` for the terminal (`fsbench report`), footnotes as its caption."""
    from rich.table import Table

    table = Table(title=grid.title, caption="\n".join(grid.notes) or None, caption_justify="left")
    for i, name in enumerate(grid.header):
        table.add_column(name, justify="left" if i < grid.labels else "right", overflow="fold")
    for i, row in enumerate(grid.rows):
        table.add_row(*row, end_section=i in grid.rules)
    return table

def _latex_cell(text: str) -> str:
    text = latex_escape(text).replace("±", r"$\pm$").replace(MISSING, "--").replace("↓", r"$\downarrow$")
    return text.replace(DAGGER, r"$^\dagger$").replace(DDAGGER, r"$^\ddagger$")


def grid_latex(grid: Grid) -> str:
    """A booktabs `table` of a `Grid` (a midrule between datasets), footnotes below."""
    align = "l" * grid.labels + "c" * (len(grid.header) - grid.labels)
    body = [r"\begin{table*}[t]", r"\centering", r"\small", rf"\caption{{{_latex_cell(grid.title)}; "
            r"mean $\pm$ std over seeds (n).}", r"\resizebox{\textwidth}{!}{%",
            rf"\begin{{tabular}}{{{align}}}", r"\toprule",
            " & ".join(_latex_cell(h) for h in grid.header) + r" \\", r"\midrule"]
    for i, row in enumerate(grid.rows):
        body.append(" & ".join(_latex_cell(c) for c in row) + r" \\")
        if i in grid.rules:
            body.append(r"\midrule")
    body += [r"\bottomrule", r"\end{tabular}}"] + [r"\par\footnotesize " + _latex_cell(n) for n in grid.notes]
    return "\n".join(body + [r"\end{table*}"]) + "\n"


def section_intro(view: ProtocolView) -> str:
    """The sentence under a protocol's section title, from its metadata."""
    text = ("Mean ± sample std (ddof=1) over seeds (seeds in parentheses); n/a = the method cannot produce "
            "the number (reason below).")
    text += {"targets": " Average = mean over the targets (the source excluded).",
             "datasets": " Average = mean over the datasets of the per-dataset means.", "none": ""}[view.table.average]
    text += "".join(f" {m.help}" for m in view.metrics if m.help)
    text += f" Layout of {view.table.reference}." if view.table.reference else ""
    return text if view.registered else unregistered_note(view) + " " + text


def protocol_markdown(df: pd.DataFrame) -> str:
    """The protocol sections of report.md, one per protocol present besides few-shot ("" when none)."""
    parts = []
    for protocol in present_protocols(df):
        view = protocol_view(protocol, df)
        parts += [f"## {view.title}\n", section_intro(view) + "\n"]
        for grid in grids_of(df, protocol):
            parts += [f"### {grid.title}\n", grid_markdown(grid)]
    return "\n".join(parts)


def protocol_notes(df: pd.DataFrame) -> list[str]:
    """One note per protocol in `df` that is not registered (its results are in a generic table)."""
    return [unregistered_note(protocol_view(p, df)) for p in present_protocols(df) if p not in PROTOCOLS]


def protocol_latex(df: pd.DataFrame) -> str:
    """Every protocol table as booktabs LaTeX ("" when there is none)."""
    return "\n".join(grid_latex(grid) for _, grid in protocol_grids(df))


def protocol_csvs(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{"base2new.csv": summary, ...}: the long, numeric cells of each protocol present."""
    out = {}
    for protocol in present_protocols(df):
        summary = protocol_summary(df, protocol)
        if not summary.empty:
            out[f"{slug(protocol)}.csv"] = summary.assign(missing=summary["missing"].map(";".join))
    return out


def _iso_h(ax, low: float, high: float, name: str = "H") -> None:
    """Dotted curves of equal harmonic mean (every 10 points) behind a scatter of its two parts."""
    base = np.linspace(max(low, 1e-3), high, 200)
    for h in range(10, 100, 10):
        with np.errstate(divide="ignore", invalid="ignore"):
            new = np.where(2 * base > h, h * base / (2 * base - h), np.nan)
        inside = (new >= low) & (new <= high)
        if inside.sum() > 1:
            ax.plot(base[inside], new[inside], ls=":", lw=0.7, color="0.6", zorder=1)
            ax.annotate(f"{name}={h}", (base[inside][-1], new[inside][-1]), fontsize="xx-small", color="0.5",
                        ha="right", va="bottom")


def _pair_panel(ax, block: pd.DataFrame, dataset: str, colors: dict, view: ProtocolView, info: MetricInfo) -> None:
    """One panel: a point per method at (first part, second part) of `info`; methods with a part n/a are
    named, not drawn."""
    x, y = info.of
    sub = block[block["dataset"] == dataset]
    means = sub.pivot_table(index="method", columns="metric", values="mean", aggfunc="first")
    na = sorted(set(sub.loc[sub["na"] != "", "method"]))
    drawn = means.dropna(subset=[c for c in (x, y) if c in means.columns]).reindex(
        [m for m in order_methods(means.index) if m not in na]).dropna()
    values = drawn[[x, y]].to_numpy().ravel() if {x, y} <= set(drawn.columns) else []
    low, high = (max(0.0, min(values) - 5), min(100.0, max(values) + 5)) if len(values) else (0.0, 100.0)
    _iso_h(ax, low, high, info.display or info.name)
    for method, row in drawn.iterrows():
        ax.scatter(row[x], row[y], s=30, color=colors.get(method), label=method_label(method), zorder=3)
    xl, yl = (view.metric(m).display or m for m in info.of)
    if na:
        ax.text(0.03, 0.97, f"{yl} {NA}: " + ", ".join(method_label(m) for m in na), transform=ax.transAxes,
                fontsize="xx-small", color="0.3", va="top", bbox={"fc": "white", "ec": "none", "pad": 1})
    ax.set(xlim=(low, high), ylim=(low, high), title=protocol_label(dataset), xlabel=f"{xl} (%)", ylabel=f"{yl} (%)")
    ax.set_aspect("equal", adjustable="box")


def plot_tradeoff(df: pd.DataFrame, protocol: str, backbone: str, shots: int, summary: pd.DataFrame | None = None,
                  source: str = "") -> Figure | None:
    """The two parts of a protocol's harmonic-mean metric against each other (base2new: Base vs New) per
    method: the Average, then one panel per dataset (CoCoOp order), with dotted curves of equal harmonic
    mean. None when the protocol has no such metric or the block no result."""
    from fsbench.report.style import shared_legend

    view = protocol_view(protocol, df)
    info = next((m for m in view.metrics if len(m.of) == 2), None)
    summary = protocol_summary(df, protocol, view) if summary is None and info else summary
    if info is None or summary.empty:
        return None
    block = summary[(summary["backbone"] == backbone) & (summary["shots"] == shots) & (summary["source"] == source)
                    & summary["metric"].isin(info.of)]
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
            _pair_panel(ax, block, dataset, colors, view, info)
        for ax in axes[len(datasets):]:
            ax.set_axis_off()
        shared_legend(fig, axes[:len(datasets)], ncols=4)
        xl, yl = (view.metric(m).display or m for m in info.of)
        fig.suptitle(f"{xl} vs {yl}, {backbone}, {shots} shots (mean over seeds)", fontweight="bold")
    return fig


def plot_base_new(df: pd.DataFrame, backbone: str, shots: int, summary: pd.DataFrame | None = None) -> Figure | None:
    """Base vs New accuracy per method under `base2new` (CoCoOp): `plot_tradeoff` of that protocol."""
    return plot_tradeoff(df, "base2new", backbone, shots, summary)


COST_POINT_COLUMNS = ["method", "shots", "label", "acc", "cost", "partial", "na"]


def cost_points(summary: pd.DataFrame, view: ProtocolView, backbone: str) -> pd.DataFrame:
    """One point per (method, shots) of `backbone` for the protocol's `cost_plot` (accuracy, cost): each the mean
    over datasets of the per-dataset seed-means (the numbers of its tables). `partial` when the method lacks a
    dataset the backbone's results have; `na` the reasons when a cell is n/a. Labels name the shots only when
    the backbone has several shot counts."""
    acc, cost = view.cost_plot
    cells = summary[(summary["backbone"] == backbone) & (summary["dataset"] != AVERAGE)
                    & summary["metric"].isin(view.cost_plot)]
    datasets, several = set(cells["dataset"]), cells["shots"].nunique() > 1
    rows = []
    for (method, shots), sub in cells.groupby(["method", "shots"], sort=False):
        means = {m: sub.loc[sub["metric"] == m, "mean"].astype(float) for m in (acc, cost)}
        na = "; ".join(sorted({x for x in sub["na"] if x}))
        rows.append({"method": method, "shots": int(shots), "na": na,
                     "label": method_label(method) + (f", {shots} shots" if several else ""),
                     "acc": means[acc].mean() if len(means[acc]) else np.nan,
                     "cost": means[cost].mean() if len(means[cost]) else np.nan,
                     "partial": set(sub["dataset"]) != datasets or len(means[acc]) != len(means[cost])})
    rank = {m: i for i, m in enumerate(order_methods({r["method"] for r in rows}))}
    return pd.DataFrame(sorted(rows, key=lambda r: (rank[r["method"]], r["shots"])), columns=COST_POINT_COLUMNS)


def cost_figures(df: pd.DataFrame, protocol: str, summary: pd.DataFrame | None = None) -> list[tuple[str, Figure]]:
    """(file stem, figure) per backbone of a protocol that names a `cost_plot`: accuracy against the cost of
    scoring per test image, a point per method ("test_time_top1_vs_ms_per_image_ViT-B-16")."""
    from fsbench.report.cost import plot_accuracy_vs_cost

    view = protocol_view(protocol, df)
    if len(view.cost_plot) != 2:
        return []
    summary = protocol_summary(df, protocol, view) if summary is None else summary
    acc, cost = (view.metric(m) for m in view.cost_plot)
    out = []
    for backbone in sorted(set(summary["backbone"])):
        title = (f"{view.title}: {acc.display or acc.name} vs {cost.display or cost.name}, {backbone}\n"
                 "mean over datasets of the seed-means")
        fig = plot_accuracy_vs_cost(cost_points(summary, view, backbone), title, cost.display or cost.name,
                                    f"{acc.display or acc.name} (%)")
        if fig is not None:
            out.append((f"{slug(protocol)}_{slug(acc.name)}_vs_{slug(cost.name)}_{slug(backbone)}", fig))
    return out


def protocol_figures(df: pd.DataFrame) -> list[tuple[str, Figure]]:
    """(file stem, figure) for every (backbone, shots[, source]) block of each protocol with a harmonic-mean
    metric ("base2new_ViT-B-16_16shots"), and per backbone of each protocol with a `cost_plot`."""
    out = []
    for protocol in present_protocols(df):
        view = protocol_view(protocol, df)
        out += cost_figures(df, protocol)
        if not any(len(m.of) == 2 for m in view.metrics):
            continue
        summary = protocol_summary(df, protocol, view)
        for backbone, shots, source in sorted(set(zip(summary["backbone"], summary["shots"], summary["source"],
                                                      strict=True))):
            fig = plot_tradeoff(df, protocol, backbone, shots, summary, source)
            if fig is not None:
                stem = f"{slug(protocol)}_{slug(backbone)}_{shots}shots" + (f"_from-{slug(source)}" if source else "")
                out.append((stem, fig))
    return out
