"""Statistics a reviewer trusts, as pure functions of the results frame (`fsbench.load_results`).

- seed confidence intervals: mean over seeds with a 95% Student-t interval (`mean_ci`);
- paired comparisons: all methods share each (backbone, dataset, shots, seed) support set, so two
  methods are compared on the seeds they share, by the mean difference and its paired-t interval
  (`paired_ci`, `paired_differences`, `paired_table`);
- across datasets: a Wilcoxon signed-rank test per method pair (`wilcoxon_table`) and Demšar's
  average ranks, Friedman test and Nemenyi critical difference (`rank_analysis`), after
  J. Demšar, "Statistical Comparisons of Classifiers over Multiple Data Sets", JMLR 7 (2006) 1-30;
- calibration: the seed mean of `metrics["ece"]` next to top-1 (`calibration_table`).

The tests themselves are scipy's (`ttest_1samp`, `ttest_rel`, `wilcoxon`, `friedmanchisquare`,
`studentized_range`); this module only arranges the numbers. Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from fsbench.report.style import dataset_label, method_label, order_datasets, order_methods
from fsbench.report.tables import KEYS, main_runs

CONFIDENCE = 0.95
ALPHA = 0.05
CELL = ["backbone", "shots", "dataset"]
CI_COLUMNS = KEYS + ["mean", "std", "n", "ci_low", "ci_high", "clipped"]
BOUNDS = (0.0, 100.0)  # top-1 is a percentage: a t interval reaching past these is shown clipped
PAIRED_COLUMNS = CELL + ["method", "reference", "n", "mean_diff", "std_diff", "ci_low", "ci_high", "p_value"]
WILCOXON_COLUMNS = ["backbone", "shots", "method_a", "method_b", "n_datasets", "wins", "ties", "losses",
                    "mean_diff", "statistic", "p_value", "p_method"]
MIN_WILCOXON_DATASETS = 2  # a pair sharing one dataset has no test (scipy: W = 0, p = 1); left out everywhere
ZERO_RULE = "zero differences dropped before ranking (Wilcoxon's rule, scipy's zero_method='wilcox')"
CALIBRATION_COLUMNS = KEYS + ["top1", "ece", "n", "n_ece", "not_applicable"]
NAN = float("nan")


@contextmanager
def _quiet() -> Iterator[None]:
    """scipy warns on zero-variance samples (a degenerate interval), which is an answer, not an error."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t confidence interval of the mean: mean ± t_{n-1} · s/√n (scipy's `ttest_1samp`).

    Returns (nan, nan) for fewer than two values; equal values give the degenerate (mean, mean).
    """
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return NAN, NAN
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    with _quiet():
        ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def paired_ci(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean of a - b over paired values with its paired-t interval and two-sided p (scipy's `ttest_rel`).

    Returns n, mean_diff, std_diff (ddof=1), ci_low, ci_high, p_value; the interval and p are NaN
    below two pairs, and equal differences give a degenerate interval with no p-value.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    d = x - y
    out = {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else NAN,
           "std_diff": float(d.std(ddof=1)) if d.size > 1 else NAN, "ci_low": NAN, "ci_high": NAN, "p_value": NAN}
    if d.size < 2:
        return out
    if np.all(d == d[0]):
        return out | {"ci_low": float(d[0]), "ci_high": float(d[0])}
    with _quiet():
        res = stats.ttest_rel(x, y)
        ci = res.confidence_interval(confidence)
    return out | {"ci_low": float(ci.low), "ci_high": float(ci.high), "p_value": float(res.pvalue)}


def seed_runs(df: pd.DataFrame, metric: str = "top1") -> pd.DataFrame:
    """One row per few-shot run that counts (`main_runs`: status ok, few-shot protocol, no ablation
    variant): KEYS + seed + value + reason.

    `metric` "top1" is the headline column; any other name is read from the `metrics` dict (NaN
    where absent), and `reason` is the run's `not_applicable[metric]` ("" where none).
    """
    ok = main_runs(df)
    if ok.empty:
        return pd.DataFrame(columns=KEYS + ["seed", "value", "reason"])
    if metric == "top1":
        values = ok["top1"].astype(float)
    else:
        values = _column(ok, "metrics").map(lambda m: _lookup(m, metric, NAN))
    reasons = _column(ok, "not_applicable").map(lambda r: str(_lookup(r, metric, "") or ""))
    out = ok[KEYS + ["seed"]].assign(value=pd.to_numeric(values, errors="coerce"), reason=reasons)
    out["seed"] = out["seed"].astype(int)
    return out.reset_index(drop=True)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A column of dicts, or Nones where the frame (an older schema) has no such column."""
    return frame[name] if name in frame.columns else pd.Series([None] * len(frame), index=frame.index)


def _lookup(mapping, key: str, default):
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return default if value is None else value


def seed_ci_table(df: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per (backbone, shots, method, dataset): mean, std (ddof=1), n and the Student-t CI over seeds."""
    runs = seed_runs(df)
    rows = []
    for key, group in runs.groupby(KEYS, sort=True):
        x = group["value"].to_numpy(dtype=float)
        low, high = mean_ci(x, confidence)
        rows.append(dict(zip(KEYS, key, strict=True)) | {
            "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else NAN, "n": int(x.size),
            "ci_low": low, "ci_high": high, "clipped": bool(low < BOUNDS[0] or high > BOUNDS[1])})
    return pd.DataFrame(rows, columns=CI_COLUMNS)


def clip_interval(low: float, high: float) -> tuple[float, float]:
    """A t interval clipped to the range top-1 can take, [0, 100] (NaN stays NaN)."""
    return (max(low, BOUNDS[0]) if low == low else low), (min(high, BOUNDS[1]) if high == high else high)


def significant(row) -> bool:
    """True when a paired row's interval excludes 0 *and* it has a p-value: a constant difference (the same
    on every seed) has a zero-width interval but no test, so it is never called significant."""
    p = row.p_value
    return p == p and (row.ci_low > 0 or row.ci_high < 0)


def paired_differences(df: pd.DataFrame, method: str, reference: str,
                       confidence: float = CONFIDENCE) -> pd.DataFrame:
    """`method` − `reference` per (backbone, shots, dataset), over the seeds both have (paired t).

    Cells where the two methods share no seed are left out.
    """
    runs = seed_runs(df)
    a = runs[runs["method"] == method].set_index(CELL + ["seed"])["value"]
    b = runs[runs["method"] == reference].set_index(CELL + ["seed"])["value"]
    both = pd.concat({"a": a, "b": b}, axis=1, join="inner").reset_index()
    rows = []
    for key, group in both.groupby(CELL, sort=True):
        group = group.sort_values("seed")
        res = paired_ci(group["a"], group["b"], confidence)
        rows.append(dict(zip(CELL, key, strict=True)) | {"method": method, "reference": reference} | res)
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def paired_table(df: pd.DataFrame, reference: str = "lora", confidence: float = CONFIDENCE) -> pd.DataFrame:
    """`paired_differences` of every other method against `reference` (long form, paper order)."""
    methods = [m for m in order_methods(seed_runs(df)["method"]) if m != reference]
    frames = [paired_differences(df, m, reference, confidence) for m in methods]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PAIRED_COLUMNS)


def dataset_scores(df: pd.DataFrame, backbone: str, shots: int) -> pd.DataFrame:
    """Seed-mean top-1 of one (backbone, shots) block: datasets (rows) × methods (columns), NaN if missing."""
    runs = seed_runs(df)
    block = runs[(runs["backbone"] == backbone) & (runs["shots"] == shots)]
    if block.empty:
        return pd.DataFrame()
    wide = block.groupby(["dataset", "method"])["value"].mean().unstack("method")
    return wide.loc[order_datasets(wide.index), order_methods(wide.columns)]


def wilcoxon_p_method(d: np.ndarray) -> str:
    """How scipy's `wilcoxon(method="auto")` (scipy >= 1.13) gets its p-value for differences `d`:
    "exact" (the signed-rank null distribution) for n <= 50 without zeros or tied |d|; "exact
    (permutation)" (all 2^n sign flips) with zeros or ties and n <= 13; else "normal approximation"."""
    d = np.asarray(d, dtype=float)
    nonzero = np.abs(d[d != 0])
    ties = np.unique(nonzero).size < nonzero.size
    if d.size > 50:
        return "normal approximation"
    if not ties and nonzero.size == d.size:
        return "exact"
    return "exact (permutation)" if d.size <= 13 else "normal approximation"


def wilcoxon_pair(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test of paired per-dataset scores with scipy's defaults: zero
    differences are dropped before ranking (`zero_method="wilcox"`) and p comes from the rule
    `wilcoxon_p_method` names (exact with ties too, by permutation, for n <= 13); `p_method` says which."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = x - y
    out = {"n_datasets": int(d.size), "wins": int((d > 0).sum()), "ties": int((d == 0).sum()),
           "losses": int((d < 0).sum()), "mean_diff": float(d.mean()) if d.size else NAN,
           "statistic": NAN, "p_value": NAN, "p_method": ""}
    if d.size == 0 or np.all(d == 0):
        return out
    with _quiet():
        res = stats.wilcoxon(x, y)
    return out | {"statistic": float(res.statistic), "p_value": float(res.pvalue), "p_method": wilcoxon_p_method(d)}


def wilcoxon_table(df: pd.DataFrame, backbone: str, shots: int) -> pd.DataFrame:
    """A Wilcoxon signed-rank test across datasets for every method pair of a block (paper order),
    on the datasets both methods have; the p-values are per pair, not corrected for multiplicity.
    Pairs sharing fewer than `MIN_WILCOXON_DATASETS` datasets have no test and are left out."""
    scores = dataset_scores(df, backbone, shots)
    rows = []
    for a, b in itertools.combinations(scores.columns, 2):
        both = scores[[a, b]].dropna()
        if len(both) >= MIN_WILCOXON_DATASETS:
            rows.append({"backbone": backbone, "shots": int(shots), "method_a": a, "method_b": b}
                        | wilcoxon_pair(both[a], both[b]))
    return pd.DataFrame(rows, columns=WILCOXON_COLUMNS)


def average_ranks(scores: pd.DataFrame) -> pd.Series:
    """Demšar's average ranks: rank methods within each dataset (1 = highest score, ties share the
    average rank), then average over datasets. `scores`: datasets × methods, no missing values."""
    return scores.rank(axis=1, ascending=False, method="average").mean(axis=0).sort_values(kind="stable")


def nemenyi_q(k: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical value q_α: the studentized range quantile for k groups and infinite degrees
    of freedom, divided by √2 (Demšar 2006, Table 5; scipy's `studentized_range`)."""
    return float(stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """Critical difference CD = q_α √(k(k+1) / (6N)) for k methods over N datasets (Demšar 2006, §3.2.2)."""
    if k < 2 or n < 1:
        raise ValueError(f"the critical difference needs k >= 2 methods and N >= 1 datasets, got {k}, {n}")
    return nemenyi_q(k, alpha) * math.sqrt(k * (k + 1) / (6.0 * n))


def friedman(scores: pd.DataFrame) -> dict[str, float]:
    """Friedman's test over datasets (rows) × methods (columns) with scipy's `friedmanchisquare`
    (tie-corrected χ²_F), and Iman and Davenport's F_F = (N−1)χ²_F / (N(k−1) − χ²_F) on (k−1,
    (k−1)(N−1)) degrees of freedom, which Demšar recommends as less conservative (infinite, p = 0,
    when every dataset ranks the methods alike). NaN for k < 3 or N < 2."""
    n, k = scores.shape
    out = {"chi2": NAN, "p_value": NAN, "iman_davenport_f": NAN, "iman_davenport_p": NAN}
    if k < 3 or n < 2:
        return out
    with _quiet():
        chi2, p = stats.friedmanchisquare(*(scores[c].to_numpy(dtype=float) for c in scores.columns))
    out.update(chi2=float(chi2), p_value=float(p))
    denom = n * (k - 1) - chi2
    if denom <= 0:  # every dataset ranks the methods alike: F_F is infinite, its p-value 0
        return out | {"iman_davenport_f": math.inf, "iman_davenport_p": 0.0}
    f = (n - 1) * chi2 / denom
    return out | {"iman_davenport_f": float(f), "iman_davenport_p": float(stats.f.sf(f, k - 1, (k - 1) * (n - 1)))}


def cliques(ranks: pd.Series, cd: float) -> list[list[str]]:
    """Maximal runs of methods (sorted by rank) whose ranks differ by less than `cd`: the groups a
    critical-difference diagram joins with a bar (no significant difference by Nemenyi's test)."""
    ordered = ranks.sort_values(kind="stable")
    names, values = list(ordered.index), ordered.to_numpy(dtype=float)
    groups: list[list[str]] = []
    last_end = -1
    for i in range(len(values)):
        j = i
        while j + 1 < len(values) and values[j + 1] - values[i] < cd:
            j += 1
        if j > i and j > last_end:
            groups.append(names[i:j + 1])
            last_end = j
    return groups


@dataclass
class RankAnalysis:
    """Demšar's analysis of one (backbone, shots) block, on a complete methods × datasets table."""

    backbone: str
    shots: int
    ranks: pd.Series  # average rank per method, best (lowest) first
    n_datasets: int
    cd: float
    alpha: float
    friedman: dict[str, float]
    groups: list[list[str]]
    datasets: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)  # methods left out (paper order)
    missing: dict[str, list[str]] = field(default_factory=dict)  # left-out method -> datasets it lacks
    dropped: dict[str, list[str]] = field(default_factory=dict)  # left-out dataset -> kept methods lacking it

    def friedman_reason(self) -> str:
        """Why the Friedman test has no value ("" when it has one)."""
        if self.friedman["chi2"] == self.friedman["chi2"]:
            return ""
        if len(self.ranks) < 3:
            return f"needs 3 or more methods, here {len(self.ranks)}"
        if self.n_datasets < 2:
            return f"needs 2 or more datasets, here {self.n_datasets}"
        return "undefined: all methods tie on every dataset"  # scipy's tie correction is 0/0


def _coverage(have: pd.DataFrame, methods: list[str]) -> int:
    """Methods × complete datasets of a candidate set: the cells a complete-block analysis uses (0 when
    fewer than 2 methods or 2 datasets remain)."""
    n = int(have[methods].all(axis=1).sum()) if methods else 0
    return len(methods) * n if len(methods) >= 2 and n >= 2 else 0


def complete_block(scores: pd.DataFrame) -> list[str]:
    """The methods to rank: start from all and leave out, one at a time, the method whose removal adds
    most cells to the complete table (methods × datasets every kept method has), while that grows it
    (when nothing is complete yet, the method with the fewest datasets goes). Greedy, deterministic."""
    have = scores.notna()
    kept = list(scores.columns)
    while len(kept) > 2:
        size = _coverage(have, kept)
        options = [(_coverage(have, [m for m in kept if m != c]), -int(have[c].sum()), -i, c)
                   for i, c in enumerate(kept)]
        best = max(options)
        if size and best[0] <= size:
            break
        kept.remove(best[3] if best[0] else min(kept, key=lambda m: (int(have[m].sum()), -kept.index(m))))
    if not _coverage(have, kept):  # greedy ended on a pair without 2 shared datasets: try every pair
        pairs = [list(p) for p in itertools.combinations(scores.columns, 2)]
        kept = max(pairs, key=lambda p: _coverage(have, p), default=kept)
    return kept


def rank_analysis(df: pd.DataFrame, backbone: str, shots: int, alpha: float = ALPHA) -> RankAnalysis | None:
    """Average ranks, Friedman test and Nemenyi CD of a block on the datasets every kept method has
    (`complete_block` chooses the methods; `excluded`/`missing` and `dropped` say who was left out and
    why). None when no 2 methods share 2 datasets."""
    scores = dataset_scores(df, backbone, shots)
    if scores.empty:
        return None
    kept = complete_block(scores)
    have = scores.notna()
    datasets = [d for d in scores.index if have.loc[d, kept].all()]
    excluded = [m for m in scores.columns if m not in kept]
    missing = {m: [d for d in scores.index if not have.loc[d, m]] for m in excluded}
    dropped = {d: [m for m in kept if not have.loc[d, m]] for d in scores.index if d not in datasets}
    table = scores.loc[datasets, kept]
    n, k = table.shape
    if k < 2 or n < 2:
        return None
    ranks = average_ranks(table)
    cd = nemenyi_cd(k, n, alpha)
    return RankAnalysis(backbone, int(shots), ranks, n, cd, alpha, friedman(table), cliques(ranks, cd),
                        datasets, excluded, missing, dropped)


def left_out_lines(a: RankAnalysis) -> list[str]:
    """One line each for the methods and the datasets a rank analysis left out, and why."""
    lines = []
    for m in a.excluded:
        lines.append(f"{method_label(m)} (no result on {', '.join(dataset_label(d) for d in a.missing[m])})")
    for d, lacking in a.dropped.items():
        lines.append(f"{dataset_label(d)} (no result for {', '.join(method_label(m) for m in lacking)})")
    return lines


def calibration_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (backbone, shots, method, dataset): seed-mean top-1 and ECE (%, 15 bins, `metrics["ece"]`).

    `ece` is the mean over the seeds that report it (NaN where none does, shown as "n/a"), `n_ece`
    their number, `not_applicable` the reason a method's results give for having no ECE.
    """
    top, ece = seed_runs(df, "top1"), seed_runs(df, "ece")
    if top.empty:
        return pd.DataFrame(columns=CALIBRATION_COLUMNS)
    runs = top.assign(ece=ece["value"].to_numpy(dtype=float), reason=ece["reason"].to_numpy())
    grouped = runs.groupby(KEYS, sort=True)
    out = grouped.agg(top1=("value", "mean"), ece=("ece", "mean"), n=("value", "size"),
                      n_ece=("ece", "count"), not_applicable=("reason", _first_text)).reset_index()
    return out[CALIBRATION_COLUMNS]


def _first_text(values: pd.Series) -> str:
    texts = [v for v in values if v]
    return texts[0] if texts else ""
