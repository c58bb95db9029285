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
    mark_partial_legend,
    method_colors,
    method_label,
    order_datasets,
    order_methods,
    rc_context,
    shared_legend,
)
from fsbench.report.tables import summary


def _log2_axis(ax, shots: list[int]) -> None:
    """Shots on a log2 axis with plain integer ticks."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(shots) | {s for s in SHOTS if min(shots) <= s <= max(shots)})
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def _draw_method(ax, rows: pd.DataFrame, method: str, color) -> None:
    """One method in one panel: a line over shots (band = ±std), zero-shot as a dashed line."""
    label = method_label(method)
    for zero in rows[rows["shots"] == 0].itertuples(index=False):
        ax.axhline(zero.mean, color=color, ls="--", lw=1.0, label=label)
    few = rows[rows["shots"] > 0].sort_values("shots")
    if few.empty:
        return
    lw = 2.2 if method == HIGHLIGHT else 1.3
    ax.plot(few["shots"], few["mean"], color=color, lw=lw, marker="o", ms=3.5, label=label, zorder=3)
    std = few["std"].astype(float)
    if std.notna().any():
        ax.fill_between(few["shots"], few["mean"] - std.fillna(0), few["mean"] + std.fillna(0),
                        color=color, alpha=0.15, lw=0)
    partial = few[few["partial"].astype(bool)]
    if not partial.empty:  # hollow markers: Average over fewer datasets
        ax.scatter(partial["shots"], partial["mean"], s=30, facecolors="white", edgecolors=[color],
                   zorder=4, lw=1.2)


def _panel(ax, rows: pd.DataFrame, title: str, colors: dict) -> None:
    """One dataset (or Average) panel."""
    for method in order_methods(rows["method"]):
        _draw_method(ax, rows[rows["method"] == method], method, colors[method])
    if rows[rows["shots"] > 0]["partial"].astype(bool).any():
        mark_partial_legend(ax)
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


def plot_shots_curves(df: pd.DataFrame, backbone: str) -> Figure | None:
    """Figure 2 for one backbone: a panel per dataset (paper order) and an "Average" panel.

    Lines are seed-means over shots (log2 axis), bands ±1 sample std, zero-shot methods dashed
    horizontal lines, hollow markers Averages over fewer datasets. None when nothing to plot.
    """
    s = summary(df)
    s = _drop_incomparable_zero_shot(s[s["backbone"] == backbone])
    if s.empty:
        return None
    datasets = order_datasets(s["dataset"]) + [AVERAGE]
    colors = method_colors(s["method"])
    with rc_context(font_scale=0.9):
        fig, axes = _grid(len(datasets))
        for ax, dataset in zip(axes, datasets, strict=True):
            _panel(ax, s[s["dataset"] == dataset], dataset_label(dataset), colors)
        shared_legend(fig, axes, ncols=5)
        fig.suptitle(f"Top-1 accuracy vs shots, {backbone}", fontweight="bold")
    return fig


def plot_average_curves(df: pd.DataFrame, backbones: list[str] | None = None) -> Figure | None:
    """The paper's last panels: Average over datasets vs shots, one panel per backbone.

    None unless at least two backbones have results.
    """
    s = _drop_incomparable_zero_shot(summary(df))
    s = s[s["dataset"] == AVERAGE]
    present = sorted(set(s["backbone"]))
    backbones = [b for b in (backbones or present) if b in present]
    if len(backbones) < 2:
        return None
    colors = method_colors(s["method"])
    with rc_context(font_scale=0.9):
        fig, axes = _grid(len(backbones), width=min(7.0, 2.4 * len(backbones)), row_height=2.2)
        for ax, backbone in zip(axes, backbones, strict=True):
            _panel(ax, s[s["backbone"] == backbone], f"Average, {backbone}", colors)
        shared_legend(fig, axes, ncols=4)
    return fig
