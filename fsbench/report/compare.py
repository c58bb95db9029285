"""Reproduced numbers against published ones (by default the CLIP-LoRA paper's, see
results/reference/README.md for exactly which numbers ship and where they were read)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from fsbench.errors import ConfigError
from fsbench.report.style import AVERAGE, order_datasets, order_methods
from fsbench.report.tables import summary

REFERENCE_COLUMNS = ["source", "table", "backbone", "method", "dataset", "shots", "top1"]
PAPER = Path(__file__).resolve().parents[2] / "results" / "reference" / "clip_lora_paper.csv"


def backbone_key(name: str) -> str:
    """Spelling-insensitive backbone key: "ViT-B/16", "ViT-B-16" and "vit_b16" match."""
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


def load_reference(path: str | Path | None = None) -> pd.DataFrame:
    """Read a reference file in long format (columns `REFERENCE_COLUMNS`); default: the paper's."""
    path = Path(path) if path is not None else PAPER
    if not path.is_file():
        raise ConfigError(f"reference file {path} not found (it ships in results/reference/ of the repo)")
    ref = pd.read_csv(path)
    absent = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
    if absent:
        raise ConfigError(f"reference file {path} lacks columns {absent}; expected {REFERENCE_COLUMNS}")
    return ref.astype({"shots": int, "top1": float})


def compare_to_reference(df: pd.DataFrame, ref: pd.DataFrame) -> pd.DataFrame:
    """Per reproduced cell that has a published number: delta = reproduced mean − published.

    Matches on (backbone, method, dataset, shots); backbones match spelling-insensitively, and
    reference rows with dataset "average" compare with complete Averages only.
    Columns: backbone, shots, method, dataset, mean, n, reference, delta, source, table.
    """
    ours = summary(df)
    ours = ours[~ours["partial"]]
    if ours.empty or ref.empty:
        return pd.DataFrame(columns=["backbone", "shots", "method", "dataset", "mean", "n",
                                     "reference", "delta", "source", "table"])
    ref = ref.assign(_bb=ref["backbone"].map(backbone_key)).rename(columns={"top1": "reference"})
    ours = ours.assign(_bb=ours["backbone"].map(backbone_key))
    keys = ["_bb", "method", "dataset", "shots"]
    merged = ours.merge(ref[keys + ["reference", "source", "table"]], on=keys, how="inner")
    merged["delta"] = merged["mean"] - merged["reference"]
    merged = merged[["backbone", "shots", "method", "dataset", "mean", "n", "reference", "delta",
                     "source", "table"]]
    return merged.sort_values(["backbone", "shots", "method", "dataset"], ignore_index=True)


def delta_table(comparison: pd.DataFrame, backbone: str, shots: int) -> pd.DataFrame:
    """Wide view of one block: methods × datasets (+ average), cells = delta (NaN: no reference)."""
    block = comparison[(comparison["backbone"] == backbone) & (comparison["shots"] == shots)]
    if block.empty:
        return pd.DataFrame()
    wide = block.pivot_table(index="method", columns="dataset", values="delta", aggfunc="first")
    columns = order_datasets(wide.columns) + ([AVERAGE] if AVERAGE in wide.columns else [])
    return wide.reindex(index=order_methods(wide.index), columns=columns)


def delta_markdown(wide: pd.DataFrame, decimals: int = 1) -> str:
    """Markdown of a `delta_table`: signed deltas ("+0.4", "−1.2"), "–" where no reference."""
    from fsbench.report.style import dataset_label, method_label

    header = ["Δ paper"] + [dataset_label(d) for d in wide.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + [":---:"] * len(wide.columns)) + "|"]
    for method, row in wide.iterrows():
        cells = ["–" if pd.isna(v) else f"{v:+.{decimals}f}".replace("-", "−") for v in row]
        lines.append("| " + " | ".join([method_label(method)] + cells) + " |")
    return "\n".join(lines) + "\n"
