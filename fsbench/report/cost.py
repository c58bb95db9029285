"""Training cost per method (the paper's Table 1 shape) and an accuracy-vs-time Pareto plot."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from fsbench.report.style import (
    AVERAGE,
    mark_partial_legend,
    method_colors,
    method_label,
    method_styles,
    order_methods,
    rc_context,
    shared_legend,
)
from fsbench.report.tables import main_runs, summary

COST_FIELDS = ["train_seconds", "peak_memory_bytes", "trainable_params", "inference_overhead"]


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median cost per (backbone, method, shots): train time, peak memory, parameters, overhead.

    Like the paper's Table 1 (training time on 16-shot ImageNet), the 16-shot ImageNet runs are
    used when there are any; otherwise every run counts and `dataset` reads "all".
    Columns: backbone, method, shots, dataset, runs, train_seconds, peak_memory_gib,
    trainable_params, inference_overhead.
    """
    ok = main_runs(df)
    scope = ok[(ok["dataset"] == "imagenet") & (ok["shots"] == 16)] if not ok.empty else ok
    label = "imagenet"
    if scope.empty:
        scope, label = ok, "all"
    if scope.empty:
        return pd.DataFrame(columns=["backbone", "method", "shots", "dataset", "runs", "train_seconds",
                                     "peak_memory_gib", "trainable_params", "inference_overhead"])
    scope = scope.assign(**{f: pd.to_numeric(scope[f], errors="coerce") for f in COST_FIELDS})
    out = scope.groupby(["backbone", "method", "shots"]).agg(
        runs=("top1", "size"), train_seconds=("train_seconds", "median"),
        peak_memory_gib=("peak_memory_bytes", lambda s: s.median() / 2**30),
        trainable_params=("trainable_params", "median"),
        inference_overhead=("inference_overhead", "median")).reset_index()
    out.insert(3, "dataset", label)
    rank = {m: i for i, m in enumerate(order_methods(out["method"]))}
    out = out.assign(_rank=out["method"].map(rank)).sort_values(["backbone", "shots", "_rank"])
    return out.drop(columns="_rank").reset_index(drop=True)


def human_seconds(s: float) -> str:
    """12.3 s, 4.2 min, 1.5 h; "–" when unknown."""
    if s is None or pd.isna(s):
        return "–"
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def human_count(n: float) -> str:
    """1.2M, 184.3K, 512; "–" when unknown."""
    if n is None or pd.isna(n):
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def cost_markdown(table: pd.DataFrame) -> str:
    """Markdown of a `cost_table`, one block per backbone, human units."""
    lines = []
    for backbone, block in table.groupby("backbone", sort=False):
        scope = "16-shot ImageNet" if (block["dataset"] == "imagenet").all() else "all runs"
        lines += [f"**{backbone}** ({scope}; medians)", "",
                  "| Method | Shots | Runs | Train time | Peak memory | Trainable params | Inference overhead |",
                  "|:---|---:|---:|---:|---:|---:|---:|"]
        for r in block.itertuples(index=False):
            mem = "–" if pd.isna(r.peak_memory_gib) else f"{r.peak_memory_gib:.2f} GiB"
            lines.append(f"| {method_label(r.method)} | {r.shots} | {r.runs} | {human_seconds(r.train_seconds)} "
                         f"| {mem} | {human_count(r.trainable_params)} | {human_count(r.inference_overhead)} |")
        lines.append("")
    return "\n".join(lines)


PAPER_COST_COLUMNS = ["method", "paper_time", "paper_seconds", "backbone", "runs", "train_seconds", "ratio"]


def paper_cost_table(df: pd.DataFrame, times: pd.DataFrame) -> pd.DataFrame:
    """Table 1 of the CLIP-LoRA paper beside fsbench's measured training time.

    One row per Table 1 method and fsbench backbone: the paper's time (text and seconds; one A100,
    each method's own code) and the median `train_seconds` of fsbench's runs of the same cell
    (method, dataset, shots: 16-shot ImageNet), NaN when there is none; other datasets or shot
    counts are never put beside the paper's number. `ratio` = fsbench / paper.
    `times` is `fsbench.report.compare.load_training_times()`. Columns: `PAPER_COST_COLUMNS`.
    """
    ok = main_runs(df)
    backbones = sorted(set(ok["backbone"])) if not ok.empty else []
    rows = []
    for t in times.itertuples(index=False):
        for backbone in backbones or [None]:
            cell = ok[(ok["backbone"] == backbone) & (ok["method"] == t.method) & (ok["dataset"] == t.dataset)
                      & (ok["shots"] == t.shots)] if backbone else ok.iloc[:0]
            seconds = pd.to_numeric(cell["train_seconds"], errors="coerce").median() if len(cell) else np.nan
            rows.append({"method": t.method, "paper_time": t.training_time, "paper_seconds": t.paper_seconds,
                         "backbone": backbone or "–", "runs": len(cell), "train_seconds": seconds,
                         "ratio": seconds / t.paper_seconds if t.paper_seconds else np.nan})
    return pd.DataFrame(rows, columns=PAPER_COST_COLUMNS)


def paper_cost_markdown(table: pd.DataFrame) -> str:
    """Markdown of a `paper_cost_table`: the paper's time, fsbench's median time and their ratio."""
    lines = ["Table 1 of the paper (16-shot ImageNet, one A100 80 GB, each method's own code) beside "
             "fsbench's median training time of the same cell (– = no such run):", "",
             "| Method | Paper (Table 1) | Backbone | Runs | fsbench | fsbench / paper |",
             "|:---|---:|:---|---:|---:|---:|"]
    for r in table.itertuples(index=False):
        ratio = "–" if pd.isna(r.ratio) else f"{r.ratio:.2f}×"
        lines.append(f"| {method_label(r.method)} | {r.paper_time} | {r.backbone} | {r.runs} "
                     f"| {human_seconds(r.train_seconds)} | {ratio} |")
    return "\n".join(lines) + "\n"


def pareto_front(points: pd.DataFrame, x: str = "time", y: str = "acc") -> pd.DataFrame:
    """The points no other point beats on both axes (lower x and higher y), sorted by x."""
    front, best = [], -np.inf
    for _, row in points.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            front.append(row)
            best = row[y]
    return pd.DataFrame(front, columns=points.columns)


def pareto_points(df: pd.DataFrame, backbone: str, shots: int) -> pd.DataFrame:
    """Per method: median train seconds and Average accuracy at `shots` (partial flagged)."""
    ok = main_runs(df)
    ok = ok[(ok["backbone"] == backbone) & (ok["shots"] == shots)]
    times = pd.to_numeric(ok["train_seconds"], errors="coerce").groupby(ok["method"]).median()
    avg = summary(ok)
    avg = avg[avg["dataset"] == AVERAGE].set_index("method")
    pts = pd.DataFrame({"time": times, "acc": avg["mean"], "partial": avg["partial"].astype(bool)})
    pts.index.name = "method"
    return pts.dropna(subset=["acc"]).reset_index()


def _log_time_axis(ax) -> None:
    """Log x axis in seconds with readable ticks (1, 2, 5 per decade when the range is short)."""
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    low, high = ax.get_xlim()
    subs = (1.0, 2.0, 5.0) if np.log10(high / low) < 2.5 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:.3g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def _pareto_points(ax, timed: pd.DataFrame, on_front: set[str], colors: dict) -> None:
    """Front points large with a dark ring; dominated points small and faded, so that one lying on the
    front's dashed line (same accuracy as a front point, more time) never looks like a front point."""
    styles = method_styles(timed["method"])
    for r in timed.itertuples(index=False):
        color, front = colors.get(r.method), r.method in on_front
        ax.scatter(r.time, r.acc, s=55 if front else 28, marker=styles[r.method]["marker"],
                   facecolors="white" if r.partial else color, edgecolors="0.1" if front else color,
                   lw=1.6 if front else 1.0, alpha=1.0 if front else 0.55, zorder=4 if front else 3,
                   label=method_label(r.method))


def _pareto_panel(ax, df: pd.DataFrame, backbone: str, colors: dict) -> bool:
    """Draw one backbone's scatter and front; False when nothing can be drawn."""
    shots_present = sorted(set(main_runs(df).query("backbone == @backbone")["shots"]) - {0})
    if not shots_present:
        return False
    shots = 16 if 16 in shots_present else shots_present[-1]
    pts = pareto_points(df, backbone, shots)
    rank = {m: i for i, m in enumerate(order_methods(pts["method"]))}
    timed = pts[pts["time"] > 0].sort_values("method", key=lambda c: c.map(rank))
    complete = timed[~timed["partial"].astype(bool)]
    front = pareto_front(complete if not complete.empty else timed)  # partial Averages don't compete
    _pareto_points(ax, timed, set(front["method"]), colors)
    if timed["partial"].any():
        mark_partial_legend(ax)
    if len(front) > 1:
        ax.step(front["time"], front["acc"], where="post", color="0.4", lw=1, ls="--", zorder=2,
                label="Pareto front (ringed)")
    zs = pareto_points(df, backbone, 0) if 0 in set(main_runs(df)["shots"]) else pd.DataFrame()
    n_block = main_runs(df).query("backbone == @backbone and shots == @shots")["dataset"].nunique()
    n_zero = main_runs(df).query("backbone == @backbone and shots == 0")["dataset"].nunique()
    if n_zero < n_block:  # a zero-shot Average over fewer datasets is not comparable
        zs = zs.iloc[:0]
    for r in zs.itertuples(index=False):
        ax.axhline(r.acc, color=colors.get(r.method), ls=":", lw=1, label=f"{method_label(r.method)} (0 shots)")
    _log_time_axis(ax)
    ax.set(title=f"{backbone}, {shots} shots", xlabel="Median training time (s, log scale)",
           ylabel="Average top-1 (%)")
    return not timed.empty or not zs.empty


def plot_pareto(df: pd.DataFrame, backbones: list[str] | None = None) -> Figure | None:
    """Accuracy (Average over datasets) vs median training time, one panel per backbone.

    Uses 16 shots when present (else the largest shot count); zero-shot methods are horizontal
    lines; hollow markers are Averages over fewer datasets. None when no run has a train time.
    """
    ok = main_runs(df)
    if ok.empty:
        return None
    backbones = backbones or sorted(set(ok["backbone"]))
    colors = method_colors(ok["method"])
    with rc_context():
        entries = ok["method"].nunique() + 3  # the legend below grows with the methods (3 per row)
        fig = Figure(figsize=(3.4 * len(backbones), 3.2 + 0.2 * -(-entries // 3)), layout="constrained")
        axes = fig.subplots(1, len(backbones), squeeze=False)[0]
        drawn = [_pareto_panel(ax, ok, b, colors) for ax, b in zip(axes, backbones, strict=True)]
        if not any(drawn):
            return None
        shared_legend(fig, axes, ncols=3)
    return fig


def plot_accuracy_vs_cost(points: pd.DataFrame, title: str, xlabel: str, ylabel: str) -> Figure | None:
    """Accuracy against a cost of scoring (log x axis), one point per row of `points` (columns method, label,
    acc, cost, partial, na): test-time methods, whose price is paid per test image. Ringed points and the dashed
    line are the Pareto front among the complete points; hollow markers are means over fewer datasets; a row
    with `na` (a metric the method cannot produce) is named below the title, not drawn. None when no point
    has a positive cost."""
    drawn = points[(points["na"] == "") & (points["cost"] > 0) & points["acc"].notna()]
    if drawn.empty:
        return None
    complete = drawn[~drawn["partial"].astype(bool)]
    front = pareto_front(complete if not complete.empty else drawn, x="cost", y="acc")
    on_front = set(front["label"])
    colors, styles = method_colors(drawn["method"]), method_styles(drawn["method"])
    with rc_context():
        fig = Figure(figsize=(4.6, 3.4 + 0.2 * -(-len(drawn) // 2)), layout="constrained")
        ax = fig.subplots()
        for r in drawn.itertuples(index=False):
            ring = r.label in on_front
            ax.scatter(r.cost, r.acc, s=55 if ring else 30, marker=styles[r.method]["marker"],
                       facecolors="white" if r.partial else colors[r.method], edgecolors="0.1" if ring else
                       colors[r.method], lw=1.6 if ring else 1.0, zorder=4, label=r.label)
        if len(front) > 1:
            ax.step(front["cost"], front["acc"], where="post", color="0.4", lw=1, ls="--", zorder=2,
                    label="Pareto front (ringed)")
        if drawn["partial"].astype(bool).any():
            mark_partial_legend(ax)
        _log_time_axis(ax)
        low, high = ax.get_xlim()
        if high < 10 * low:  # at least a decade, so that the ticks are round numbers
            middle = float(np.sqrt(low * high))
            ax.set_xlim(middle / 10**0.5, middle * 10**0.5)
        ax.set(xlabel=f"{xlabel} (log scale)", ylabel=ylabel)
        skipped = points.loc[points["na"] != "", "label"].tolist()
        fig.suptitle(title + ("\nnot drawn (n/a): " + ", ".join(skipped) if skipped else ""), fontsize=9)
        shared_legend(fig, [ax], ncols=2)
    return fig
