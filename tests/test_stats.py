"""The report's statistics: every number checked against a direct scipy computation or by hand.

Expected values come from scipy (`t.interval`, `ttest_rel`, `wilcoxon`, `friedmanchisquare`,
`studentized_range`) on the raw numbers the store is built from, from Demšar (2006)'s worked
example and tables, or from hand arithmetic; never through the functions under test.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fsbench.cli.common import int_list
from fsbench.errors import ConfigError
from fsbench.metrics import ece, expected_calibration_error
from fsbench.report import write_report
from fsbench.report.cd_diagram import plot_cd_diagram
from fsbench.report.stats import (
    average_ranks,
    cliques,
    friedman,
    mean_ci,
    nemenyi_cd,
    nemenyi_q,
    paired_ci,
    rank_analysis,
    wilcoxon_pair,
)
from fsbench.results import Result, load_results, write_result

# -- one statistic at a time, on known numbers ---------------------------------------------------------

X = [71.2, 72.9, 70.4, 73.3, 71.8]
Y = [70.1, 72.2, 70.9, 71.0, 70.6]


def test_mean_ci_is_student_t_interval():
    x = np.array(X)
    expected = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=x.std(ddof=1) / math.sqrt(len(x)))
    assert mean_ci(x) == pytest.approx(expected, rel=1e-12)
    assert mean_ci(x, 0.99) == pytest.approx(stats.t.interval(0.99, 4, loc=x.mean(), scale=stats.sem(x)))
    assert all(math.isnan(v) for v in mean_ci([70.0]))  # one seed: no interval
    assert mean_ci([70.0, 70.0, 70.0]) == (70.0, 70.0)  # no spread: degenerate, not NaN


def test_paired_ci_is_paired_t_on_the_differences():
    d = np.array(X) - np.array(Y)
    res = paired_ci(X, Y)
    assert res["n"] == 5 and res["mean_diff"] == pytest.approx(d.mean())
    assert res["std_diff"] == pytest.approx(d.std(ddof=1))
    low, high = stats.t.interval(0.95, 4, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(5))
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    assert res["p_value"] == pytest.approx(stats.ttest_rel(X, Y).pvalue)
    # pairing matters: the unpaired (Welch) interval of the same numbers is wider
    welch = stats.ttest_ind(X, Y, equal_var=False).confidence_interval(0.95)
    assert high - low < welch.high - welch.low
    one = paired_ci([1.0], [0.5])
    assert one["mean_diff"] == 0.5 and math.isnan(one["ci_low"]) and math.isnan(one["p_value"])
    with pytest.raises(ValueError):
        paired_ci([1.0, 2.0], [1.0])


def test_wilcoxon_matches_scipy():
    a = np.array([77.1, 65.3, 80.2, 71.0, 90.4, 60.2, 84.9, 73.3])
    b = np.array([76.0, 66.1, 78.5, 70.2, 88.1, 60.2, 83.0, 74.0])
    res = wilcoxon_pair(a, b)
    ref = stats.wilcoxon(a, b)
    assert res["statistic"] == pytest.approx(ref.statistic) and res["p_value"] == pytest.approx(ref.pvalue)
    assert (res["wins"], res["ties"], res["losses"], res["n_datasets"]) == (5, 1, 2, 8)
    assert res["mean_diff"] == pytest.approx((a - b).mean())
    same = wilcoxon_pair([1.0, 2.0], [1.0, 2.0])
    assert same["ties"] == 2 and math.isnan(same["p_value"])  # no non-zero difference: no test


SCORES = pd.DataFrame(  # datasets x methods, no ties within a dataset
    {"a": [80.1, 70.3, 65.0, 90.2, 55.5, 60.0], "b": [81.0, 71.2, 64.1, 91.0, 57.0, 61.5],
     "c": [79.0, 69.9, 66.2, 88.7, 54.9, 59.1], "d": [82.2, 72.0, 67.3, 91.5, 56.1, 62.0]},
    index=[f"d{i}" for i in range(6)])


def test_average_ranks_by_hand():
    # per dataset (1 = best): d0 d:1 b:2 a:3 c:4 | d1 d b a c | d2 d c a b | d3 d b a c | d4 b d a c | d5 d b a c
    hand = {"a": 3.0, "b": (2 + 2 + 4 + 2 + 1 + 2) / 6, "c": (4 + 4 + 2 + 4 + 4 + 4) / 6,
            "d": (1 + 1 + 1 + 1 + 2 + 1) / 6}
    ranks = average_ranks(SCORES)
    assert ranks.to_dict() == pytest.approx(hand)
    assert list(ranks.index) == ["d", "b", "a", "c"]  # best first
    tied = pd.DataFrame({"a": [1.0, 5.0], "b": [1.0, 4.0], "c": [0.0, 6.0]})
    assert average_ranks(tied).to_dict() == pytest.approx({"a": (1.5 + 2) / 2, "b": (1.5 + 3) / 2, "c": 2.0})


def test_friedman_matches_scipy_and_demsar_formulas():
    res = friedman(SCORES)
    ref = stats.friedmanchisquare(*(SCORES[c] for c in SCORES.columns))
    assert res["chi2"] == pytest.approx(ref.statistic) and res["p_value"] == pytest.approx(ref.pvalue)
    n, k = SCORES.shape  # without ties scipy's chi2 equals Demšar's eq. from average ranks
    r = average_ranks(SCORES).to_numpy()
    assert res["chi2"] == pytest.approx(12 * n / (k * (k + 1)) * ((r**2).sum() - k * (k + 1) ** 2 / 4))
    f = (n - 1) * ref.statistic / (n * (k - 1) - ref.statistic)
    assert res["iman_davenport_f"] == pytest.approx(f)
    assert res["iman_davenport_p"] == pytest.approx(stats.f.sf(f, k - 1, (k - 1) * (n - 1)))
    assert math.isnan(friedman(SCORES[["a", "b"]])["chi2"])  # scipy's test needs 3+ methods
    alike = friedman(pd.DataFrame({"a": [3.0, 5.0, 9.0], "b": [2.0, 4.0, 8.0], "c": [1.0, 3.0, 7.0]}))
    assert alike["chi2"] == pytest.approx(3 * (3 - 1))  # the maximum, N(k-1): F_F is infinite
    assert alike["iman_davenport_f"] == math.inf and alike["iman_davenport_p"] == 0.0


def test_demsar_worked_example():
    # Demšar (2006) §3.2.2: 4 classifiers on 14 data sets, average ranks 3.143, 2.000, 2.893, 1.964
    r, n, k = np.array([3.143, 2.000, 2.893, 1.964]), 14, 4
    chi2 = 12 * n / (k * (k + 1)) * ((r**2).sum() - k * (k + 1) ** 2 / 4)
    assert chi2 == pytest.approx(9.28, abs=0.01)
    assert (n - 1) * chi2 / (n * (k - 1) - chi2) == pytest.approx(3.69, abs=0.01)
    assert nemenyi_cd(4, 14) == pytest.approx(1.25, abs=0.005)  # "CD = 2.569 sqrt(4·5/(6·14)) = 1.25"


@pytest.mark.parametrize("k,q", [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (6, 2.850), (10, 3.164)])
def test_nemenyi_q_matches_demsar_table(k, q):
    assert nemenyi_q(k) == pytest.approx(q, abs=1e-3)
    assert nemenyi_q(k) == pytest.approx(stats.studentized_range.ppf(0.95, k, np.inf) / math.sqrt(2))
    assert nemenyi_cd(k, 11) == pytest.approx(nemenyi_q(k) * math.sqrt(k * (k + 1) / 66))


def test_cliques_by_hand():
    ranks = pd.Series({"a": 1.0, "b": 1.5, "c": 2.2, "d": 3.0, "e": 4.5})
    assert cliques(ranks, 1.0) == [["a", "b"], ["b", "c"], ["c", "d"]]
    assert cliques(ranks, 0.3) == []
    assert cliques(ranks, 10.0) == [["a", "b", "c", "d", "e"]]
    with pytest.raises(ValueError):
        nemenyi_cd(1, 5)


# -- ECE ---------------------------------------------------------------------------------------------------


def test_ece_hand_computed():
    conf = np.array([0.97, 0.95, 0.62, 0.61, 0.2])
    correct = np.array([1, 0, 1, 1, 0], dtype=bool)
    # 15 bins of width 1/15: {0.97, 0.95} in (14/15, 1], {0.62, 0.61} in (9/15, 10/15], {0.2} alone
    hand = 2 / 5 * abs(0.5 - 0.96) + 2 / 5 * abs(1.0 - 0.615) + 1 / 5 * abs(0.0 - 0.2)
    assert expected_calibration_error(conf, correct) == pytest.approx(100 * hand)
    assert ece(conf, correct, n_bins=15) == pytest.approx(37.8)
    assert ece(conf, correct, n_bins=1) == pytest.approx(100 * abs(correct.mean() - conf.mean()))
    assert ece(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0


def test_ece_bins_are_closed_on_the_right():
    # with 3 bins, 1/3 belongs to (0, 1/3] together with 0.2 (as in gpleiss/temperature_scaling)
    together = abs((1 + 0) / 2 - (1 / 3 + 0.2) / 2)
    assert ece([1 / 3, 0.2], [1, 0], n_bins=3) == pytest.approx(100 * together)
    assert ece([0.0, 0.01], [0, 0], n_bins=15) == pytest.approx(100 * 0.01 / 2)  # 0 goes to the first bin


@pytest.mark.parametrize("conf,correct,bins", [([], [], 15), ([0.5, 0.6], [1], 15), ([1.2], [1], 15),
                                               ([0.5], [1], 0)])
def test_ece_rejects_bad_input(conf, correct, bins):
    with pytest.raises(ValueError):
        ece(np.array(conf), np.array(correct), bins)


# -- seed lists on the command line ------------------------------------------------------------------------


def test_seed_ranges():
    assert int_list(["1-10"], "--seeds") == list(range(1, 11))
    assert int_list(["1-3,7", "9"], "--seeds") == [1, 2, 3, 7, 9]
    assert int_list(["2,1-3"], "--seeds") == [2, 1, 3]  # duplicates dropped, first kept
    assert int_list(["4-4"], "--seeds") == [4] and int_list(["-1"], "--seed") == [-1]
    for bad in ["5-1", "1-", "a-3", "1-3-5", "x", "1-100000"]:
        with pytest.raises(ConfigError, match="--seeds"):
            int_list([bad], "--seeds")


def test_bad_seed_range_is_a_one_line_error(capsys):
    from fsbench.cli import main

    assert main(["run", "--method", "zero_shot", "--backbone", "test-tiny", "--dataset", "synthetic",
                 "--seed", "5-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "5-1" in err and len(err.splitlines()) == 1 and "Traceback" not in err


# -- the report, from result files -------------------------------------------------------------------------

METHODS = ["coop", "tip_adapter", "lora"]
DATASETS = ["imagenet", "dtd", "eurosat", "oxford_flowers", "food101", "ucf101"]
SEEDS = [1, 2, 3, 4, 5]
NO_ECE = "tip_adapter"  # its results declare ECE not applicable
SKIP = ("coop", "dtd", 5)  # a missing seed: paired comparisons use the 4 shared ones
NO_ECE_RUN = ("lora", "ucf101", 5)  # one run without ECE (as one written before ECE was stored)


def _build_store(root: Path) -> dict:
    """Write the store; return {(method, dataset, seed): (top1, ece or None)}."""
    rng, raw = random.Random(7), {}
    for m in METHODS:
        for d in DATASETS:
            for s in SEEDS:
                if (m, d, s) == SKIP:
                    continue
                top1 = round(60 + 4 * METHODS.index(m) + DATASETS.index(d) + rng.uniform(-2, 2), 3)
                err = None if m == NO_ECE or (m, d, s) == NO_ECE_RUN else round(rng.uniform(1, 9), 3)
                na = {"ece": "stand-in reason"} if m == NO_ECE else {}
                write_result(root, Result(m, "ViT-B/16", d, 4, s, top1=top1, metrics={"top1": top1, "ece": err},
                                          not_applicable=na))
                raw[(m, d, s)] = (top1, err)
    write_result(root, Result("zero_shot", "ViT-B/16", "imagenet", 0, 1, top1=60.0, metrics={"top1": 60.0}))
    return raw


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("runs")
    return root, _build_store(root)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> tuple[Path, list[Path], list[str]]:
    out, notes = tmp_path_factory.mktemp("report"), []
    paths = write_report(load_results(store[0]), out, "md,csv,png,pdf", notes=notes)
    return out, paths, notes


def _top(raw: dict, m: str, d: str) -> dict[int, float]:
    return {s: v[0] for (mm, dd, s), v in raw.items() if (mm, dd) == (m, d)}


def _row(frame: pd.DataFrame, **keys) -> pd.Series:
    mask = np.logical_and.reduce([frame[k] == v for k, v in keys.items()])
    assert mask.sum() == 1, keys
    return frame[mask].iloc[0]


def test_report_writes_the_statistics_files(report):
    out, paths, _ = report
    names = {p.name for p in paths}
    for name in ["stats_ci.csv", "stats_paired.csv", "stats_wilcoxon.csv", "stats_ranks.csv", "calibration.csv",
                 "cd_ViT-B-16_4shots.png", "cd_ViT-B-16_4shots.pdf", "report.md"]:
        assert name in names and (out / name).stat().st_size > 0, name
    assert not (out / "cd_ViT-B-16_0shots.png").exists()  # one method: no diagram


def test_report_ci_csv_matches_scipy(store, report):
    ci = pd.read_csv(report[0] / "stats_ci.csv")
    for m, d in [("lora", "dtd"), ("coop", "dtd"), ("tip_adapter", "ucf101")]:
        x = np.array(list(_top(store[1], m, d).values()))
        row = _row(ci, method=m, dataset=d, shots=4)
        low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        assert row["n"] == len(x) and row["mean"] == pytest.approx(x.mean(), rel=1e-5)
        assert row["std"] == pytest.approx(x.std(ddof=1), rel=1e-5)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), rel=1e-5)


def test_report_paired_csv_uses_shared_seeds(store, report):
    paired = pd.read_csv(report[0] / "stats_paired.csv")
    assert set(paired["reference"]) == {"lora"} and set(paired["method"]) == {"coop", "tip_adapter"}
    a, b = _top(store[1], "coop", "dtd"), _top(store[1], "lora", "dtd")
    shared = sorted(set(a) & set(b))
    assert shared == [1, 2, 3, 4]
    d = np.array([a[s] - b[s] for s in shared])
    row = _row(paired, method="coop", dataset="dtd")
    assert row["n"] == 4 and row["mean_diff"] == pytest.approx(d.mean(), rel=1e-5)
    expected = stats.t.interval(0.95, 3, loc=d.mean(), scale=stats.sem(d))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(expected, rel=1e-5)
    assert row["p_value"] == pytest.approx(stats.ttest_rel([a[s] for s in shared], [b[s] for s in shared]).pvalue,
                                           rel=1e-5)


def _dataset_means(raw: dict) -> pd.DataFrame:
    return pd.DataFrame({m: [np.mean(list(_top(raw, m, d).values())) for d in DATASETS] for m in METHODS},
                        index=DATASETS)


def test_report_wilcoxon_friedman_and_ranks_match_scipy(store, report):
    means = _dataset_means(store[1])
    wil = pd.read_csv(report[0] / "stats_wilcoxon.csv")
    assert len(wil) == 3  # every pair once
    for a, b in [("coop", "lora"), ("tip_adapter", "lora"), ("coop", "tip_adapter")]:
        row = _row(wil, method_a=a, method_b=b)
        ref = stats.wilcoxon(means[a], means[b])
        assert row["n_datasets"] == 6 and row["p_value"] == pytest.approx(ref.pvalue, rel=1e-5)
        assert row["statistic"] == pytest.approx(ref.statistic)
    ranks = pd.read_csv(report[0] / "stats_ranks.csv")
    by_hand = means.rank(axis=1, ascending=False).mean()
    ref = stats.friedmanchisquare(*(means[m] for m in METHODS))
    for m in METHODS:
        row = _row(ranks, method=m)
        assert row["average_rank"] == pytest.approx(by_hand[m])
        assert row["chi2"] == pytest.approx(ref.statistic, rel=1e-5) and row["p_value"] == pytest.approx(ref.pvalue,
                                                                                                          rel=1e-5)
        assert row["cd"] == pytest.approx(stats.studentized_range.ppf(0.95, 3, np.inf) / math.sqrt(2)
                                          * math.sqrt(3 * 4 / (6 * 6)), rel=1e-5)


def test_report_calibration_table_and_markdown(store, report):
    cal = pd.read_csv(report[0] / "calibration.csv", keep_default_na=False, na_values=[""])
    errs = [v[1] for (m, d, s), v in store[1].items() if (m, d) == ("lora", "eurosat")]
    row = _row(cal, method="lora", dataset="eurosat")
    assert row["ece"] == pytest.approx(np.mean(errs), rel=1e-5) and row["n_ece"] == 5
    none = _row(cal, method=NO_ECE, dataset="eurosat")
    assert math.isnan(none["ece"]) and none["n_ece"] == 0 and none["not_applicable"] == "stand-in reason"
    text = (report[0] / "report.md").read_text()
    section = text[text.index("## Statistics"):text.index("## Cost")]
    calibration = section.split("### ViT-B/16, 4 shots")[1].split("Top-1 / ECE (%):")[1].splitlines()
    tip_row = next(line for line in calibration if line.startswith("| Tip"))
    assert tip_row.count("n/a") == len(DATASETS)  # never a number where ECE is absent
    lora_row = next(line for line in calibration if line.startswith("| CLIP"))
    assert "n/a" not in lora_row and f"{np.mean(errs):.1f}" in lora_row
    partial = [v[1] for (m, d, s), v in store[1].items() if (m, d) == ("lora", "ucf101") and v[1] is not None]
    row = _row(cal, method="lora", dataset="ucf101")
    assert row["n"] == 5 and row["n_ece"] == 4 and row["ece"] == pytest.approx(np.mean(partial), rel=1e-5)
    assert f"{np.mean(partial):.1f} (ECE of 4 of 5 seeds)" in lora_row
    assert "Paired difference vs CLIP-LoRA" in section and "Friedman" in section
    assert "![cd_ViT-B-16_4shots](cd_ViT-B-16_4shots.png)" in section and "Student t" in section


def test_rank_analysis_leaves_out_incomplete_methods(store, tmp_path):
    df = load_results(store[0])
    df = df[~((df["method"] == "coop") & (df["dataset"] == "food101"))]
    a = rank_analysis(df, "ViT-B/16", 4)  # 3 methods on 5 datasets keep more cells than 2 on 6
    assert a.excluded == [] and a.dropped == {"food101": ["coop"]} and a.n_datasets == 5
    assert a.cd == pytest.approx(nemenyi_cd(3, 5))
    df = df[~((df["method"] == "coop") & (df["dataset"] != "imagenet"))]  # coop on 1 dataset: left out
    a = rank_analysis(df, "ViT-B/16", 4)
    assert a.excluded == ["coop"] and list(a.ranks.index) == ["lora", "tip_adapter"] and a.n_datasets == 6
    assert math.isnan(a.friedman["chi2"]) and a.cd == pytest.approx(nemenyi_cd(2, 6))
    fig = plot_cd_diagram(a)
    assert len(fig.axes) == 1 and "CD = " in " ".join(t.get_text() for t in fig.axes[0].texts)
    assert rank_analysis(df, "ViT-B/16", 0) is None  # one method


def test_cli_reference_method(store, tmp_path, capsys):
    import fsbench.cli.report  # noqa: F401  (registers the command)
    from fsbench.cli import main

    out = tmp_path / "rep"
    assert main(["report", "--results", str(store[0]), "--out", str(out), "--format", "md,csv",
                 "--reference-method", "coop"]) == 0
    paired = pd.read_csv(out / "stats_paired.csv")
    assert set(paired["reference"]) == {"coop"} and set(paired["method"]) == {"tip_adapter", "lora"}
    capsys.readouterr()
    assert main(["report", "--results", str(store[0]), "--out", str(out), "--reference-method", "lroa"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'lora'" in err and len(err.splitlines()) == 1
