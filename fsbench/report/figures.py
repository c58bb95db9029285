"""Figure 2 of the CLIP-LoRA paper: top-1 vs shots, one panel per dataset plus "Average".

Figures are built with the object-oriented API (`matplotlib.figure.Figure`, never pyplot), so
they render headless (Agg when saved) and never switch a notebook's backend.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from fsbench.report.style import (
    AVERAGE,
    HIGHLIGHT,
    SHOTS,
    dataset_label,
    method_colors,
    method_label,
    method_styles,
    order_datasets,
    order_methods,
    rc_context,
    shared_legend,
)
from fsbench.report.tables import STD_LABELS, summary


def _log2_axis(ax, shots: list[int]) -> None:
    """Shots on a log2 axis with plain integer ticks (one shot count: a window of one octave around it)."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(shots) | {s for s in SHOTS if min(shots) <= s <= max(shots)})
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2**0.5, ticks[0] * 2**0.5)


def _dodge(index: int, k: int) -> float:
    """Multiplicative x offset of the `index`-th of `k` methods: methods with identical numbers sit side
    by side instead of on top of each other (at most a fifth of an octave across all methods)."""
    step = min(0.05, 0.2 / max(k - 1, 1))
    return 2 ** (step * (index - (k - 1) / 2))


def _draw_method(ax, rows: pd.DataFrame, method: str, color, style: dict, shift: float, single: bool) -> None:
    """One method in one panel: a line over shots with its ±std band (one shot count: a point with a
    ±std error bar), zero-shot results (shots 0) as a horizontal line; x shifted by `shift` (dodge)."""
    label = method_label(method)
    for zero in rows[rows["shots"] == 0].itertuples(index=False):
        ax.axhline(zero.mean, color=color, ls=style["ls"], lw=1.0, label=label)
    few = rows[rows["shots"] > 0].sort_values("shots")
    if few.empty:
        return
    x, std = few["shots"] * shift, few["std"].astype(float)
    lw = 2.2 if method == HIGHLIGHT else 1.3
    face = ["white" if p else color for p in few["partial"].astype(bool)]  # open marker: partial Average
    if single:
        ax.errorbar(x, few["mean"], yerr=std.fillna(0), color=color, lw=lw, ls="none", capsize=2.5, zorder=3)
    else:
        ax.plot(x, few["mean"], color=color, lw=lw, ls=style["ls"], zorder=3)
        if std.notna().any():
            ax.fill_between(x, few["mean"] - std.fillna(0), few["mean"] + std.fillna(0), color=color, alpha=0.12,
                            lw=0)
    ax.scatter(x, few["mean"], s=22, marker=style["marker"], facecolors=face, edgecolors=[color], lw=1.0,
               zorder=4)
    ax.plot([], [], color=color, lw=lw, ls="none" if single else style["ls"], marker=style["marker"], ms=4.5,
            label=label)  # legend entry: line and marker together


def _panel(ax, rows: pd.DataFrame, title: str, colors: dict, styles: dict, single: bool) -> None:
    """One dataset (or Average) panel."""
    methods = list(styles)
    for method in order_methods(rows["method"]):
        _draw_method(ax, rows[rows["method"] == method], method, colors[method], styles[method],
                     _dodge(methods.index(method), len(methods)), single)
    few = sorted(set(rows["shots"]) - {0}) or list(SHOTS)
    _log2_axis(ax, few)
    ax.set_title(title)


def _drop_incomparable_zero_shot(s: pd.DataFrame) -> pd.DataFrame:
    """Drop 0-shot Averages over fewer datasets than the backbone has: a line for them would
    compare averages over different dataset sets."""
    per_dataset = s[s["dataset"] != AVERAGE]
    total = per_dataset.groupby("backbone")["dataset"].nunique()
    bad = (s["dataset"] == AVERAGE) & (s["shots"] == 0) & (s["n"] < s["backbone"].map(total))
    return s[~bad]


def _grid(n: int, width: float = 7.0, row_height: float = 1.85, max_cols: int = 4):
    """A constrained-layout figure with `n` panels on a grid; unused axes hidden."""
    ncols = min(max_cols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width, row_height * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for i, ax in enumerate(axes.flat[:n]):
        if i % ncols == 0:
            ax.set_ylabel("Top-1 (%)")
        if i >= n - ncols:
            ax.set_xlabel("Shots per class")
    return fig, list(axes.flat[:n])


def caption(s: pd.DataFrame, std: str) -> str:
    """What a Figure 2 panel shows: lines (or points), the band (or bars) and the open markers."""
    seeds = s.loc[(s["dataset"] != AVERAGE) & (s["shots"] > 0), "n"]
    n = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    spread = "bars" if s.loc[s["shots"] > 0, "shots"].nunique() == 1 else "band"
    text = f"mean over {n} seeds; {spread}: ±1 {STD_LABELS[std]} over seeds (Average: none)"
    text += "; methods side by side at each shot count"
    if s.loc[s["shots"] > 0, "partial"].astype(bool).any():
        text += "; open marker: Average over fewer datasets"
    return text


def plot_shots_curves(df: pd.DataFrame, backbone: str, std: str = "sample") -> Figure | None:
    """Figure 2 for one backbone: a panel per dataset (paper order) and an "Average" panel.

    Lines are seed-means over shots (log2 axis), bands ±1 std over seeds (`std`: "sample" or
    "population"; with one shot count, points with error bars), zero-shot methods horizontal lines,
    open markers Averages over fewer datasets; each method has its own marker and line style and is
    shifted slightly along x so that identical curves stay visible. None when nothing to plot.
    """
    s = summary(df, std=std)
    s = _drop_incomparable_zero_shot(s[s["backbone"] == backbone])
    if s.empty:
        return None
    datasets = order_datasets(s["dataset"]) + [AVERAGE]
    colors, styles = method_colors(s["method"]), method_styles(s["method"])
    single = s.loc[s["shots"] > 0, "shots"].nunique() == 1
    with rc_context(font_scale=0.9):
        fig, axes = _grid(len(datasets))
        for ax, dataset in zip(axes, datasets, strict=True):
            _panel(ax, s[s["dataset"] == dataset], dataset_label(dataset), colors, styles, single)
        shared_legend(fig, axes, ncols=6)
        fig.suptitle(f"Top-1 accuracy vs shots, {backbone}\n{caption(s, std)}", fontweight="normal", fontsize=9)
    return fig


def plot_average_curves(df: pd.DataFrame, backbones: list[str] | None = None, std: str = "sample") -> Figure | None:
    """The paper's last panels: Average over datasets vs shots, one panel per backbone.

    None unless at least two backbones have results.
    """
    s = _drop_incomparable_zero_shot(summary(df, std=std))
    s = s[s["dataset"] == AVERAGE]
    present = sorted(set(s["backbone"]))
    backbones = [b for b in (backbones or present) if b in present]
    if len(backbones) < 2:
        return None
    colors, styles = method_colors(s["method"]), method_styles(s["method"])
    single = s.loc[s["shots"] > 0, "shots"].nunique() == 1
    with rc_context(font_scale=0.9):
        fig, axes = _grid(len(backbones), width=min(7.0, 2.4 * len(backbones)), row_height=2.2)
        for ax, backbone in zip(axes, backbones, strict=True):
            _panel(ax, s[s["backbone"] == backbone], f"Average, {backbone}", colors, styles, single)
        shared_legend(fig, axes, ncols=4)
        if s["partial"].astype(bool).any():
            fig.suptitle("open marker: Average over fewer datasets", fontsize=8)
    return fig
