"""Reproduced numbers against published ones: by default every number of the CLIP-LoRA paper
(Zanella & Ben Ayed, arXiv:2405.18541v2), as shipped in results/reference/ (its README gives the
provenance): the top-1 cells of Tables 2-5, Figure 3's ablation cells and Table 1's training times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fsbench.errors import ConfigError
from fsbench.report.ablation import PAPER_DEFAULTS, ablation_frame
from fsbench.report.cost import paper_cost_markdown, paper_cost_table
from fsbench.report.protocols import protocol_summary
from fsbench.report.style import AVERAGE, dataset_label, order_datasets, order_methods
from fsbench.report.tables import fewshot_rows, summary

REFERENCE_COLUMNS = ["source", "table", "backbone", "method", "dataset", "shots", "top1"]
FIGURE3_COLUMNS = ["source", "figure", "backbone", "dataset", "shots", "encoder", "position", "matrices",
                   "rank", "top1"]
TIMES_COLUMNS = ["source", "table", "backbone", "method", "dataset", "shots", "training_time"]
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "results" / "reference"
PAPER = REFERENCE_DIR / "clip_lora_paper_top1.csv"
PAPER_FIGURE3 = REFERENCE_DIR / "clip_lora_paper_fig3.csv"
PAPER_TIMES = REFERENCE_DIR / "clip_lora_paper_training_time.csv"
PAPER_BACKBONES = {"vitb16": "ViT-B/16", "vitb32": "ViT-B/32", "vitl14": "ViT-L/14"}
NOT_STATED = "(not stated)"
# Figure 3's spelling -> fsbench's LoRA config values (fsbench.report.ablation.matrices_key order)
FIGURE3_ENCODERS = {"vision": "vision", "text": "text", "vision+text": "both"}
FIGURE3_MATRICES = {"Wq": "q", "Wk": "k", "Wv": "v", "Wo": "o", "WqWv": "qv", "WqWvWk": "qkv",
                    "WqWvWkWo": "qkvo"}
B2N_COLUMNS = ["backbone", "shots", "method", "dataset", "metric", "mean", "n", "reference", "delta", "source",
               "table"]
COMPARISON_COLUMNS = ["backbone", "shots", "method", "dataset", "mean", "n", "reference", "delta",
                      "source", "table"]
ABLATION_COLUMNS = ["backbone", "dataset", "shots", "variant", "matrices", "rank", "position", "encoder",
                    "mean", "n", "reference", "delta", "figure", "assumed"]


def backbone_key(name: str) -> str:
    """Spelling-insensitive backbone key: "ViT-B/16", "ViT-B-16", "vit_b16" and open_clip's
    "ViT-B-16-quickgelu" all give "vitb16"."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower()).removesuffix("quickgelu")


def paper_backbone(name: str) -> str | None:
    """The paper's name for an fsbench backbone ("ViT-B-16" -> "ViT-B/16"); None for others."""
    return PAPER_BACKBONES.get(backbone_key(name))


def _read(path: Path, columns: list[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"{what} file {path} not found (it ships in results/reference/ of the repo)")
    frame = pd.read_csv(path, dtype={"rank": str})
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise ConfigError(f"{what} file {path} lacks columns {absent}; expected {columns}")
    return frame


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """Read a top-1 reference file in long format (columns `REFERENCE_COLUMNS`); default: the
    paper's 2,016 cells (Tables 2-5)."""
    ref = _read(Path(path) if path is not None else PAPER, REFERENCE_COLUMNS, "reference")
    return ref.astype({"shots": int, "top1": float})


def compare_to_reference(df: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """Per reproduced cell that has a published number: delta = reproduced mean − published.

    Matches on (backbone, method, dataset, shots); backbones match spelling-insensitively
    (`backbone_key`), and reference rows with dataset "average" compare with complete Averages
    only. Only few-shot-protocol results take part (the paper's protocol).
    Columns: backbone (fsbench's name), shots, method, dataset, mean, n, reference, delta, source, table.
    """
    ours = summary(fewshot_rows(df))
    ours = ours[~ours["partial"]]
    ref = fewshot_reference(ref)
    if ours.empty or ref.empty:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    ref = ref.assign(_bb=ref["backbone"].map(backbone_key)).rename(columns={"top1": "reference"})
    ours = ours.assign(_bb=ours["backbone"].map(backbone_key))
    ours = ours[_same_datasets(ours, ref)]
    keys = ["_bb", "method", "dataset", "shots"]
    merged = ours.merge(ref[keys + ["reference", "source", "table"]], on=keys, how="inner")
    merged["delta"] = merged["mean"] - merged["reference"]
    return merged[COMPARISON_COLUMNS].sort_values(["backbone", "shots", "method", "dataset"], ignore_index=True)


def fewshot_reference(ref: pd.DataFrame) -> pd.DataFrame:
    """The few-shot rows of a reference: all of them without a `protocol` column, else those whose
    protocol is empty or "fewshot" (rows of "base2new" compare through `compare_base2new`)."""
    if "protocol" not in ref.columns:
        return ref
    return ref[ref["protocol"].fillna("fewshot").isin(["fewshot", ""])]


def compare_base2new(others: pd.DataFrame, ref: pd.DataFrame | None) -> pd.DataFrame:
    """Base-to-new cells against reference rows with `protocol` "base2new" (their `metric` is base, new
    or hm; `top1` holds its accuracy in %): delta = reproduced mean − published, complete cells only;
    an Average compares with a reference Average as in `compare_to_reference`. Columns: B2N_COLUMNS."""
    if ref is None or "protocol" not in ref.columns or others.empty:
        return pd.DataFrame(columns=B2N_COLUMNS)
    ref = ref[ref["protocol"] == "base2new"]
    ours = protocol_summary(others, "base2new")
    if ref.empty or ours.empty:
        return pd.DataFrame(columns=B2N_COLUMNS)
    ours = ours[~ours["partial"]].drop(columns="source").assign(_bb=lambda f: f["backbone"].map(backbone_key))
    ref = ref.assign(_bb=ref["backbone"].map(backbone_key)).rename(columns={"top1": "reference"})
    keys = ["_bb", "method", "dataset", "shots", "metric"]
    merged = ours.merge(ref[keys + ["reference", "source", "table"]], on=keys, how="inner")
    merged["delta"] = merged["mean"] - merged["reference"]
    return merged[B2N_COLUMNS].sort_values(["backbone", "shots", "method", "dataset", "metric"], ignore_index=True)


def base2new_markdown(others: pd.DataFrame, ref: pd.DataFrame | None, decimals: int = 2) -> str:
    """The report's "Δ vs published, base-to-new" section ("" when no cell compares)."""
    cmp = compare_base2new(others, ref)
    if cmp.empty:
        return ""
    lines = ["## Δ vs published, base-to-new (reproduced mean − published)", "",
             "| backbone | shots | method | dataset | metric | reproduced | published | Δ | source |",
             "|:---|---:|:---|:---|:---|---:|---:|---:|:---|"]
    for r in cmp.itertuples(index=False):
        lines.append(f"| {r.backbone} | {r.shots} | {r.method} | {dataset_label(r.dataset)} | {r.metric} | "
                     f"{r.mean:.{decimals}f} | {r.reference:.{decimals}f} | {signed(r.delta, decimals)} | "
                     f"{r.source}, {r.table} |")
    return "\n".join(lines + [""])


def _same_datasets(ours: pd.DataFrame, ref: pd.DataFrame) -> pd.Series:
    """False for an Average over other datasets than the reference's Average (e.g. 1 of the paper's
    11); where the reference lists no datasets for that Average, any complete Average compares."""
    keys = ["_bb", "method", "shots"]

    def sets(frame: pd.DataFrame) -> dict:
        cells = frame[frame["dataset"] != AVERAGE]
        return cells.groupby(keys)["dataset"].agg(frozenset).to_dict()

    theirs, mine = sets(ref), sets(ours)
    keep = [d != AVERAGE or k not in theirs or mine.get(k) == theirs[k]
            for k, d in zip(ours[keys].itertuples(index=False, name=None), ours["dataset"], strict=True)]
    return pd.Series(keep, index=ours.index, dtype=bool)


def coverage_note(comparison: pd.DataFrame, ref: pd.DataFrame) -> str:
    """"312 of the 2,016 published cells have a reproduced number (mean |Δ| 0.8)"."""
    n = len(comparison)
    text = f"{n:,} of the {len(ref):,} published cells have a reproduced number"
    return text + (f" (mean |Δ| {comparison['delta'].abs().mean():.1f})." if n else ".")


def delta_table(comparison: pd.DataFrame, backbone: str, shots: int) -> pd.DataFrame:
    """Wide view of one block: methods × datasets (+ average), cells = delta (NaN: no reference)."""
    block = comparison[(comparison["backbone"] == backbone) & (comparison["shots"] == shots)]
    if block.empty:
        return pd.DataFrame()
    wide = block.pivot_table(index="method", columns="dataset", values="delta", aggfunc="first")
    columns = order_datasets(wide.columns) + ([AVERAGE] if AVERAGE in wide.columns else [])
    return wide.reindex(index=order_methods(wide.index), columns=columns)


def signed(value: float, decimals: int = 1) -> str:
    """"+0.4", "−1.2" (a true minus sign); "–" for NaN."""
    return "–" if pd.isna(value) else f"{value:+.{decimals}f}".replace("-", "−")


def delta_markdown(wide: pd.DataFrame, decimals: int = 1) -> str:
    """Markdown of a `delta_table`: signed deltas ("+0.4", "−1.2"), "–" where no reference."""
    from fsbench.report.style import method_label

    header = ["Δ paper"] + [dataset_label(d) for d in wide.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + [":---:"] * len(wide.columns)) + "|"]
    for method, row in wide.iterrows():
        lines.append("| " + " | ".join([method_label(method)] + [signed(v, decimals) for v in row]) + " |")
    return "\n".join(lines) + "\n"


def load_figure3(path: str | Path | None = None) -> pd.DataFrame:
    """Figure 3's cells in fsbench's terms: matrices "qkv", rank int, encoder "both", ...

    The bars' matrices and rank are "(not stated)" in the paper; they get the paper's defaults
    (qkv, rank 2; see results/reference/README.md) and `assumed` = True.
    """
    raw = _read(Path(path) if path is not None else PAPER_FIGURE3, FIGURE3_COLUMNS, "Figure 3 reference")
    unknown = sorted(set(raw["encoder"]) - set(FIGURE3_ENCODERS)) + sorted(
        set(raw["matrices"]) - set(FIGURE3_MATRICES) - {NOT_STATED})
    if unknown:
        raise ConfigError(f"Figure 3 reference has unknown encoder/matrices {unknown}")
    assumed = (raw["matrices"] == NOT_STATED) | (raw["rank"] == NOT_STATED)
    matrices = raw["matrices"].map(FIGURE3_MATRICES).where(~assumed, PAPER_DEFAULTS["matrices"])
    rank = raw["rank"].where(~assumed, str(PAPER_DEFAULTS["rank"])).astype(int)
    return pd.DataFrame({"backbone": raw["backbone"], "dataset": raw["dataset"], "shots": raw["shots"].astype(int),
                         "matrices": matrices, "rank": rank, "position": raw["position"],
                         "encoder": raw["encoder"].map(FIGURE3_ENCODERS), "reference": raw["top1"].astype(float),
                         "figure": raw["figure"], "assumed": assumed})


def variant_name(matrices: str, rank: int, position: str, encoder: str, method: str = "lora") -> str:
    """The sweep's label of a variant, "lora@qv-r4-all-both" (`fsbench.sweep.plan.variant_label`,
    not imported here: the report never imports torch)."""
    return f"{method}@{matrices}-r{rank}-{position}-{encoder}"


def ablation_comparison(df: pd.DataFrame, figure3: pd.DataFrame) -> pd.DataFrame:
    """Per reproduced LoRA variant with a Figure 3 number: delta = reproduced mean − published.

    Variants are recognised by their config (`fsbench.report.ablation.ablation_frame`), at the
    shot counts Figure 3 has (4), on few-shot-protocol runs. A variant that is both a heat-map
    cell and a bar (the default, position "all") gets one row per figure panel.
    Columns: `ABLATION_COLUMNS`.
    """
    rows = []
    for shots in sorted(set(figure3["shots"])):
        frame = ablation_frame(fewshot_rows(df), shots)
        if frame.empty:
            continue
        keys = ["backbone", "dataset", "matrices", "rank", "position", "encoder"]
        ours = frame.groupby(keys)["top1"].agg(mean="mean", n="count").reset_index().assign(shots=shots)
        rows.append(ours)
    if not rows or figure3.empty:
        return pd.DataFrame(columns=ABLATION_COLUMNS)
    ours = pd.concat(rows, ignore_index=True)
    ours["_bb"] = ours["backbone"].map(backbone_key)
    ref = figure3.assign(_bb=figure3["backbone"].map(backbone_key)).drop(columns="backbone")
    merged = ours.merge(ref, on=["_bb", "dataset", "shots", "matrices", "rank", "position", "encoder"])
    merged["delta"] = merged["mean"] - merged["reference"]
    merged["variant"] = [variant_name(*v) for v in merged[["matrices", "rank", "position", "encoder"]].itertuples(
        index=False)]
    return merged[ABLATION_COLUMNS].sort_values(["backbone", "figure", "variant", "dataset"], ignore_index=True)


def ablation_markdown(comparison: pd.DataFrame, decimals: int = 1) -> str:
    """Markdown, one table per backbone: variant rows, dataset columns, cells "71.2 (−0.3)"."""
    lines: list[str] = []
    for backbone, block in comparison.groupby("backbone", sort=True):
        datasets = order_datasets(block["dataset"])
        lines += [f"**{backbone}**, reproduced mean (Δ vs Figure 3):", "",
                  "| Variant | Panel | " + " | ".join(dataset_label(d) for d in datasets) + " |",
                  "|:---|:---|" + ":---:|" * len(datasets)]
        for (variant, figure), rows in block.groupby(["variant", "figure"], sort=True):
            cells = rows.set_index("dataset")
            text = [f"{cells.at[d, 'mean']:.{decimals}f} ({signed(cells.at[d, 'delta'], decimals)})"
                    if d in cells.index else "–" for d in datasets]
            mark = "*" if rows["assumed"].any() else ""
            panel = "bars" if "bar" in str(figure) else "heat map"
            lines.append(f"| {variant}{mark} | {panel} | " + " | ".join(text) + " |")
        lines.append("")
    if comparison["assumed"].any():
        lines += ["\\* Figure 3's bars do not state their matrices and rank; they are matched with the "
                  "paper's default (q, k, v, rank 2).", ""]
    return "\n".join(lines)


def parse_duration(text: str) -> float:
    """Seconds in a time as Table 1 prints it: "2h", "15h30", "3h20", "50 min."."""
    match = re.fullmatch(r"\s*(?:(\d+)\s*h\s*(\d+)?)?\s*(?:(\d+)\s*min\.?)?\s*", str(text))
    if not match or not any(match.groups()):
        raise ConfigError(f"cannot read training time {text!r}; expected e.g. '2h', '15h30' or '50 min.'")
    hours, minutes, only_minutes = (int(g) if g else 0 for g in match.groups())
    return 3600.0 * hours + 60.0 * (minutes + only_minutes)


def load_training_times(path: str | Path | None = None) -> pd.DataFrame:
    """Table 1 (training time, 16-shot ImageNet, one A100): the columns of `TIMES_COLUMNS` plus
    `paper_seconds`."""
    times = _read(Path(path) if path is not None else PAPER_TIMES, TIMES_COLUMNS, "training-time reference")
    return times.assign(shots=times["shots"].astype(int), paper_seconds=times["training_time"].map(parse_duration))


@dataclass
class PaperSections:
    """What `--compare paper` adds beside the main-table deltas (Markdown and CSV frames)."""

    main: str = ""  # coverage of the 2,016 cells and Figure 3's deltas: after the main tables
    cost: str = ""  # Table 1 beside fsbench's training times: in the cost section
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)


def paper_sections(df: pd.DataFrame, comparison: pd.DataFrame, ref: pd.DataFrame) -> PaperSections:
    """Coverage line, Figure 3 deltas and Table 1 times for the report (the shipped paper files)."""
    ablation = ablation_comparison(df, load_figure3())
    times = paper_cost_table(df[df["backbone"].map(paper_backbone).notna()], load_training_times())
    main = ["## Δ vs the CLIP-LoRA paper", "", coverage_note(comparison, ref), ""]
    if ablation.empty:
        main += ["No reproduced 4-shot LoRA variant matches a Figure 3 cell.", ""]
    else:
        main += ["### Figure 3 (LoRA ablations, 4 shots)", "", ablation_markdown(ablation)]
    return PaperSections("\n".join(main), paper_cost_markdown(times),
                         {"compare_paper_figure3.csv": ablation, "cost_paper_table1.csv": times})
