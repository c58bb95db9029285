"""Edge cases of `fsbench report` a reader must be able to trust at a glance (issue 23, "Seen" 1-10).

Each test builds a tiny results store with the case in it and checks what the reader sees (report.md,
the CSVs, the figures' artists); expected numbers come from numpy/scipy on the raw values written.
`synthetic_store` writes the larger folder (17 methods, ties, missing cells) the figures were looked at on.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from scipy import stats

from fsbench.report import main_table, to_latex, to_markdown, write_report
from fsbench.report.cd_diagram import plot_cd_diagram
from fsbench.report.cost import plot_pareto
from fsbench.report.curves import plot_training_curves
from fsbench.report.figures import plot_shots_curves
from fsbench.report.stats import paired_differences, rank_analysis, wilcoxon_pair
from fsbench.report.style import METHODS
from fsbench.results import Result, load_results, write_result

BB = "ViT-B/16"
ELEVEN = ["imagenet", "sun397", "fgvc_aircraft", "eurosat", "stanford_cars", "food101", "oxford_pets",
          "oxford_flowers", "caltech101", "dtd", "ucf101"]


def _put(root: Path, method: str, dataset: str, shots: int, seed: int, top1, **kw) -> None:
    write_result(root, Result(method, BB, dataset, shots, seed, top1=top1, metrics={"top1": top1}, **kw))


def _report(root: Path, out: Path, formats: str = "md,csv", **kw) -> tuple[str, list[str]]:
    notes: list[str] = []
    write_report(load_results(root), out, formats, notes=notes, **kw)
    return ((out / "report.md").read_text() if "md" in formats else ""), notes


def synthetic_store(root: Path, n_methods: int = 17, seeds: tuple[int, ...] = (1, 2, 3),
                    shots: tuple[int, ...] = (1, 2, 4, 8, 16)) -> None:
    """17 methods (the paper's + a plug-in) on the 11 datasets with ties and missing cells: CoOp (4)
    equals CoOp everywhere (identical curves), Tip-Adapter equals Zero-shot CLIP at every shot count
    (as a training-free method can), MaPLe has no result on DTD and ProGrad none on ImageNet (methods
    missing different datasets), one CLAP run has a null top-1 and GDA has a single seed."""
    rng = random.Random(3)
    names = [m for m in METHODS if m != "lora"][: n_methods - 2] + ["my_plugin", "lora"]
    base = {m: 50 + 1.5 * i for i, m in enumerate(names)}
    for m in names:
        for d_i, d in enumerate(ELEVEN):
            if (m, d) in {("maple", "dtd"), ("prograd", "imagenet")}:
                continue
            for k in shots:
                for s in seeds if m != "gda" else seeds[:1]:
                    src = {"coop_4ctx": "coop", "tip_adapter": "zero_shot"}.get(m, m)
                    r = random.Random(f"{src}{d}{k}{s}")
                    gain = 0.0 if src == "zero_shot" else 4 * math.log2(k)
                    top1 = round(base[src] + d_i + gain + r.uniform(-2, 2), 2)
                    if (m, d, k, s) == ("clap", "dtd", 4, 2):
                        top1 = None
                    _put(root, m, d, k, s, top1, train_seconds=0.0 if src == "zero_shot" else 5.0 * (1 + rng.random()))


# -- 1. a run "ok" without top-1 ------------------------------------------------------------------------


def test_missing_top1_is_warned_and_counted(tmp_path):
    runs = tmp_path / "runs"
    for s, v in [(1, 70.0), (2, 72.0), (3, None), (4, float("nan"))]:
        _put(runs, "lora", "dtd", 4, s, v)
    _put(runs, "coop", "dtd", 4, 1, 60.0)
    warnings: list[str] = []
    notes: list[str] = []
    write_report(load_results(runs), tmp_path / "rep", "md,csv", notes=notes, warn=warnings.append)
    assert len(warnings) == 1 and "2 run(s)" in warnings[0] and "seed 3" in warnings[0] and "seed 4" in warnings[0]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "71.0 ± 1.4 (2 of 4)" in md
    cells = pd.read_csv(tmp_path / "rep" / "main_table.csv")
    row = cells[(cells["method"] == "lora") & (cells["dataset"] == "dtd")].iloc[0]
    assert (row["n"], row["n_runs"]) == (2, 4)
    _report(runs, tmp_path / "rep2")  # without `warn`, the line goes to the notes
    assert not warnings[1:]


# -- 2. methods missing different datasets ----------------------------------------------------------


def test_ranks_on_the_datasets_every_method_has(tmp_path):
    runs = tmp_path / "runs"
    methods = ["coop", "kgcoop", "taskres", "lora"]
    scores = {}
    for i, m in enumerate(methods):
        for j, d in enumerate(ELEVEN):
            if j == i:  # each method misses a different dataset: 7 shared by all four
                continue
            scores[(m, d)] = 60 + 3 * i + ((j * 7 + i * 3) % 5)
            _put(runs, m, d, 4, 1, float(scores[(m, d)]))
    a = rank_analysis(load_results(runs), BB, 4)
    assert a is not None and a.excluded == [] and a.n_datasets == 7
    assert a.dropped == {ELEVEN[i]: [m] for i, m in enumerate(methods)}
    kept = ELEVEN[4:]
    chi2, p = stats.friedmanchisquare(*([scores[(m, d)] for d in kept] for m in methods))
    assert a.friedman["chi2"] == pytest.approx(chi2) and a.friedman["p_value"] == pytest.approx(p)
    md, notes = _report(runs, tmp_path / "rep", "md,csv,png")
    assert "ImageNet (no result for CoOp)" in md and "Average ranks over the 7 datasets" in md
    assert (tmp_path / "rep" / "cd_ViT-B-16_4shots.png").is_file()
    assert not [n for n in notes if "Critical-difference" in n]


def test_a_method_missing_most_datasets_is_left_out_and_named(tmp_path):
    runs = tmp_path / "runs"
    for i, m in enumerate(["coop", "kgcoop", "lora"]):
        for d in ELEVEN[:6]:
            _put(runs, m, d, 4, 1, 60.0 + i + ELEVEN.index(d))
    _put(runs, "clap", "imagenet", 4, 1, 50.0)
    a = rank_analysis(load_results(runs), BB, 4)
    assert a.excluded == ["clap"] and a.missing["clap"] == ELEVEN[1:6] and a.n_datasets == 6
    md, _ = _report(runs, tmp_path / "rep")
    assert "CLAP (no result on SUN, Aircraft" in md


def test_complete_block_keeps_most_cells_and_finds_a_sharing_pair():
    from fsbench.report.stats import complete_block

    n = np.nan
    two_pairs = pd.DataFrame({"A": [1, 2, n, n, n], "B": [1, 2, n, n, n], "C": [n, n, 1, 2, 3],
                              "D": [n, n, 3, n, n]}, index=list("vwxyz"))
    assert complete_block(two_pairs) == ["A", "B"]  # C and D share one dataset only
    shifted = pd.DataFrame({"A": [1, 2, 3, 4], "B": [2, 3, 4, n], "C": [n, 1, 2, 3]}, index=list("wxyz"))
    assert complete_block(shifted) == ["A", "B", "C"]  # 3 methods x 2 datasets beat 2 x 3


# -- 3. all tied ---------------------------------------------------------------------------------------


def test_all_methods_tied(tmp_path):
    runs = tmp_path / "runs"
    for m in ["coop", "kgcoop", "lora"]:
        for j, d in enumerate(ELEVEN[:4]):
            _put(runs, m, d, 4, 1, 60.0 + j)
    a = rank_analysis(load_results(runs), BB, 4)
    assert math.isnan(a.friedman["chi2"]) and "tie" in a.friedman_reason()
    md, _ = _report(runs, tmp_path / "rep")
    assert "all methods tie on every dataset" in md and "needs 3 or more methods" not in md
    title = plot_cd_diagram(a).axes[0].get_title()
    assert "tie" in title and "3+ methods" not in title


# -- 4. a constant paired difference ------------------------------------------------------------------


def test_constant_paired_difference_is_not_bold(tmp_path):
    runs = tmp_path / "runs"
    for s, v in [(1, 70.0), (2, 71.5), (3, 69.0)]:
        _put(runs, "lora", "dtd", 4, s, v)
        _put(runs, "coop", "dtd", 4, s, v + 1.0)
    row = paired_differences(load_results(runs), "coop", "lora").iloc[0]
    assert row["mean_diff"] == 1.0 and math.isnan(row["p_value"])
    md, _ = _report(runs, tmp_path / "rep")
    assert "+1.0, same on every seed (3)" in md and "**+1.0" not in md


# -- 5. the CD diagram ---------------------------------------------------------------------------------


def _tied_analysis(tmp_path: Path):
    runs = tmp_path / "runs"
    for m, v in [("coop", 60.0), ("kgcoop", 60.0), ("taskres", 60.0), ("lora", 70.0)]:
        for j, d in enumerate(ELEVEN[:5]):
            _put(runs, m, d, 4, 1, v + j)
    _put(runs, "clap", "imagenet", 4, 1, 50.0)
    return rank_analysis(load_results(runs), BB, 4)


def test_cd_diagram_names_left_out_and_separates_tied_lines(tmp_path):
    a = _tied_analysis(tmp_path)
    assert a.excluded == ["clap"] and list(a.ranks.round(2)) == [1.0, 3.0, 3.0, 3.0]
    fig = plot_cd_diagram(a)
    ax = fig.axes[0]
    assert "Left out: CLAP" in ax.get_title()
    elbows = [line for line in ax.lines if len(line.get_xdata()) == 4]
    assert len(elbows) == 4
    tied_x = sorted(line.get_xdata()[2] for line in elbows if line.get_xdata()[0] == 3.0)
    assert len(tied_x) == 3 and min(np.diff(tied_x)) > 0.05  # three separate lines below the axis
    bars = [line for line in ax.lines if line.get_linewidth() == 3.0]
    group = [g for g in a.groups if "coop" in g][0]
    assert set(group) >= {"coop", "kgcoop", "taskres"}
    bar = [b for b in bars if min(b.get_xdata()) <= tied_x[0] and max(b.get_xdata()) >= tied_x[-1]]
    assert bar, "the clique bar must span every member's line"
    labels = {t.get_text(): t.get_color() for t in ax.texts if "(" in t.get_text()}
    colours = {tuple(line.get_xdata()[2:3]): line.get_color() for line in elbows}
    assert len(set(labels.values())) == 4 and set(labels.values()) == set(colours.values())


# -- 6. Wilcoxon: zero rule and exact / approximate ---------------------------------------------------


def test_wilcoxon_says_how_p_was_computed():
    x = [70.0, 71.0, 72.5, 60.0, 65.0, 80.0]
    y = [70.0, 70.2, 71.0, 61.0, 63.0, 77.0]  # one zero difference
    res = wilcoxon_pair(x, y)
    assert res["p_method"] == "exact (permutation)" and res["ties"] == 1
    assert res["p_value"] == pytest.approx(stats.wilcoxon(x, y).pvalue)
    assert res["p_value"] == pytest.approx(stats.wilcoxon(x, y, method=stats.PermutationMethod()).pvalue)
    a, b = np.array([1.0, 2.5, 3.7, 4.1]), np.array([0.5, 2.3, 4.6, 3.0])  # no zero, no tied |a - b|
    no_zero = wilcoxon_pair(a, b)
    assert no_zero["p_method"] == "exact"
    assert no_zero["p_value"] == pytest.approx(stats.wilcoxon(a - b, method="exact").pvalue)
    assert "without ties" not in (wilcoxon_pair.__doc__ or "")


def test_report_states_zero_rule_and_p_method(tmp_path):
    runs = tmp_path / "runs"
    for j, d in enumerate(ELEVEN[:6]):
        _put(runs, "lora", d, 4, 1, 70.0 + j)
        _put(runs, "coop", d, 4, 1, 70.0 + j + (0.0 if j == 0 else (-1) ** j * (j + 0.5)))
    md, _ = _report(runs, tmp_path / "rep")
    assert "zero differences dropped" in md and "| p from |" in md and "exact (permutation)" in md


# -- 7. degenerate Wilcoxon rows -----------------------------------------------------------------------


def test_wilcoxon_csv_and_markdown_hold_the_same_pairs(tmp_path):
    runs = tmp_path / "runs"
    for j, d in enumerate(ELEVEN[:3]):
        _put(runs, "lora", d, 4, 1, 70.0 + j)
        _put(runs, "coop", d, 4, 1, 68.0 + 2 * j)
    _put(runs, "clap", "imagenet", 4, 1, 50.0)  # shares one dataset with each: no test
    md, _ = _report(runs, tmp_path / "rep")
    wil = pd.read_csv(tmp_path / "rep" / "stats_wilcoxon.csv")
    assert len(wil) == 1 and wil.iloc[0]["n_datasets"] == 3
    assert "clap" not in set(wil["method_a"]) | set(wil["method_b"])
    section = md.split("Wilcoxon signed-rank tests across datasets:")[1].split("\n\n")[1]
    assert len([line for line in section.splitlines() if line.startswith("| ")]) == 1 + len(wil)


# -- 8. Figure 2 ---------------------------------------------------------------------------------------


def test_figure2_explains_band_and_keeps_identical_curves_visible(tmp_path):
    runs = tmp_path / "runs"
    for m in ["zero_shot", "tip_adapter", "lora"]:
        for k in (1, 2, 4):
            for s in (1, 2, 3):
                _put(runs, m, "dtd", k, s, 40.0 + s + (10 * k if m == "lora" else 0))
    fig = plot_shots_curves(load_results(runs), BB)
    assert "±1 sample std" in fig._suptitle.get_text()
    ax = fig.axes[0]
    points = [c for c in ax.collections if c.get_offsets().shape[0] == 3]
    xs = {tuple(np.round(c.get_offsets()[:, 0], 4)) for c in points}
    assert len(points) == 3 and len(xs) == 3  # same numbers, three visible sets of points
    legend = fig.legends[0]
    assert all(len(t.get_text()) < 30 for t in legend.get_texts())
    assert len({h.get_marker() for h in legend.legend_handles}) == 3  # one marker per method


def test_figure2_single_shot_count_has_error_bars(tmp_path):
    runs = tmp_path / "runs"
    for m in ["coop", "lora"]:
        for s in (1, 2, 3):
            _put(runs, m, "dtd", 4, s, 50.0 + 3 * s + (5 if m == "lora" else 0))
    fig = plot_shots_curves(load_results(runs), BB)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2 and "bars: ±1 sample std" in fig._suptitle.get_text()
    low, high = ax.get_xlim()
    assert low < 4 < high and high / low < 3  # a window around the one shot count


# -- 9. Pareto -----------------------------------------------------------------------------------------


def test_pareto_dominated_point_never_looks_like_a_front_point(tmp_path):
    runs = tmp_path / "runs"
    for m, t, v in [("coop", 10.0, 70.0), ("kgcoop", 100.0, 70.0), ("lora", 200.0, 80.0)]:
        _put(runs, m, "dtd", 16, 1, v, train_seconds=t)
    ax = plot_pareto(load_results(runs)).axes[0]
    by = {c.get_label(): c for c in ax.collections}
    front, dominated = by["CoOp"], by["KgCoOp"]
    assert dominated.get_alpha() < 1 and front.get_alpha() in (None, 1.0)
    assert dominated.get_sizes()[0] < front.get_sizes()[0] and by["CLIP-LoRA"].get_sizes()[0] == front.get_sizes()[0]


# -- 10. intervals outside [0, 100] -------------------------------------------------------------------


def test_t_interval_is_clipped_and_says_so(tmp_path):
    runs = tmp_path / "runs"
    for s, v in [(1, 51.0), (2, 63.0)]:
        _put(runs, "lora", "dtd", 1, s, v)
    md, _ = _report(runs, tmp_path / "rep")
    low, high = stats.ttest_1samp([51.0, 63.0], 0).confidence_interval(0.95)
    assert low < 0 and high > 100
    assert "57.0 ± 8.5 [0.0, 100.0]‡ (2)" in md and "clipped to [0, 100]" in md
    ci = pd.read_csv(tmp_path / "rep" / "stats_ci.csv").iloc[0]
    assert ci["ci_low"] == pytest.approx(low, rel=1e-5) and bool(ci["clipped"])


# -- B. which standard deviation -----------------------------------------------------------------------


def test_std_kind_is_chosen_and_labelled(tmp_path):
    runs = tmp_path / "runs"
    values = [70.0, 72.0, 77.0]
    for s, v in enumerate(values, 1):
        _put(runs, "lora", "dtd", 4, s, v)
    df = load_results(runs)
    sample, population = main_table(df, BB, 4), main_table(df, BB, 4, std="population")
    assert sample.at["lora", "dtd"].std == pytest.approx(np.std(values, ddof=1))
    assert population.at["lora", "dtd"].std == pytest.approx(np.std(values, ddof=0))
    assert "sample std (ddof=1)" in to_markdown(sample) and "population std (ddof=0)" in to_markdown(population)
    assert "population std (ddof=0)" in to_latex(population)
    md, _ = _report(runs, tmp_path / "rep", std="population")
    assert "mean ± population std (ddof=0)" in md and f"{np.std(values):.1f} (3)" in md


def test_cli_std_option(tmp_path, capsys):
    import fsbench.cli.report  # noqa: F401  (registers the command)
    from fsbench.cli import main

    runs = tmp_path / "runs"
    for s, v in [(1, 70.0), (2, 72.0)]:
        _put(runs, "lora", "dtd", 4, s, v)
    assert main(["report", "--results", str(runs), "--out", str(tmp_path / "o"), "--format", "md",
                 "--std", "population"]) == 0
    assert "population std" in (tmp_path / "o" / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", "--results", str(runs), "--out", str(tmp_path / "o"), "--std", "popluation"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'population'?" in err and "Traceback" not in err


# -- D. the 17-method folder ----------------------------------------------------------------------------


def test_synthetic_folder_reports_every_figure(tmp_path):
    runs = tmp_path / "runs"
    synthetic_store(runs, shots=(1, 4))
    notes: list[str] = []
    warnings: list[str] = []
    written = write_report(load_results(runs), tmp_path / "rep", "md,csv,png", notes=notes, warn=warnings.append)
    names = {p.name for p in written}
    assert {"fig2_shots_ViT-B-16.png", "cd_ViT-B-16_4shots.png", "pareto_accuracy_vs_time.png"} <= names
    assert len(warnings) == 1 and "clap ViT-B/16 dtd 4 shots seed 2" in warnings[0]
    a = rank_analysis(load_results(runs), BB, 4)
    assert len(a.ranks) + len(a.excluded) == 17 and a.n_datasets >= 9


# -- C. training curves ----------------------------------------------------------------------------------


def test_curve_recorder_downsamples_and_flags():
    from fsbench.curves import CurveRecorder, curve_problems

    rec = CurveRecorder()
    rec.start("train x")
    rec.losses([3.0 - i / 1000 for i in range(1000)], [0.1] * 1000)
    rec.validation(0.5)
    rec.start("train x")  # a second phase of the same name
    rec.losses([1.0, 2.0, float("nan"), 3.0], [None] * 4)
    out = rec.export()
    first, second = out["train x"], out["train x #2"]
    assert first["steps"] == 1000 and len(first["loss"]) == 256 and first["step"][-1] == 1000
    assert first["loss"][0] == pytest.approx(np.mean([3.0 - i / 1000 for i in range(4)]))
    assert (first["val_step"], first["val_acc"]) == ([1000], [0.5])
    assert second["nonfinite"] == 1 and second["loss"][2] is None and second["lr"] == [None] * 4
    assert curve_problems({"train x": first}) == []
    assert curve_problems(out) == ["train x #2: loss non-finite at 1 of 4 updates"]
    rising = {"p": {"steps": 3, "nonfinite": 0, "loss": [1.0, 1.5, 2.0], "step": [1, 2, 3]}}
    assert "ended higher" in curve_problems(rising)[0]


def test_old_results_without_curves_still_load(tmp_path):
    import json

    from fsbench.results import read_result_strict

    path = tmp_path / "shots4_seed1.json"
    old = {"method": "lora", "backbone": BB, "dataset": "dtd", "shots": 4, "seed": 1, "top1": 70.0,
           "schema_version": 2, "metrics": {"top1": 70.0}}
    path.write_text(json.dumps(old))
    assert read_result_strict(path).curves == {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_runner):
    """lora, tip_adapter_f, lp_plus_plus, linear_probe and zero_shot run through the runner (short)."""
    from fsbench.spec import RunSpec

    folder = tmp_path_factory.mktemp("curves")
    runner = make_runner(folder, ["lora.iters_per_shot=30", "tip_adapter_f.epochs=3", "lp_plus_plus.epochs=5",
                                  "linear_probe.max_iter=20", "linear_probe.search_steps=0"])
    results = {m: runner.run(RunSpec(m, "test-tiny", "synthetic", 2, 1))[0]
               for m in ("lora", "tip_adapter_f", "lp_plus_plus", "linear_probe", "zero_shot")}
    return folder / "results", results


def test_trained_methods_store_their_curves(trained):
    _, results = trained
    assert all(r.status == "ok" for r in results.values()), {m: r.error for m, r in results.items()}
    lora = results["lora"].curves["train lora"]
    assert lora["steps"] == 60 and len(lora["loss"]) == 60 and all(math.isfinite(v) for v in lora["loss"])
    assert lora["lr"][0] > lora["lr"][-1] > 0  # cosine decay
    tip = next(iter(results["tip_adapter_f"].curves.values()))
    assert len(tip["val_acc"]) == 3 and all(0 <= a <= 1 for a in tip["val_acc"])
    assert len(next(iter(results["lp_plus_plus"].curves.values()))["val_acc"]) == 5
    (name, lbfgs), = results["linear_probe"].curves.items()
    assert name.startswith("L-BFGS") and 1 <= lbfgs["steps"] <= 40
    assert results["zero_shot"].curves == {}


def test_report_draws_and_flags_curves(trained, tmp_path):
    import json

    root, results = trained
    path = next(root.rglob("lora/shots2_seed1.json"))
    data = json.loads(path.read_text())
    data["seed"], data["curves"]["train lora"]["loss"][-5:] = 2, [None] * 5  # a second seed that diverged
    data["curves"]["train lora"]["nonfinite"] = 5
    (path.parent / "shots2_seed2.json").write_text(json.dumps(data))
    md, _ = _report(root, tmp_path / "rep", "md,png")
    assert "## Training curves" in md
    assert "| test-tiny | 2 | CLIP-LoRA | synthetic | 2 | train lora: loss non-finite at 5 of 60 updates |" in md
    loss = results["lora"].curves["train lora"]["loss"]
    rose = np.mean(loss[-6:]) > np.mean(loss[:6])  # seed 1 as trained: flagged exactly when its loss rose
    assert ("| 1 | train lora: loss ended higher" in md) == rose
    assert (tmp_path / "rep" / "curves_test-tiny_synthetic_2shots.png").is_file()
    fig = plot_training_curves(load_results(root), "test-tiny", 2, "synthetic")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "CLIP-LoRA (flagged)" in titles  # its diverged seed
    assert {"Tip-Adapter-F", "Tip-Adapter-F (flagged)"} & set(titles)  # a panel per method, flagged by its curve


def test_train_epochs_records_a_non_finite_loss(tiny, synthetic):
    import torch

    from fsbench.errors import RunFailed
    from fsbench.method import Context
    from fsbench.training import train_epochs

    ctx = Context(tiny, synthetic, torch.device("cpu"), 1, 1)
    w = torch.nn.Parameter(torch.ones(2))
    calls = iter(range(100))

    def loss_fn(x, y):
        return (w ** 2).sum() * (float("nan") if next(calls) >= 3 else 1.0)

    with pytest.raises(RunFailed):
        train_epochs(ctx, torch.optim.SGD([w], lr=0.1), iter(lambda: (torch.zeros(1), torch.zeros(1)), None),
                     loss_fn, 5, 2, None, "train toy", amp=False)
    curve = ctx.curves.export()["train toy"]
    assert curve["steps"] == 4 and curve["nonfinite"] == 1 and curve["lr"] == [0.1] * 4
