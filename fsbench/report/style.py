"""Names, orders and plot styling shared by every table and figure of the report.

Datasets and methods are keyed by their fsbench registry names; this module maps them to the
labels and the order of Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language
Models" (CLIP-LoRA, CVPRW 2024, arXiv:2405.18541).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Column order and labels of the paper's tables.
DATASETS: dict[str, str] = {
    "imagenet": "ImageNet",
    "sun397": "SUN",
    "fgvc_aircraft": "Aircraft",
    "eurosat": "EuroSAT",
    "stanford_cars": "Cars",
    "food101": "Food",
    "oxford_pets": "Pets",
    "oxford_flowers": "Flowers",
    "caltech101": "Caltech",
    "dtd": "DTD",
    "ucf101": "UCF",
}
AVERAGE = "average"  # the pseudo-dataset key of the Average column

# Row order of the paper (zero-shot first, prompts, adapters, CLIP-LoRA last).
METHODS: dict[str, str] = {
    "zero_shot": "Zero-shot CLIP",
    "coop_4ctx": "CoOp (4)",
    "coop": "CoOp",
    "cocoop": "CoCoOp",
    "plot_pp": "PLOT++",
    "kgcoop": "KgCoOp",
    "maple": "MaPLe",
    "prograd": "ProGrad",
    "tip_adapter": "Tip-Adapter",
    "tip_adapter_f": "Tip-Adapter-F",
    "clip_adapter": "CLIP-Adapter",
    "taskres": "TaskRes",
    "lp_plus_plus": "LP++",
    "clap": "CLAP",
    "gda": "GDA",
    "prolip": "ProLIP",
    "lora": "CLIP-LoRA",
    "transclip": "TransCLIP",
}
HIGHLIGHT = "lora"  # drawn thicker, in its own colour, in figures
HIGHLIGHT_COLOR = "#b2182b"
SHOTS = (1, 2, 4, 8, 16)


def dataset_label(name: str) -> str:
    """Display name of a dataset: paper label for the 11 datasets, else the name itself."""
    if name == AVERAGE:
        return "Average"
    return DATASETS.get(name, name)


def method_label(name: str) -> str:
    """Display name of a method: paper label for known methods, else the name itself; a method with a
    transductive step names both parts ("CLIP-LoRA + TransCLIP")."""
    if name not in METHODS and "+" in name:
        return " + ".join(method_label(part) for part in name.split("+"))
    return METHODS.get(name, name)


def order_datasets(names: Iterable[str]) -> list[str]:
    """Paper order for the 11 datasets, then unknown ones (user data, "synthetic") sorted."""
    names = set(names) - {AVERAGE}
    known = [d for d in DATASETS if d in names]
    return known + sorted(names - set(DATASETS))


def order_methods(names: Iterable[str]) -> list[str]:
    """Paper order; unknown methods go (sorted) before CLIP-LoRA, which stays last."""
    names = set(names)
    known = [m for m in METHODS if m in names and m != HIGHLIGHT]
    tail = [HIGHLIGHT] if HIGHLIGHT in names else []
    return known + sorted(names - set(METHODS)) + tail


def method_colors(methods: Iterable[str]) -> dict[str, Any]:
    """A fixed colour per method so a method keeps its colour across figures."""
    import seaborn as sns

    others = [m for m in order_methods(methods) if m != HIGHLIGHT]
    base = [c for i, c in enumerate(sns.color_palette("colorblind")) if i != 3]  # 3: too close to red
    palette = base if len(others) <= len(base) else sns.color_palette("husl", len(others))
    colors = dict(zip(others, palette, strict=False))
    colors[HIGHLIGHT] = HIGHLIGHT_COLOR
    return colors


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p", "d", "H", "8")
LINESTYLES = ("-", "--", "-.", ":")


def method_styles(methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """A marker and a line style per method (paper order), so that two methods with identical numbers
    stay distinguishable where their colours and lines overlap; CLIP-LoRA keeps a solid line."""
    styles = {}
    for i, m in enumerate(order_methods(methods)):
        styles[m] = {"marker": MARKERS[i % len(MARKERS)],
                     "ls": "-" if m == HIGHLIGHT else LINESTYLES[(i // len(MARKERS) + i) % len(LINESTYLES)]}
    return styles


def rc(font_scale: float = 1.0) -> dict[str, Any]:
    """Matplotlib rc settings (seaborn "whitegrid" + "paper" context) for `plt.rc_context`.

    Used as a context so that importing or calling the report never changes a notebook's
    global style.
    """
    import seaborn as sns

    params: dict[str, Any] = dict(sns.axes_style("whitegrid"))
    params.update(sns.plotting_context("paper", font_scale=font_scale))
    params.update({"savefig.bbox": "tight", "savefig.dpi": 200, "pdf.fonttype": 42,
                   "axes.titleweight": "bold", "legend.frameon": False})
    return params


def rc_context(font_scale: float = 1.0):
    """`matplotlib.rc_context` with `rc()`: figures get the style, global state stays untouched."""
    import matplotlib as mpl

    return mpl.rc_context(rc(font_scale))


def shared_legend(fig, axes, ncols: int = 4) -> None:
    """One legend below the figure with the unique entries of all `axes` (never over the data).

    Entries read row by row in plotting order; the open-marker explanation comes last.
    """
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    if PARTIAL_LABEL in seen:
        seen[PARTIAL_LABEL] = seen.pop(PARTIAL_LABEL)
    if not seen:
        return
    labels, ncols = list(seen), min(ncols, len(seen))
    nrows = -(-len(labels) // ncols)
    # matplotlib fills legend columns first; reorder so that rows read in plotting order
    order = [r * ncols + c for c in range(ncols) for r in range(nrows) if r * ncols + c < len(labels)]
    fig.legend([seen[labels[i]] for i in order], [labels[i] for i in order], loc="outside lower center",
               ncols=ncols)


PARTIAL_LABEL = "open: partial Average"  # short, so the legend keeps its columns narrow


def mark_partial_legend(ax) -> None:
    """Add a legend-only entry explaining hollow markers (Averages over fewer datasets)."""
    ax.scatter([], [], s=30, facecolors="white", edgecolors="0.4", lw=1.2, label=PARTIAL_LABEL)
