"""The gain of a transductive step over the method it refines, paired by seed (issue 21).

Every result of `X+STEP` (`fsbench.transduction`) that used the unlabelled test set
(`extra.unlabelled_test_data == "transductive"`) is paired with X's result on the same backbone, dataset,
shots and seed: X under the same protocol when it ran there (the same episode: the same draw and test set),
else X under `fewshot` (the same draw, the inductive protocol). The table shows, per backbone, shots, method
and dataset, the mean ± sample std (ddof=1) of the paired differences top1(X+STEP) − top1(X), the number of
pairs, and the protocol X was taken from; "All" pools every pair of the block. Torch-free.
"""

from __future__ import annotations

import math

import pandas as pd

from fsbench.report.render import latex_escape
from fsbench.report.style import dataset_label, method_label

SEP = "+"
KEYS = ["backbone", "dataset", "shots", "seed"]
ALL = "All"
PAIR_COLUMNS = ["backbone", "shots", "method", "base", "dataset", "seed", "base_protocol", "top1", "base_top1", "gain"]
GAIN_COLUMNS = ["backbone", "shots", "method", "base", "dataset", "n", "gain_mean", "gain_std", "base_protocol"]


def _transductive(df: pd.DataFrame) -> pd.Series:
    """Rows of a composed method that saw the whole unlabelled test set."""
    extra = df["extra"] if "extra" in df.columns else pd.Series([{}] * len(df), index=df.index)
    used = extra.map(lambda e: isinstance(e, dict) and e.get("unlabelled_test_data") == "transductive")
    return df["method"].astype(str).str.contains(SEP, regex=False) & used.astype(bool)


def paired_gains(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (X+STEP result, X result) pair: both top-1s and their difference (`PAIR_COLUMNS`)."""
    if df.empty or "method" not in df.columns:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    ok = df[df["top1"].notna()] if "top1" in df.columns else df.iloc[0:0]
    protocol = ok["protocol"].fillna("fewshot") if "protocol" in ok.columns else pd.Series("fewshot", index=ok.index)
    ok = ok.assign(protocol=protocol)
    by_key = {(r["method"], r["protocol"], *(r[k] for k in KEYS)): float(r["top1"]) for _, r in ok.iterrows()}
    rows = []
    for _, r in ok[_transductive(ok)].iterrows():
        base = r["method"].rsplit(SEP, 1)[0]
        key = tuple(r[k] for k in KEYS)
        for where in (r["protocol"], "fewshot"):
            if (base, where, *key) in by_key:
                base_top1 = by_key[(base, where, *key)]
                rows.append({"backbone": r["backbone"], "shots": r["shots"], "method": r["method"], "base": base,
                             "dataset": r["dataset"], "seed": r["seed"], "base_protocol": where,
                             "top1": float(r["top1"]), "base_top1": base_top1, "gain": float(r["top1"]) - base_top1})
                break
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _summary_row(group: pd.DataFrame, dataset: str) -> dict:
    gains = group["gain"].astype(float)
    first = group.iloc[0]
    return {"backbone": first["backbone"], "shots": first["shots"], "method": first["method"], "base": first["base"],
            "dataset": dataset, "n": len(gains), "gain_mean": float(gains.mean()),
            "gain_std": float(gains.std(ddof=1)) if len(gains) > 1 else math.nan,
            "base_protocol": ", ".join(sorted(set(group["base_protocol"])))}


def gain_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, shots, method, dataset) and pooled ("All"): n pairs, mean and std of the gains."""
    pairs = paired_gains(df)
    rows = []
    for _, block in pairs.groupby(["backbone", "shots", "method"], sort=True):
        rows += [_summary_row(g, d) for d, g in block.groupby("dataset", sort=True)]
        rows.append(_summary_row(block, ALL))
    return pd.DataFrame(rows, columns=GAIN_COLUMNS)


def _cell(row) -> str:
    std = "" if math.isnan(row.gain_std) else f" ± {row.gain_std:.2f}"
    return f"{row.gain_mean:+.2f}{std} ({row.n})"


INTRO = ("Gain of the transductive step over the method alone, paired by seed: mean ± sample std (ddof=1) of "
         "top1(X+STEP) − top1(X) over the seeds (number of pairs). X is taken from the same protocol when it ran "
         "there (same episode), else from `fewshot` (same draw). A transductive result used the whole unlabelled "
         "test set: it is not comparable with the inductive few-shot tables.")


def gain_markdown(df: pd.DataFrame) -> str:
    """The section "Transductive gain" (empty when there is no pair)."""
    table = gain_table(df)
    if table.empty:
        return ""
    parts = ["## Transductive gain", "", INTRO, ""]
    for (backbone, shots), block in table.groupby(["backbone", "shots"], sort=True):
        parts += [f"### {backbone}, {shots} shot{'s' if shots != 1 else ''}", "",
                  "| Method | Dataset | Gain (pairs) | X from |", "|:---|:---|:---:|:---|"]
        for row in block.itertuples(index=False):
            label = ALL if row.dataset == ALL else dataset_label(row.dataset)
            parts.append(f"| {method_label(row.method)} | {label} | {_cell(row)} | {row.base_protocol} |")
        parts.append("")
    return "\n".join(parts)


def gain_latex(df: pd.DataFrame) -> str:
    """The gain table as booktabs tables, one per (backbone, shots) ("" without pairs)."""
    table = gain_table(df)
    out = []
    for (backbone, shots), block in table.groupby(["backbone", "shots"], sort=True):
        rows = [" & ".join([latex_escape(method_label(r.method)),
                            latex_escape(ALL if r.dataset == ALL else dataset_label(r.dataset)),
                            _cell(r).replace("±", r"$\pm$"), latex_escape(r.base_protocol)]) + r" \\"
                for r in block.itertuples(index=False)]
        out.append("\n".join([r"\begin{table}[t]", r"\centering",
                              rf"\caption{{Transductive gain, {latex_escape(str(backbone))}, {shots} shots "
                              r"(paired by seed)}", r"\begin{tabular}{llcl}", r"\toprule",
                              r"Method & Dataset & Gain (pairs) & X from \\", r"\midrule", *rows,
                              r"\bottomrule", r"\end{tabular}", r"\end{table}"]))
    return ("\n" + "\n".join(out)) if out else ""


def gain_csvs(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{"transductive_gain.csv": the summary, "transductive_pairs.csv": every pair} (empty without pairs)."""
    table = gain_table(df)
    return {} if table.empty else {"transductive_gain.csv": table, "transductive_pairs.csv": paired_gains(df)}
