"""Tables and figures of the CLIP-LoRA paper (arXiv:2405.18541) from the results store.

Every table and figure is a pure function of the frame `fsbench.results.load_results` returns,
so a notebook can restyle them; `write_report` does the I/O. Nothing here imports torch.

    >>> from fsbench.results import load_results
    >>> from fsbench.report import main_table, to_markdown, plot_shots_curves
    >>> df = load_results("results/runs")
    >>> print(to_markdown(main_table(df, "ViT-B/16", 4)))
"""

from fsbench.report.ablation import ablation_frame, ablation_summary, plot_ablation
from fsbench.report.cd_diagram import plot_cd_diagram
from fsbench.report.compare import compare_to_reference, delta_table, load_reference
from fsbench.report.cost import cost_table, pareto_front, plot_pareto
from fsbench.report.figures import plot_average_curves, plot_shots_curves
from fsbench.report.render import to_latex, to_markdown, to_rich
from fsbench.report.stats import (
    average_ranks,
    calibration_table,
    friedman,
    mean_ci,
    nemenyi_cd,
    paired_ci,
    paired_table,
    rank_analysis,
    seed_ci_table,
    wilcoxon_table,
)
from fsbench.report.tables import Cell, main_table, numeric, seed_stats, summary
from fsbench.report.write import FORMATS, write_report
from fsbench.results import load_results

__all__ = [
    "FORMATS",
    "Cell",
    "ablation_frame",
    "ablation_summary",
    "average_ranks",
    "calibration_table",
    "compare_to_reference",
    "cost_table",
    "delta_table",
    "friedman",
    "load_reference",
    "load_results",
    "main_table",
    "mean_ci",
    "nemenyi_cd",
    "numeric",
    "paired_ci",
    "paired_table",
    "pareto_front",
    "plot_ablation",
    "plot_average_curves",
    "plot_cd_diagram",
    "plot_pareto",
    "plot_shots_curves",
    "rank_analysis",
    "seed_ci_table",
    "seed_stats",
    "summary",
    "to_latex",
    "to_markdown",
    "to_rich",
    "wilcoxon_table",
    "write_report",
]
