"""The paper's main table as pure functions of the results frame (`fsbench.load_results`).

Conventions, used by every renderer:
- a cell is the mean and the standard deviation of top-1 over seeds, with the number of seeds; the
  std is the *sample* std (ddof=1, pandas' default) unless `std="population"` (ddof=0, what the
  CoOp and MaPLe log parsers print); one seed has no std; every table says which (`STD_LABELS`);
- a run with status "ok" but no top-1 (NaN or null) is not averaged; its cell's count reads
  "(2 of 3)" (`n` of `n_runs`) and `missing_top1` lists such runs for a warning;
- Average = mean over the table's datasets of the per-dataset seed-means; when a method lacks
  some of the datasets that the (backbone, shots) block holds, its Average is over fewer datasets
  and is flagged `partial`;
- "best" is decided on the displayed (rounded) mean, so displayed ties are all bold; in the
  Average column only complete averages compete (unless no method has one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fsbench.report.style import AVERAGE, METHODS, order_datasets, order_methods

KEYS = ["backbone", "shots", "method", "dataset"]
ABLATION_KEYS = ("matrices", "rank", "position", "encoder")
SUMMARY_COLUMNS = KEYS + ["mean", "std", "n", "n_datasets", "partial", "missing", "best", "n_runs"]
STD_DDOF = {"sample": 1, "population": 0}
STD_LABELS = {"sample": "sample std (ddof=1)", "population": "population std (ddof=0)"}


@dataclass(frozen=True)
class Cell:
    """One table cell: seed statistics of a (method, dataset) or a method's Average."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    best: bool = False
    partial: bool = False
    missing: tuple[str, ...] = ()
    n_runs: int = 0  # runs of the cell including those without a top-1 (0: same as n)

    @property
    def empty(self) -> bool:
        """True when there is no result for this cell."""
        return self.mean is None

    def text(self, decimals: int = 1, pm: str = " ± ", seeds: bool = True) -> str:
        """Plain text: "72.3 ± 0.4 (3)"; one seed "72.3 (1)"; "(2 of 3)" when a run has no top-1;
        missing cells are empty."""
        if self.mean is None:
            return ""
        out = f"{self.mean:.{decimals}f}"
        if self.std is not None and not np.isnan(self.std):
            out += f"{pm}{self.std:.{decimals}f}"
        if seeds:
            out += f" ({self.n} of {self.n_runs})" if self.n_runs > self.n else f" ({self.n})"
        return out


def clean(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that count: status "ok" and a numeric top-1 (shots as int)."""
    if df.empty:
        return df.copy()
    ok = df[(df["status"] == "ok") & pd.to_numeric(df["top1"], errors="coerce").notna()].copy()
    ok["top1"] = ok["top1"].astype(float)
    ok["shots"] = ok["shots"].astype(int)
    return ok


def is_fewshot(df: pd.DataFrame) -> pd.Series:
    """True for rows of the few-shot protocol (the paper's); a frame without a `protocol` column
    (schema 1) is all few-shot."""
    if "protocol" not in df.columns:
        return pd.Series(True, index=df.index, dtype=bool)
    return (df["protocol"].fillna("fewshot") == "fewshot").astype(bool)


def fewshot_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The few-shot protocol's rows (`is_fewshot`)."""
    return df[is_fewshot(df)]


def is_ablation_variant(method: str, config, extra) -> bool:
    """A LoRA ablation run stored under its own label (Figure 3 only, not a main-table row).

    True when `extra["ablation"]` or `extra["base_method"]` (a labelled sweep variant) is set, or
    when the config has all of matrices, rank, position and encoder and the method is neither
    "lora" nor another known method.
    """
    if isinstance(extra, dict) and (extra.get("ablation") or extra.get("base_method")):
        return True
    has_keys = isinstance(config, dict) and all(k in config for k in ABLATION_KEYS)
    return has_keys and method not in METHODS


def std_ddof(std: str) -> int:
    """The ddof of a std kind ("sample" 1, "population" 0); another name is a ConfigError."""
    if std not in STD_DDOF:
        import difflib

        from fsbench.errors import ConfigError

        close = difflib.get_close_matches(str(std), list(STD_DDOF), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(STD_DDOF)}"
        raise ConfigError(f"unknown std {std!r}; {hint}")
    return STD_DDOF[std]


def main_runs(df: pd.DataFrame, keep_missing: bool = False) -> pd.DataFrame:
    """Few-shot `clean` rows minus LoRA ablation variants: what the main table, Figure 2 and cost use.
    `keep_missing` also keeps status-"ok" rows without a numeric top-1 (to count and name them)."""
    if keep_missing:
        ok = fewshot_rows(df)
        ok = ok[ok["status"] == "ok"].assign(shots=lambda f: f["shots"].astype(int)) if not ok.empty else ok
    else:
        ok = clean(fewshot_rows(df))
    if ok.empty:
        return ok
    variant = [is_ablation_variant(m, c, e) for m, c, e in zip(ok["method"], ok["config"], ok["extra"],
                                                                  strict=True)]
    return ok[~pd.Series(variant, index=ok.index, dtype=bool)]


def missing_top1(df: pd.DataFrame) -> pd.DataFrame:
    """The counted runs (`main_runs`) whose status is "ok" but whose top-1 is NaN or null: KEYS + seed."""
    runs = main_runs(df, keep_missing=True)
    if runs.empty:
        return pd.DataFrame(columns=KEYS + ["seed"])
    bad = pd.to_numeric(runs["top1"], errors="coerce").isna()
    return runs.loc[bad, KEYS + ["seed"]].reset_index(drop=True)


def seed_stats(df: pd.DataFrame, std: str = "sample") -> pd.DataFrame:
    """Mean, std (`std`: "sample", ddof=1, or "population", ddof=0) and count of top-1 over seeds,
    per (backbone, shots, method, dataset); `n_runs` also counts runs without a top-1.

    LoRA ablation variants (`is_ablation_variant`) are left out; one seed has no std.
    """
    ddof = std_ddof(std)
    runs = main_runs(df, keep_missing=True)
    if runs.empty:
        return pd.DataFrame(columns=KEYS + ["mean", "std", "n", "n_runs"])
    values = pd.to_numeric(runs["top1"], errors="coerce").astype(float)
    grouped = values.groupby([runs[k] for k in KEYS])
    out = grouped.agg(mean="mean", std=lambda s: s.dropna().std(ddof=ddof) if s.count() > 1 else np.nan,
                      n="count", n_runs="size").reset_index()
    out = out[out["n"] > 0].reset_index(drop=True)
    out[["n", "n_runs"]] = out[["n", "n_runs"]].astype(int)
    return out


def _averages(stats: pd.DataFrame) -> pd.DataFrame:
    """Average rows: mean of per-dataset means over each block's datasets, flagged when partial."""
    rows = []
    for (backbone, shots), block in stats.groupby(["backbone", "shots"]):
        datasets = set(block["dataset"])
        for method, sub in block.groupby("method"):
            missing = tuple(d for d in order_datasets(datasets) if d not in set(sub["dataset"]))
            rows.append({"backbone": backbone, "shots": shots, "method": method, "dataset": AVERAGE,
                         "mean": float(sub["mean"].mean()), "std": np.nan, "n": len(sub),
                         "n_datasets": len(datasets), "partial": bool(missing), "missing": missing})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS[:-2])


def _mark_best(summary: pd.DataFrame, decimals: int) -> pd.Series:
    """True for the best displayed mean of each (backbone, shots, dataset) column."""
    shown = summary["mean"].round(decimals)
    eligible = ~summary["partial"]
    cols = ["backbone", "shots", "dataset"]
    any_complete = eligible.groupby([summary[c] for c in cols]).transform("any")
    eligible = eligible | ~any_complete
    top = shown.where(eligible).groupby([summary[c] for c in cols]).transform("max")
    return eligible & (shown == top)


def summary(df: pd.DataFrame, decimals: int = 1, std: str = "sample") -> pd.DataFrame:
    """Long, numeric form of every main-table cell, Average rows included (dataset == "average").

    Columns: backbone, shots, method, dataset, mean, std (`std`: "sample" or "population"), n (seeds,
    or datasets for an Average), n_datasets (datasets in the block), partial, missing (datasets an
    Average lacks), best, n_runs (runs including those without a top-1; an Average's is its n).
    """
    stats = seed_stats(df, std)
    if stats.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    block_size = stats.groupby(["backbone", "shots"])["dataset"].transform("nunique")
    stats = stats.assign(n_datasets=block_size, partial=False, missing=[()] * len(stats))
    averages = _averages(stats.drop(columns="n_runs"))
    out = pd.concat([stats, averages.assign(n_runs=averages["n"])], ignore_index=True)
    out["best"] = _mark_best(out, decimals)
    return _paper_sorted(out)[SUMMARY_COLUMNS]


def _paper_sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by backbone, shots, then the paper's method and dataset order (Average last)."""
    m_rank = {m: i for i, m in enumerate(order_methods(frame["method"]))}
    d_rank = {d: i for i, d in enumerate(order_datasets(frame["dataset"]) + [AVERAGE])}
    keys = frame.assign(_m=frame["method"].map(m_rank), _d=frame["dataset"].map(d_rank))
    keys = keys.sort_values(["backbone", "shots", "_m", "_d"], kind="stable")
    return frame.loc[keys.index].reset_index(drop=True)


def blocks(df: pd.DataFrame, backbones: list[str] | None = None) -> list[tuple[str, int]]:
    """The (backbone, shots) blocks present, in report order (backbones as given, else sorted)."""
    ok = main_runs(df)
    if ok.empty:
        return []
    present = sorted(set(ok["backbone"]))
    chosen = [b for b in backbones if b in present] if backbones else present
    return [(b, int(s)) for b in chosen for s in sorted(set(ok.loc[ok["backbone"] == b, "shots"]))]


def main_table(df: pd.DataFrame, backbone: str, shots: int, decimals: int = 1, std: str = "sample") -> pd.DataFrame:
    """The paper's table for one (backbone, shots) block: a frame of `Cell`s.

    Index: methods (registry names, paper order); columns: datasets (registry names, paper
    order, unknown ones after) then "average". `attrs` holds backbone, shots, n_datasets, decimals
    and std (which standard deviation the cells' "±" is: "sample" or "population").
    """
    s = summary(df, decimals, std)
    s = s[(s["backbone"] == backbone) & (s["shots"] == shots)]
    datasets = order_datasets(s["dataset"]) + [AVERAGE]
    table = pd.DataFrame(Cell(), index=order_methods(s["method"]), columns=datasets, dtype=object)
    for r in s.itertuples(index=False):
        sd = None if pd.isna(r.std) else float(r.std)
        table.at[r.method, r.dataset] = Cell(float(r.mean), sd, int(r.n), bool(r.best),
                                             bool(r.partial), tuple(r.missing), int(r.n_runs))
    table.attrs.update(backbone=backbone, shots=int(shots), n_datasets=len(datasets) - 1,
                       decimals=decimals, std=std)
    return table


def numeric(table: pd.DataFrame, field: str = "mean") -> pd.DataFrame:
    """One numeric field ("mean", "std", "n") of a `main_table`, NaN where missing."""
    def get(cell: Cell) -> float:
        value = getattr(cell, field)
        return np.nan if value is None else float(value)

    return table.map(get).astype(float)
