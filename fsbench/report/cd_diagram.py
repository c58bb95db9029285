"""Critical-difference diagram of average ranks (Demšar, JMLR 7 (2006), Figure 1 and §3.2.2).

An axis of average ranks (1 = best, on the left), one labelled elbow line per method, the Nemenyi
critical difference as a bar above the axis, and a thick bar joining each group of methods whose
ranks differ by less than the CD. The layout follows Orange 2's `graph_ranks`
(biolab/orange2, Orange/evaluation/scoring.py), which drew Demšar's figures; drawn here with
matplotlib's object-oriented API (never pyplot), so it renders headless.
"""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib.figure import Figure

from fsbench.report.stats import RankAnalysis, left_out_lines
from fsbench.report.style import HIGHLIGHT, HIGHLIGHT_COLOR, method_label, rc_context

STEP = 0.32  # vertical distance between two method labels
BAR_STEP = 0.1  # vertical distance between two clique bars
LINE_COLORS = ("#1b1b1b", "#1f4e9c", "#2a7a3b", "#7b3294", "#8c510a", "#01665e", "#c51b7d", "#525252")


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


def fan_offsets(ranks: np.ndarray, k: int) -> np.ndarray:
    """x offsets that fan out the lines of tied (equal) ranks below the axis, so that each label can be
    followed to its own line; 0 for a rank no other method shares."""
    step = 0.025 * (k - 1) + 0.03
    out = np.zeros(len(ranks))
    for value in np.unique(ranks):
        tied = np.flatnonzero(np.isclose(ranks, value))
        out[tied] = step * (np.arange(len(tied)) - (len(tied) - 1) / 2)
    return out


def _method_lines(ax, analysis: RankAnalysis, top: float, lo: float, hi: float, offsets: np.ndarray) -> None:
    """Elbow lines: the better half to the left edge, the worse half to the right edge; each method in
    its own colour (label and line alike), tied ranks fanned out from their common point on the axis."""
    names, ranks = list(analysis.ranks.index), analysis.ranks.to_numpy(dtype=float)
    half = (len(names) + 1) // 2
    for i, (name, rank) in enumerate(zip(names, ranks, strict=True)):
        left = i < half
        depth = i if left else len(names) - 1 - i  # the outermost method has the shortest line
        y = top - STEP * (depth + 1)
        edge = lo if left else hi
        color = HIGHLIGHT_COLOR if name == HIGHLIGHT else LINE_COLORS[i % len(LINE_COLORS)]
        x = rank + offsets[i]
        ax.plot([rank, x, x, edge], [0, -0.06, y, y], color=color, lw=1.0)
        ax.plot([rank], [0], marker="o", ms=2.5, color=color)
        label = f"{method_label(name)} ({rank:.2f})" if left else f"({rank:.2f}) {method_label(name)}"
        ax.text(edge + (-0.05 if left else 0.05), y, label, ha="right" if left else "left", va="center",
                fontsize=8, color=color)


def _cliques(ax, analysis: RankAnalysis, offsets: np.ndarray) -> None:
    """A thick bar per group of methods not significantly different, spanning all its members' lines."""
    where = {m: analysis.ranks[m] + offsets[i] for i, m in enumerate(analysis.ranks.index)}
    for j, group in enumerate(analysis.groups):
        xs = [where[m] for m in group]
        ax.plot([min(xs) - 0.04, max(xs) + 0.04], [-0.1 - BAR_STEP * j] * 2, color="0.2", lw=3.0,
                solid_capstyle="round", alpha=0.8)


def plot_cd_diagram(analysis: RankAnalysis) -> Figure:
    """The critical-difference diagram of one (backbone, shots) block.

    Args:
        analysis: `fsbench.report.stats.rank_analysis(df, backbone, shots)`.
    Returns:
        A matplotlib Figure (caller saves it); its title names the methods and datasets left out.
    """
    k, cd = len(analysis.ranks), analysis.cd
    span = k - 1
    offsets = fan_offsets(analysis.ranks.to_numpy(dtype=float), k)
    lo = min(1 - 0.1 * span - 0.2, 1 + offsets.min() - 0.3)
    hi = max(k + 0.1 * span + 0.2, 1 + cd, k + offsets.max() + 0.3)
    top = -0.12 - BAR_STEP * len(analysis.groups)
    height = 0.9 + STEP * ((k + 1) // 2 + 1) + BAR_STEP * len(analysis.groups)
    with rc_context():
        fig = Figure(figsize=(6.4, 0.9 * height + 0.6), layout="constrained")
        ax = fig.add_subplot()
        _axis(ax, k, cd)
        _cliques(ax, analysis, offsets)
        _method_lines(ax, analysis, top, lo, hi, offsets)
        ax.set_xlim(lo, hi)
        ax.set_ylim(top - STEP * ((k + 1) // 2 + 0.7), 1.0)
        ax.axis("off")
        ax.set_title(_title(analysis), fontsize=8)
    return fig


def _title(analysis: RankAnalysis) -> str:
    unit = "shot" if analysis.shots == 1 else "shots"
    p = analysis.friedman.get("p_value", float("nan"))
    friedman = f"Friedman p = {p:.3g}" if p == p else f"Friedman test {analysis.friedman_reason()}"
    lines = [f"{analysis.backbone}, {analysis.shots} {unit}: average rank over {analysis.n_datasets} datasets",
             f"Nemenyi CD (α = {analysis.alpha:g}); {friedman}"]
    left = left_out_lines(analysis)
    if left:
        lines += textwrap.wrap("Left out: " + "; ".join(left), 100)
    return "\n".join(lines)
