"""`fsbench report`: tables, figures, cost, comparison with the paper, CLI; all on CPU, no torch.

Expected values are computed here with numpy from the raw numbers the store is built from, never
through the report's own functions. Std is the sample std (ddof=1), as the report documents.
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fsbench.report import (
    compare_to_reference,
    cost_table,
    load_reference,
    main_table,
    plot_ablation,
    plot_average_curves,
    plot_pareto,
    plot_shots_curves,
    to_latex,
    to_markdown,
    write_report,
)
from fsbench.results import Result, load_results, write_result

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ["ViT-B/16", "ViT-B/32"]
DATASETS = ["dtd", "synthetic", "imagenet", "oxford_flowers"]  # paper order: imagenet, flowers, dtd
METHODS = ["lora", "coop", "my_method"]  # report order: coop, my_method (unknown), lora
SHOTS = [1, 4, 16]
SEEDS = [1, 2, 3]


def _seeds(backbone: str, method: str, dataset: str, shots: int) -> list[int]:
    """The gaps: CoOp never ran DTD on ViT-B/16 (partial Average); LoRA 4-shot Flowers on
    ViT-B/16 has one seed; ViT-B/32 LoRA 16-shot synthetic is missing (an empty cell)."""
    if backbone == "ViT-B/16" and method == "coop" and dataset == "dtd":
        return []
    if (backbone, method, dataset, shots) == ("ViT-B/16", "lora", "oxford_flowers", 4):
        return [1]
    if (backbone, method, dataset, shots) == ("ViT-B/32", "lora", "synthetic", 16):
        return []
    return SEEDS


def _build_store(root: Path) -> dict:
    """Write the store; return raw top-1 lists and costs keyed by (backbone, method, dataset, shots)."""
    rng = random.Random(0)
    raw: dict = {}
    lora_cfg = {"matrices": ["q", "k", "v"], "rank": 2, "position": "all", "encoder": "both"}
    for b in BACKBONES:
        for m in METHODS:
            for d in DATASETS:
                for k in SHOTS:
                    for s in _seeds(b, m, d, k):
                        top1 = round(40 + 8 * np.log2(k) + 5 * METHODS.index(m) + rng.uniform(-3, 3), 3)
                        cost = {"train_seconds": 10.0 * k * (1 + METHODS.index(m)) + s,
                                "peak_memory_bytes": (k + s) * 2**28, "trainable_params": 1000 * (1 + k),
                                "inference_overhead": METHODS.index(m) * 100}
                        write_result(root, Result(m, b, d, k, s, top1=top1, config=dict(lora_cfg)
                                                  if m == "lora" else {}, **cost))
                        raw.setdefault((b, m, d, k), []).append((top1, cost))
            write_result(root, Result("zero_shot", b, "oxford_flowers", 0, 1, top1=60.0 + len(b),
                                      train_seconds=0.0))
            raw[(b, "zero_shot", "oxford_flowers", 0)] = [(60.0 + len(b), {})]
    # failed runs never count, even with a number in them
    write_result(root, Result("coop", "ViT-B/16", "dtd", 4, 9, status="failed", top1=99.0, error="NaN"))
    write_result(root, Result("coop", "ViT-B/16", "imagenet", 4, 9, status="failed", error="OOM"))
    _ablations(root, rng)
    return raw


def _ablations(root: Path, rng: random.Random) -> None:
    """4-shot LoRA variants stored under their own labels, as an ablation runner may."""
    variants = [{"matrices": list(mats), "rank": r, "position": "all", "encoder": "both"}
                for mats in ("q", "v", "qv", "qkvo") for r in (2, 8)]
    variants += [{"matrices": ["q", "k", "v"], "rank": 2, "position": p, "encoder": "both"}
                 for p in ("bottom", "up")]
    variants += [{"matrices": ["q", "k", "v"], "rank": 2, "position": "all", "encoder": e}
                 for e in ("vision", "text")]
    for cfg in variants:
        label = "lora_{}_r{}_{}_{}".format("".join(cfg["matrices"]), cfg["rank"], cfg["position"],
                                           cfg["encoder"])
        for d in ("imagenet", "dtd"):
            write_result(root, Result(label, "ViT-B/16", d, 4, 1, top1=60 + rng.uniform(0, 5), config=cfg))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("runs")
    return root, _build_store(root)


@pytest.fixture(scope="module")
def df(store):
    return load_results(store[0])


def _tops(raw: dict, key: tuple) -> np.ndarray:
    return np.array([t for t, _ in raw.get(key, [])])


def _expected_block(raw: dict, backbone: str, shots: int) -> dict:
    """numpy: per (method, dataset) mean, std (ddof=1), n; per method average and partial flag."""
    cells, avgs = {}, {}
    datasets = {d for (b, m, d, k) in raw if b == backbone and k == shots}
    for m in {m for (b, m, d, k) in raw if b == backbone and k == shots}:
        means = []
        for d in datasets:
            x = _tops(raw, (backbone, m, d, shots))
            if len(x):
                cells[(m, d)] = (x.mean(), x.std(ddof=1) if len(x) > 1 else None, len(x))
                means.append(x.mean())
        avgs[m] = (np.mean(means), len(means) < len(datasets))
    return {"cells": cells, "avgs": avgs, "datasets": datasets}


@pytest.mark.parametrize("backbone,shots", [("ViT-B/16", 4), ("ViT-B/32", 16), ("ViT-B/16", 1)])
def test_main_table_matches_numpy(df, store, backbone, shots):
    exp = _expected_block(store[1], backbone, shots)
    table = main_table(df, backbone, shots)
    assert list(table.columns) == ["imagenet", "oxford_flowers", "dtd", "synthetic", "average"]
    assert list(table.index) == ["coop", "my_method", "lora"]
    for (m, d), (mean, std, n) in exp["cells"].items():
        cell = table.at[m, d]
        assert cell.mean == pytest.approx(mean) and cell.n == n
        assert (cell.std is None) if std is None else cell.std == pytest.approx(std)
    for m, (avg, partial) in exp["avgs"].items():
        assert table.at[m, "average"].mean == pytest.approx(avg)
        assert table.at[m, "average"].partial == partial
    for d in exp["datasets"]:  # best = highest displayed (1-decimal) mean of the column
        shown = {m: round(v[0], 1) for (m, dd), v in exp["cells"].items() if dd == d}
        assert {m for m in table.index if table.at[m, d].best} == {
            m for m, v in shown.items() if v == max(shown.values())}


def test_gaps_single_seed_missing_and_partial_average(df):
    b16 = main_table(df, "ViT-B/16", 4)
    md = to_markdown(b16)
    assert "(1)" in b16.at["lora", "oxford_flowers"].text() and "±" not in b16.at["lora", "oxford_flowers"].text()
    coop_row = next(line for line in md.splitlines() if line.startswith("| CoOp"))
    assert coop_row.split("|")[4].strip() == "–"  # DTD column of CoOp
    assert coop_row.rstrip(" |").endswith("†") and "† CoOp: Average over 3 of 4 datasets (missing DTD)" in md
    b32 = main_table(df, "ViT-B/32", 16)
    assert b32.at["lora", "synthetic"].empty and b32.at["lora", "average"].partial



def test_failed_runs_ignored(store):
    with_failed = load_results(store[0], include_failed=True)
    assert (with_failed["status"] == "failed").sum() == 2
    table = main_table(with_failed, "ViT-B/16", 4)
    assert table.at["coop", "dtd"].empty  # the failed run's 99.0 does not count
    assert table.at["coop", "imagenet"].n == 3


def test_bold_markdown_and_latex(df, store):
    table = main_table(df, "ViT-B/16", 16)
    best = [(m, d) for m in table.index for d in table.columns if table.at[m, d].best]
    md, tex = to_markdown(table), to_latex(table)
    assert best and all(f"**{table.at[m, d].text()}**" in md for m, d in best if d != "average")
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"\textbf{" in tex
    assert "--" in tex and r"$\pm$" in tex and r"$^\dagger$" in tex
    assert "ImageNet" in md and "Flowers" in md and "synthetic" in md  # paper names, unknown kept


def test_cost_table_medians(df, store):
    raw = store[1]
    table = cost_table(df)
    assert set(table["dataset"]) == {"imagenet"} and set(table["shots"]) == {16}
    row = table[(table["backbone"] == "ViT-B/16") & (table["method"] == "coop")].iloc[0]
    costs = [c for _, c in raw[("ViT-B/16", "coop", "imagenet", 16)]]
    assert row["train_seconds"] == pytest.approx(np.median([c["train_seconds"] for c in costs]))
    assert row["peak_memory_gib"] == pytest.approx(np.median([c["peak_memory_bytes"] for c in costs]) / 2**30)
    assert row["trainable_params"] == 17000 and row["inference_overhead"] == 100 and row["runs"] == 3


def test_compare_to_paper_delta(df, store):
    with open(ROOT / "results" / "reference" / "clip_lora_paper_top1.csv") as fh:
        paper = {(r["backbone"], r["method"], r["dataset"], int(r["shots"])): float(r["top1"])
                 for r in csv.DictReader(fh)}
    comparison = compare_to_reference(df, load_reference())
    for key in [("ViT-B/16", "lora", "oxford_flowers", 16), ("ViT-B/16", "zero_shot", "oxford_flowers", 0)]:
        b, m, d, k = key
        row = comparison[(comparison["backbone"] == b) & (comparison["method"] == m)
                         & (comparison["dataset"] == d) & (comparison["shots"] == k)]
        assert len(row) == 1
        assert row["delta"].iloc[0] == pytest.approx(_tops(store[1], key).mean() - paper[key])
    # an Average reference row compares with complete Averages only; spelling of backbone is free
    ref = pd.DataFrame([{"source": "t", "table": "t", "backbone": "vit-b-16", "method": "lora",
                         "dataset": "average", "shots": 4, "top1": 50.0}])
    exp = _expected_block(store[1], "ViT-B/16", 4)["avgs"]["lora"][0]
    assert compare_to_reference(df, ref)["delta"].iloc[0] == pytest.approx(exp - 50.0)


def test_figures_return_none_without_data(df):
    assert plot_ablation(df[df["backbone"] == "ViT-B/32"]) is None  # no ablation runs there
    assert plot_average_curves(df[df["backbone"] == "ViT-B/16"]) is None  # needs two backbones
    for fig in (plot_shots_curves(df, "ViT-B/16"), plot_ablation(df), plot_pareto(df)):
        assert fig is not None and len(fig.axes) >= 1


def test_write_report_all_formats(df, tmp_path):
    notes: list[str] = []
    paths = write_report(df, tmp_path, "md,csv,tex,png,pdf", compare="paper", notes=notes)
    names = {p.name for p in paths}
    for name in ["report.md", "main_table.csv", "cost.csv", "compare_paper.csv", "tables.tex",
                 "fig2_shots_ViT-B-16.png", "fig2_shots_ViT-B-32.pdf", "fig2_shots_average.png",
                 "fig3_ablation_ViT-B-16.png", "fig3_ablation_ViT-B-16.pdf", "pareto_accuracy_vs_time.png",
                 "pareto_accuracy_vs_time.pdf"]:
        assert name in names and (tmp_path / name).stat().st_size > 0, name
    assert any("ViT-B/32" in n and "Figure 3" in n for n in notes)  # skipped with a note
    text = (tmp_path / "report.md").read_text()
    assert "Δ paper" in text and "lora_q_r2" not in text  # ablation variants stay out of the table
    assert "## ViT-B/16" in text and "### ViT-B/16, 0 shots" in text


def test_cli_report(store, tmp_path, capsys):
    import fsbench.cli.report  # noqa: F401  (registers the command even before commands.py lists it)
    from fsbench.cli import main

    out = tmp_path / "rep"
    assert main(["report", "--results", str(store[0]), "--out", str(out), "--format", "md,csv",
                 "--compare", "paper", "--backbone", "ViT-B/16"]) == 0
    assert (out / "report.md").exists() and (out / "main_table.csv").exists()
    capsys.readouterr()
    assert main(["report", "--results", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert main(["report", "--results", str(tmp_path / "empty")]) != 0
    err = capsys.readouterr().err.strip()
    assert "no finished results" in err and len(err.splitlines()) == 1


def test_report_never_imports_torch(store, tmp_path):
    code = (
        "import sys\n"
        "import fsbench.report, fsbench.cli.report\n"
        "from fsbench.cli import main\n"
        f"rc = main(['report', '--results', {str(store[0])!r}, '--out', {str(tmp_path)!r},"
        " '--format', 'md,csv']); assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env_path = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
