"""Figure 3 of the CLIP-LoRA paper: 4-shot accuracy of LoRA variants.

(a) attention matrices × rank, (b) position of the LoRA modules, (c) adapted encoder(s).
Variants are recognised by their resolved config (keys `matrices`, `rank`, `position`,
`encoder`), whatever method label the ablation runner stored them under.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from fsbench.report.style import rc_context, shared_legend
from fsbench.report.tables import ABLATION_KEYS, clean, is_ablation_variant

PAPER_DEFAULTS = {"matrices": "qkv", "rank": 2, "position": "all", "encoder": "both"}
POSITIONS = ["bottom", "mid", "up", "half-up", "half-bottom", "all"]
ENCODERS = ["vision", "text", "both"]
PANELS = [("(a) Attention matrices", ("matrices", "rank")), ("(b) Position", ("position",)),
          ("(c) Encoder", ("encoder",))]


def matrices_key(value) -> str:
    """Canonical name of a set of attention matrices: ["v", "q"] -> "qv" (q, k, v, o order)."""
    letters = set(value if isinstance(value, list | tuple | set) else str(value))
    return "".join(c for c in "qkvo" if c in letters) + "".join(sorted(letters - set("qkvo")))


def ablation_frame(df: pd.DataFrame, shots: int = 4) -> pd.DataFrame:
    """One row per ablation run at `shots`: backbone, dataset, seed, top1 and the four fields."""
    ok = clean(df)
    columns = ["backbone", "dataset", "seed", "top1", *ABLATION_KEYS]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    ok = ok[(ok["shots"] == shots) & ok["config"].map(lambda c: isinstance(c, dict)
                                                       and all(k in c for k in ABLATION_KEYS))]
    variant = ok.apply(lambda r: is_ablation_variant(r["method"], r["config"], r["extra"]), axis=1)
    if len(ok) and variant.any():  # an ablation sweep exists: don't count plain `lora` runs twice
        ok = ok[variant.astype(bool)]
    rows = [{"backbone": r.backbone, "dataset": r.dataset, "seed": r.seed, "top1": r.top1,
             "matrices": matrices_key(r.config["matrices"]), "rank": int(r.config["rank"]),
             "position": str(r.config["position"]), "encoder": str(r.config["encoder"])}
            for r in ok.itertuples(index=False)]
    return pd.DataFrame(rows, columns=columns)


def _fixed(frame: pd.DataFrame, vary: tuple[str, ...]) -> dict:
    """Values of the fields a panel holds fixed: the paper's default when run, else the most common."""
    fixed = {}
    for key in ABLATION_KEYS:
        if key not in vary and not frame.empty:
            values = set(frame[key])
            fixed[key] = PAPER_DEFAULTS[key] if PAPER_DEFAULTS[key] in values else frame[key].mode()[0]
            frame = frame[frame[key] == fixed[key]]
    return fixed


def ablation_summary(frame: pd.DataFrame, vary: tuple[str, ...]) -> pd.DataFrame:
    """Mean over datasets (those every variant has) of per-dataset seed-means, per variant.

    Columns: the `vary` fields, top1, n_datasets; `attrs["fixed"]` holds the fixed fields.
    """
    fixed = _fixed(frame, vary)
    sub = frame
    for key, value in fixed.items():
        sub = sub[sub[key] == value]
    per_dataset = sub.groupby([*vary, "dataset"])["top1"].mean().reset_index()
    variants = per_dataset.groupby(list(vary)).ngroups
    counts = per_dataset.groupby("dataset")["top1"].size()
    common = counts[counts == variants].index
    if len(common):
        per_dataset = per_dataset[per_dataset["dataset"].isin(common)]
    out = per_dataset.groupby(list(vary)).agg(top1=("top1", "mean"), n_datasets=("dataset", "nunique"))
    out = out.reset_index()
    out.attrs["fixed"] = fixed
    return out


def _order(key: str, values) -> list:
    values = list(dict.fromkeys(values))
    if key == "matrices":
        return sorted(values, key=lambda m: (len(m), ["qkvo".find(c) for c in m]))
    known = {"position": POSITIONS, "encoder": ENCODERS}.get(key)
    if known:
        return [v for v in known if v in values] + sorted(v for v in values if v not in known)
    return sorted(values)


def _bars(ax, table: pd.DataFrame, vary: tuple[str, ...], title: str) -> None:
    """Grouped bars: x = first varied field, hue = second (rank) when there is one."""
    import seaborn as sns

    x_key, hue_key = vary[0], (vary[1] if len(vary) > 1 else None)
    xs = _order(x_key, table[x_key])
    hues = sorted(set(table[hue_key])) if hue_key else [None]
    palette = sns.color_palette("crest" if hue_key else "colorblind", max(len(hues), 1))
    width = 0.8 / len(hues)
    for j, hue in enumerate(hues):
        rows = table if hue is None else table[table[hue_key] == hue]
        values = rows.set_index(x_key)["top1"].reindex(xs)
        pos = [i - 0.4 + width * (j + 0.5) for i in range(len(xs))]
        bars = ax.bar(pos, values, width=width * 0.95, color=palette[j],
                      label=None if hue is None else f"rank {hue}")
        if hue is None:
            ax.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=1)
    ax.set_xticks(range(len(xs)), xs)
    if len(xs) > 4:
        ax.tick_params(axis="x", labelrotation=35)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    low, high = table["top1"].min(), table["top1"].max()
    ax.set_ylim(max(0, low - max(2.0, (high - low))), min(100, high + max(1.0, 0.25 * (high - low))))
    ax.set_title(f"{title}\n{_fixed_text(table)}", fontsize="small")


def _fixed_text(table: pd.DataFrame) -> str:
    """Compact description of what a panel holds fixed: "qkv, r=2, both; 4 datasets"."""
    short = {"matrices": "{}", "rank": "r={}", "position": "pos={}", "encoder": "enc={}"}
    parts = [short[k].format(v) for k, v in table.attrs.get("fixed", {}).items()]
    return ", ".join(parts) + f"; {int(table['n_datasets'].max())} datasets"


def plot_ablation(df: pd.DataFrame, backbone: str | None = None, shots: int = 4) -> Figure | None:
    """Figure 3 for one backbone (default: the one with most ablation runs).

    Panels with fewer than two variants are left out; None when no panel remains.
    """
    frame = ablation_frame(df, shots)
    if frame.empty:
        return None
    backbone = backbone or frame["backbone"].value_counts().index[0]
    frame = frame[frame["backbone"] == backbone]
    panels = [(title, vary, ablation_summary(frame, vary)) for title, vary in PANELS]
    panels = [p for p in panels if len(p[2]) >= 2]
    if not panels:
        return None
    with rc_context(font_scale=0.9):
        widths = [max(1.0, len(set(t[v[0]])) / 3) for _, v, t in panels]
        fig = Figure(figsize=(min(7.0, 2.6 * sum(widths) + 0.5), 2.9), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
        for ax, (title, vary, table) in zip(axes, panels, strict=True):
            _bars(ax, table, vary, title)
        axes[0].set_ylabel(f"Top-1 (%), {shots} shots")
        shared_legend(fig, axes, ncols=6)
        fig.suptitle(f"LoRA ablations, {backbone} (mean over datasets)", fontweight="bold")
    return fig


# ---- "LoRA variants": CLIP-LoRA beside its relatives and the full-weight alternatives (issue 22) -------

LORA_VARIANTS = ("lora", "peft", "lora_dora", "lora_pissa", "lora_vera", "clip_svd", "clipfit", "two_stage")


def lora_variants_table(df: pd.DataFrame, backbone: str) -> pd.DataFrame:
    """Rows: the LoRA-family methods with results on `backbone`; columns: per shot count the mean over the
    datasets every listed method has of per-dataset seed means, and the trainable parameters (median).
    Empty when fewer than two of them ran."""
    ok = clean(df)
    ok = ok[(ok["backbone"] == backbone) & ok["method"].isin(LORA_VARIANTS)] if not ok.empty else ok
    if ok.empty or ok["method"].nunique() < 2:
        return pd.DataFrame()
    per_dataset = ok.groupby(["method", "shots", "dataset"])["top1"].mean().reset_index()
    methods = per_dataset["method"].nunique()
    cells = []
    for shots, block in per_dataset.groupby("shots"):
        counts = block.groupby("dataset")["method"].nunique()
        common = counts[counts == methods].index
        means = block[block["dataset"].isin(common)].groupby("method")["top1"].mean()
        cells.append(means.rename(f"{shots}-shot ({len(common)} datasets)"))
    table = pd.concat(cells, axis=1)
    params = pd.to_numeric(ok["trainable_params"], errors="coerce").groupby(ok["method"]).median()
    table["trainable params"] = params.reindex(table.index)
    order = [m for m in LORA_VARIANTS if m in table.index]
    return table.loc[order].rename_axis("method").reset_index()


def lora_variants_markdown(df: pd.DataFrame) -> str:
    """The report's "LoRA variants" section: one `lora_variants_table` per backbone ("" when none)."""
    parts = []
    for backbone in sorted(set(clean(df)["backbone"])) if not df.empty else []:
        table = lora_variants_table(df, backbone)
        if table.empty:
            continue
        head = list(table.columns)
        rows = [" | ".join(head), " | ".join("---" for _ in head)]
        for r in table.itertuples(index=False):
            cells = [r[0], *("–" if pd.isna(v) else f"{v:.1f}" for v in r[1:-1]),
                     "–" if pd.isna(r[-1]) else f"{int(r[-1]):,}"]
            rows.append(" | ".join(str(c) for c in cells))
        parts += [f"### {backbone}", "", *[f"| {row} |" for row in rows], ""]
    if not parts:
        return ""
    return "\n".join(["## LoRA variants", "", "Top-1 (%): mean over the datasets every listed method has, of "
                      "per-dataset seed means; CLIP-LoRA (`lora`) beside its relatives.", "", *parts])
