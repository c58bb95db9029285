"""Critical-difference diagram of average ranks (Demšar, JMLR 7 (2006), Figure 1 and §3.2.2).

An axis of average ranks (1 = best, on the left), one labelled elbow line per method, the Nemenyi
critical difference as a bar above the axis, and a thick bar joining each group of methods whose
ranks differ by less than the CD. The layout follows Orange 2's `graph_ranks`
(biolab/orange2, Orange/evaluation/scoring.py), which drew Demšar's figures; drawn here with
matplotlib's object-oriented API (never pyplot), so it renders headless.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from fsbench.report.stats import RankAnalysis
from fsbench.report.style import HIGHLIGHT, HIGHLIGHT_COLOR, method_label, rc_context

STEP = 0.32  # vertical distance between two method labels
BAR_STEP = 0.1  # vertical distance between two clique bars


def _axis(ax, k: int, cd: float) -> None:
    """The rank axis 1..k with ticks and the CD bar above its left end."""
    ax.plot([1, k], [0, 0], color="black", lw=1.0)
    for tick in np.arange(1, k + 0.01, 0.5):
        major = float(tick).is_integer()
        ax.plot([tick, tick], [0, 0.1 if major else 0.05], color="black", lw=0.8)
        if major:
            ax.text(tick, 0.16, f"{int(tick)}", ha="center", va="bottom", fontsize=8)
    ax.plot([1, 1 + cd], [0.62, 0.62], color="black", lw=1.2)
    for end in (1, 1 + cd):
        ax.plot([end, end], [0.57, 0.67], color="black", lw=1.2)
    ax.text(1 + cd / 2, 0.72, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=8)


def _method_lines(ax, analysis: RankAnalysis, top: float, lo: float, hi: float) -> None:
    """Elbow lines: the better half to the left edge, the worse half to the right edge."""
    names, ranks = list(analysis.ranks.index), analysis.ranks.to_numpy(dtype=float)
    half = (len(names) + 1) // 2
    for i, (name, rank) in enumerate(zip(names, ranks, strict=True)):
        left = i < half
        depth = i if left else len(names) - 1 - i  # the outermost method has the shortest line
        y = top - STEP * (depth + 1)
        edge = lo if left else hi
        color = HIGHLIGHT_COLOR if name == HIGHLIGHT else "black"
        ax.plot([rank, rank, edge], [0, y, y], color=color, lw=1.0)
        label = f"{method_label(name)} ({rank:.2f})" if left else f"({rank:.2f}) {method_label(name)}"
        ax.text(edge + (-0.05 if left else 0.05), y, label, ha="right" if left else "left", va="center",
                fontsize=8, color=color)


def plot_cd_diagram(analysis: RankAnalysis) -> Figure:
    """The critical-difference diagram of one (backbone, shots) block.

    Args:
        analysis: `fsbench.report.stats.rank_analysis(df, backbone, shots)`.
    Returns:
        A matplotlib Figure (caller saves it).
    """
    k, cd = len(analysis.ranks), analysis.cd
    span = k - 1
    lo, hi = 1 - 0.1 * span - 0.2, max(k + 0.1 * span + 0.2, 1 + cd)
    top = -0.12 - BAR_STEP * len(analysis.groups)
    height = 0.9 + STEP * ((k + 1) // 2 + 1) + BAR_STEP * len(analysis.groups)
    with rc_context():
        fig = Figure(figsize=(6.4, 0.9 * height + 0.6), layout="constrained")
        ax = fig.add_subplot()
        _axis(ax, k, cd)
        for j, group in enumerate(analysis.groups):
            first, last = analysis.ranks[group].min(), analysis.ranks[group].max()
            ax.plot([first - 0.03, last + 0.03], [-0.1 - BAR_STEP * j] * 2, color="0.2", lw=3.0,
                    solid_capstyle="round")
        _method_lines(ax, analysis, top, lo, hi)
        ax.set_xlim(lo, hi)
        ax.set_ylim(top - STEP * ((k + 1) // 2 + 0.7), 1.0)
        ax.axis("off")
        ax.set_title(_title(analysis), fontsize=9)
    return fig


def _title(analysis: RankAnalysis) -> str:
    unit = "shot" if analysis.shots == 1 else "shots"
    p = analysis.friedman.get("p_value", float("nan"))
    friedman = f"Friedman p = {p:.3g}" if p == p else "Friedman test needs 3+ methods"
    return (f"{analysis.backbone}, {analysis.shots} {unit}: average rank over {analysis.n_datasets} datasets\n"
            f"Nemenyi CD (α = {analysis.alpha:g}); {friedman}")
