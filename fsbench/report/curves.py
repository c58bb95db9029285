"""Training curves in the report: loss (and validation accuracy) of every trained run, per dataset and
method with seeds overlaid, and the runs whose loss ended higher than it started or went non-finite
(`fsbench.curves.curve_problems`). Pure functions of the results frame; nothing here imports torch."""

from __future__ import annotations

import math

import pandas as pd
from matplotlib.figure import Figure

from fsbench.curves import curve_problems
from fsbench.report.style import dataset_label, method_label, order_datasets, order_methods, rc_context
from fsbench.report.tables import KEYS, main_runs

FLAG_COLUMNS = KEYS + ["seed", "problem"]


def curve_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The counted runs (`main_runs`) that recorded a training curve: KEYS + seed + curves."""
    runs = main_runs(df)
    if runs.empty or "curves" not in runs.columns:
        return pd.DataFrame(columns=KEYS + ["seed", "curves"])
    has = runs["curves"].map(lambda c: isinstance(c, dict) and bool(c))
    return runs.loc[has, KEYS + ["seed", "curves"]].reset_index(drop=True)


def curve_flags(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, problem) of `curve_problems`: what report.md lists under "Training curves"."""
    rows = [dict(zip(KEYS + ["seed"], (r.backbone, r.shots, r.method, r.dataset, r.seed), strict=True))
            | {"problem": p} for r in curve_runs(df).itertuples(index=False) for p in curve_problems(r.curves)]
    return pd.DataFrame(rows, columns=FLAG_COLUMNS)


def _draw_run(ax, twin, curves: dict, color, label: str) -> None:
    """One seed: its phases end to end (dotted separators), loss solid, validation accuracy dashed (%)."""
    offset = 0
    for i, c in enumerate(curves.values()):
        steps = [offset + s for s in c["step"]]
        ax.plot(steps, [math.nan if v is None else v for v in c["loss"]], color=color, lw=1.0,
                label=label if i == 0 else None)
        if c.get("val_acc"):
            twin.plot([offset + s for s in c["val_step"]], [100 * a for a in c["val_acc"]], color=color, lw=0.9,
                      ls="--", marker=".", ms=2)
        if i:
            ax.axvline(offset, color="0.6", lw=0.6, ls=":")
        offset += c["steps"]


def plot_training_curves(df: pd.DataFrame, backbone: str, shots: int, dataset: str) -> Figure | None:
    """Loss vs update per method (one panel each, paper order) for one (backbone, shots, dataset), one
    colour per seed; validation accuracy (%, right axis, dashed) where the method selects on it; the
    title of a panel with a flagged run says so. None when no run there recorded a curve."""
    runs = curve_runs(df)
    runs = runs[(runs["backbone"] == backbone) & (runs["shots"] == shots) & (runs["dataset"] == dataset)]
    if runs.empty:
        return None
    methods = order_methods(runs["method"])
    ncols = min(4, len(methods))
    nrows = -(-len(methods) // ncols)
    with rc_context(font_scale=0.8):
        fig = Figure(figsize=(2.2 * ncols + 0.6, 1.9 * nrows + 0.8), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).flat
        palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
        for ax, method in zip(axes, methods, strict=False):
            sub = runs[runs["method"] == method].sort_values("seed")
            twin = ax.twinx() if any(c.get("val_acc") for cs in sub["curves"] for c in cs.values()) else ax
            flagged = False
            for i, r in enumerate(sub.itertuples(index=False)):
                _draw_run(ax, twin, r.curves, palette[i % len(palette)], f"seed {r.seed}")
                flagged |= bool(curve_problems(r.curves))
            ax.set_title(method_label(method) + (" (flagged)" if flagged else ""), color="#b2182b" if flagged else "k")
            ax.set(xlabel="update", ylabel="loss")
            if twin is not ax:
                twin.set_ylabel("val. top-1 (%)")
                twin.grid(False)
            ax.legend(fontsize=6, loc="upper right")
        for ax in list(axes)[len(methods):]:
            ax.set_visible(False)
        fig.suptitle(f"Training curves, {backbone}, {dataset_label(dataset)}, {shots} shots "
                     "(loss solid; validation accuracy dashed; phases separated by dotted lines)", fontsize=8)
    return fig


def curve_cells(df: pd.DataFrame) -> list[tuple[str, int, str]]:
    """(backbone, shots, dataset) cells with at least one curve, in report order."""
    runs = curve_runs(df)
    cells = {(r.backbone, int(r.shots), r.dataset) for r in runs.itertuples(index=False)}
    rank = {d: i for i, d in enumerate(order_datasets(runs["dataset"]))}
    return sorted(cells, key=lambda c: (c[0], c[1], rank[c[2]]))


def curves_markdown(df: pd.DataFrame) -> str:
    """The "Training curves" section: how many runs recorded one and the flagged runs, one line each."""
    runs, flags = curve_runs(df), curve_flags(df)
    if runs.empty:
        return ""
    parts = ["## Training curves", "",
             f"{len(runs)} runs recorded their training curve (loss and learning rate per update, validation "
             "accuracy where the method selects on it; at most 256 points per phase). Flagged: loss ended "
             "higher than it started (mean of the last tenth of the curve above the first tenth) or went "
             "non-finite.", ""]
    if flags.empty:
        return "\n".join(parts + ["No run flagged.", ""])
    parts += ["| Backbone | Shots | Method | Dataset | Seed | Problem |", "|:---|---:|:---|:---|---:|:---|"]
    parts += [f"| {r.backbone} | {r.shots} | {method_label(r.method)} | {dataset_label(r.dataset)} | {r.seed} | "
              f"{r.problem} |" for r in flags.itertuples(index=False)]
    return "\n".join(parts + [""])
