"""The CLIP-LoRA paper's published numbers (results/reference/) and `fsbench report --compare paper`.

The shipped files must equal the project's shared transcription (../shared/reference next to the
clone, read-only in CI); the counts are checked without it. Expected deltas are computed here from
the CSV files read with the `csv` module, never through the report's own loaders.
"""

from __future__ import annotations

import csv
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fsbench.errors import ConfigError
from fsbench.report import compare_to_reference, load_reference, write_report
from fsbench.report.compare import (
    ablation_comparison,
    load_figure3,
    load_training_times,
    paper_backbone,
    parse_duration,
)
from fsbench.report.cost import paper_cost_table
from fsbench.results import Result, write_result

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "results" / "reference"
SHARED = ROOT.parent / "shared" / "reference"
FILES = ["clip_lora_paper_top1.csv", "clip_lora_paper_fig3.csv", "clip_lora_paper_training_time.csv"]
PAPER_METHODS = {"zero_shot", "coop_4ctx", "coop", "cocoop", "tip_adapter_f", "clip_adapter", "plot_pp", "kgcoop",
                 "taskres", "maple", "prograd", "lora"}
# how a user's results name the paper's backbones: open_clip's names and the paper's
OUR_BACKBONES = {"ViT-B/16": "ViT-B-16", "ViT-B/32": "ViT-B/32", "ViT-L/14": "ViT-L-14-quickgelu"}


def _rows(name: str) -> list[dict]:
    with open(REFERENCE / name, newline="") as fh:
        return list(csv.DictReader(fh))


def _record(method: str, backbone: str, dataset: str, shots: int, seed: int, top1: float, **kw) -> dict:
    return asdict(Result(method, backbone, dataset, shots, seed, top1=top1, **kw))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/reference (the shared transcription) is not next "
                                                "to this clone; the counts are still checked")
@pytest.mark.parametrize("name", FILES)
def test_shipped_files_equal_shared_transcription(name):
    ours, shared = (REFERENCE / name).read_bytes(), (SHARED / name).read_bytes()
    assert ours == shared, f"results/reference/{name} differs from ../shared/reference/{name}"


def test_every_published_top1_cell_is_there():
    rows = _rows("clip_lora_paper_top1.csv")
    assert len(rows) == 2016
    keys = {(r["backbone"], r["method"], r["dataset"], int(r["shots"])) for r in rows}
    assert len(keys) == 2016  # no cell twice
    assert {r["method"] for r in rows} == PAPER_METHODS and "lp_plus_plus" not in {r["method"] for r in rows}
    for backbone in ("ViT-B/16", "ViT-B/32", "ViT-L/14"):
        for method in PAPER_METHODS:
            for shots in ([0] if method == "zero_shot" else [1, 2, 4, 8, 16]):
                cells = [k for k in keys if k[0] == backbone and k[1] == method and k[3] == shots]
                assert len(cells) == 12, (backbone, method, shots)  # 11 datasets + Average
    averages = {k[:2] + k[3:]: float(r["top1"]) for r in rows for k in [(r["backbone"], r["method"], r["dataset"],
                                                                        int(r["shots"]))] if k[2] == "average"}
    for (backbone, method, shots), published in averages.items():
        values = [float(r["top1"]) for r in rows if (r["backbone"], r["method"], int(r["shots"])) ==
                  (backbone, method, shots) and r["dataset"] != "average"]
        assert abs(np.mean(values) - published) <= 0.1  # rounding of 11 cells and of the Average
    assert len(load_reference()) == 2016


def test_figure3_and_table1_files():
    rows = _rows("clip_lora_paper_fig3.csv")
    assert len(rows) == 387
    bars = [r for r in rows if r["figure"] == "Figure 3 (bar plot)"]
    assert len(bars) == 9 and {r["position"] for r in bars} == {"up", "bottom", "all"}
    fig3 = load_figure3()
    assert len(fig3) == 387 and fig3["assumed"].sum() == 9
    assert set(fig3["encoder"]) == {"vision", "text", "both"}
    assert set(fig3["matrices"]) == {"q", "k", "v", "o", "qv", "qkv", "qkvo"}
    assert sorted(set(fig3["rank"])) == [1, 2, 4, 8, 16, 32]
    times = load_training_times()
    assert dict(zip(times["method"], times["paper_seconds"], strict=True)) == {
        "coop": 2 * 3600, "plot_pp": 15.5 * 3600, "prograd": 3 * 3600 + 20 * 60, "lora": 50 * 60}
    assert parse_duration("1h05") == 3900 and parse_duration("7 min") == 420
    with pytest.raises(ConfigError):
        parse_duration("two hours")


@pytest.mark.parametrize("name,expected", [("ViT-B-16", "ViT-B/16"), ("vit_b32", "ViT-B/32"),
                                           ("ViT-L-14-quickgelu", "ViT-L/14"), ("test-tiny", None)])
def test_paper_backbone_names(name, expected):
    assert paper_backbone(name) == expected


@pytest.fixture(scope="module")
def every_cell() -> tuple[pd.DataFrame, dict]:
    """Two seeds for every published (non-Average) cell, on fsbench's spelling of each backbone."""
    rng = random.Random(13)
    rows, ours = [], {}
    for r in _rows("clip_lora_paper_top1.csv"):
        if r["dataset"] == "average":
            continue
        key = (r["backbone"], r["method"], r["dataset"], int(r["shots"]))
        values = [round(float(r["top1"]) + rng.uniform(-3, 3), 3) for _ in (1, 2)]
        ours[key] = values
        rows += [_record(key[1], OUR_BACKBONES[key[0]], key[2], key[3], seed, v) for seed, v in enumerate(values, 1)]
    return pd.DataFrame(rows), ours


def test_compare_shows_a_delta_for_every_published_cell(every_cell):
    df, ours = every_cell
    published = {(r["backbone"], r["method"], r["dataset"], int(r["shots"])): float(r["top1"])
                 for r in _rows("clip_lora_paper_top1.csv")}
    comparison = compare_to_reference(df, load_reference())
    assert len(comparison) == 2016
    assert set(comparison["backbone"]) == set(OUR_BACKBONES.values())
    paper_name = {v: k for k, v in OUR_BACKBONES.items()}
    for row in comparison.itertuples(index=False):
        key = (paper_name[row.backbone], row.method, row.dataset, row.shots)
        if row.dataset == "average":
            cells = [np.mean(v) for k, v in ours.items() if (k[0], k[1], k[3]) == (key[0], key[1], key[3])]
            expected = np.mean(cells) - published[key]
        else:
            expected = np.mean(ours[key]) - published[key]
        assert row.delta == pytest.approx(expected), key


def test_report_compare_paper_all_backbones(every_cell, tmp_path):
    df, _ = every_cell
    sub = df[df["shots"].isin([0, 4]) & df["method"].isin(["zero_shot", "coop_4ctx", "kgcoop", "lora"])]
    write_report(sub, tmp_path, "md,csv", compare="paper")
    text = (tmp_path / "report.md").read_text()
    for backbone in OUR_BACKBONES.values():
        block = text.split(f"### {backbone}, 4 shots")[1].split("###")[0]
        assert "Δ paper" in block and "CoOp (4)" in block and "KgCoOp" in block
    expected = [r for r in _rows("clip_lora_paper_top1.csv") if r["shots"] in ("0", "4")
                and r["method"] in ("zero_shot", "coop_4ctx", "kgcoop", "lora")]
    assert f"{len(expected)} of the 2,016 published cells have a reproduced number" in text
    compared = pd.read_csv(tmp_path / "compare_paper.csv")
    assert len(compared) == len(expected) == 3 * (12 + 3 * 12)  # every published cell of the blocks run


def _variant_runs(rng: random.Random) -> tuple[list[dict], dict]:
    """4-shot LoRA variants as `fsbench ablate` stores them: the sweep's label as the method, the
    variant in the config, the registered method in extra["base_method"]."""
    from fsbench.sweep.plan import variant_label

    variants = [(["v", "q"], 4, "all", "both"), (["q"], 1, "all", "vision"), (["q", "k", "v"], 2, "up", "both"),
                (["q", "k", "v"], 2, "all", "both"), (["q", "k", "v", "o"], 32, "all", "text")]
    rows, raw = [], {}
    for matrices, rank, position, encoder in variants:
        config = {"matrices": matrices, "rank": rank, "position": position, "encoder": encoder}
        label = variant_label("lora", config)
        for dataset in ("imagenet", "stanford_cars", "eurosat"):
            for seed in (1, 2):
                top1 = round(rng.uniform(60, 90), 3)
                rows.append(_record(label, "ViT-B-16", dataset, 4, seed, top1, config=config,
                                    extra={"base_method": "lora"}))
                raw.setdefault((label, dataset), []).append(top1)
    return rows, raw


def _published_fig3() -> dict:
    """(label, dataset, panel) -> number, with the README's mapping of names, bars at q, k, v, rank 2."""
    enc = {"vision": "vision", "text": "text", "vision+text": "both"}
    out = {}
    for r in _rows("clip_lora_paper_fig3.csv"):
        bar = r["matrices"] == "(not stated)"
        mats = "qkv" if bar else "".join(sorted(r["matrices"].replace("W", ""), key="qkvo".find))
        rank = "2" if bar else r["rank"]
        label = f"lora@{mats}-r{rank}-{r['position']}-{enc[r['encoder']]}"
        out[(label, r["dataset"], r["figure"])] = float(r["top1"])
    return out


def test_figure3_variant_deltas(tmp_path):
    rows, raw = _variant_runs(random.Random(5))
    df = pd.DataFrame(rows)
    published = _published_fig3()
    comparison = ablation_comparison(df, load_figure3())
    # 5 variants x 3 datasets, the default one twice (heat-map cell and "All" bar)
    assert len(comparison) == 18 and set(comparison["variant"]) == {r["method"] for r in rows}
    for row in comparison.itertuples(index=False):
        expected = np.mean(raw[(row.variant, row.dataset)]) - published[(row.variant, row.dataset, row.figure)]
        assert row.delta == pytest.approx(expected) and row.n == 2
    default = comparison[(comparison["variant"] == "lora@qkv-r2-all-both") & (comparison["dataset"] == "eurosat")]
    assert sorted(default["reference"]) == [84.9, 85.5]  # the paper's two EuroSAT numbers, both shown
    write_report(df, tmp_path, "md,csv", compare="paper")
    text = (tmp_path / "report.md").read_text()
    assert "### Figure 3 (LoRA ablations, 4 shots)" in text and "| lora@qv-r4-all-both | heat map |" in text
    assert "| lora@qkv-r2-up-both* | bars |" in text and "Figure 3's bars do not state" in text
    assert len(pd.read_csv(tmp_path / "compare_paper_figure3.csv")) == 18


def test_table1_beside_fsbench_training_time(tmp_path):
    seconds = {"coop": [700.0, 900.0, 800.0], "lora": [40.0, 60.0, 50.0]}
    rows = [_record(m, "ViT-B/16", "imagenet", 16, s, 70.0, train_seconds=t)
            for m, ts in seconds.items() for s, t in enumerate(ts, 1)]
    rows.append(_record("lora", "ViT-B/16", "dtd", 16, 1, 60.0, train_seconds=5.0))  # another cell: not used
    df = pd.DataFrame(rows)
    table = paper_cost_table(df, load_training_times()).set_index("method")
    assert table.at["lora", "train_seconds"] == np.median(seconds["lora"]) and table.at["lora", "runs"] == 3
    assert table.at["lora", "ratio"] == pytest.approx(np.median(seconds["lora"]) / 3000)
    assert table.at["coop", "train_seconds"] == np.median(seconds["coop"])
    assert np.isnan(table.at["plot_pp", "train_seconds"]) and table.at["plot_pp", "runs"] == 0
    tiny = _record("lora", "test-tiny", "imagenet", 16, 1, 1.0, train_seconds=0.5)  # not one of the paper's
    write_report(pd.concat([df, pd.DataFrame([tiny])], ignore_index=True), tmp_path, "md,csv", compare="paper")
    cost = (tmp_path / "report.md").read_text().split("## Cost")[1]
    assert "test-tiny |" not in cost.split("Table 1 of the paper")[1]
    assert "| CLIP-LoRA | 50 min. | ViT-B/16 | 3 | 50.0 s | 0.02× |" in cost
    assert "| PLOT++ | 15h30 | ViT-B/16 | 0 | – | – |" in cost
    assert "| CoOp | 2h | ViT-B/16 | 3 | 13.3 min | 0.11× |" in cost
    assert len(pd.read_csv(tmp_path / "cost_paper_table1.csv")) == 4


def test_cli_report_compare_paper(tmp_path, capsys):
    import fsbench.cli.report  # noqa: F401  (registers the command)
    from fsbench.cli import main

    runs = tmp_path / "runs"
    for backbone in ("ViT-B-16", "ViT-L/14"):
        for seed in (1, 2):
            write_result(runs, Result("coop_4ctx", backbone, "dtd", 2, seed, top1=55.0 + seed))
    assert main(["report", "--results", str(runs), "--out", str(tmp_path / "rep"), "--format", "md,csv",
                 "--compare", "paper"]) == 0
    compared = pd.read_csv(tmp_path / "rep" / "compare_paper.csv")
    published = {(r["backbone"], r["dataset"]): float(r["top1"]) for r in _rows("clip_lora_paper_top1.csv")
                 if r["method"] == "coop_4ctx" and r["shots"] == "2"}
    assert sorted(compared["backbone"]) == ["ViT-B-16", "ViT-L/14"]
    for row in compared.itertuples(index=False):
        assert row.delta == pytest.approx(56.5 - published[(paper_backbone(row.backbone), "dtd")])
    capsys.readouterr()
    assert main(["report", "--results", str(runs), "--out", str(tmp_path / "x"), "--compare",
                 str(tmp_path / "missing.csv")]) != 0
    err = capsys.readouterr().err.strip()
    assert "not found" in err and len(err.splitlines()) == 1


ISSUE22_FILES = ["prompt_methods_2025.csv", "clip_svd_readme_top1.csv", "gallop_readme_top1.csv"]


@pytest.mark.parametrize("name", ISSUE22_FILES)
def test_issue22_reference_files_load_and_name_registered_methods(name):
    """The issue-22 files (each method's own headline numbers) load as references, every row cites a
    source, and every method they name is registered (so `--compare` can meet a result of it)."""
    from fsbench.method import METHODS

    ref = load_reference(REFERENCE / name)
    assert not ref.empty and ref["source"].str.startswith("github.com/").all()
    assert set(ref["method"]) <= set(METHODS.names())
    assert set(ref["backbone"]) == {"ViT-B/16"}


def test_issue22_published_averages_are_consistent_as_printed():
    """Read with the csv module: DePT's printed H is the harmonic mean of its printed Base and New
    (to the printed 2 decimals), GalLoP's printed Average is the mean of its 11 datasets (to 1 decimal)."""
    b2n: dict[str, dict[str, float]] = {}
    for row in _rows("prompt_methods_2025.csv"):
        b2n.setdefault(row["method"], {})[row["metric"]] = float(row["top1"])
    assert {"promptsrc", "dept_coop", "dept_kgcoop", "dept_maple"} <= set(b2n)
    for method, m in b2n.items():
        assert 2 * m["base"] * m["new"] / (m["base"] + m["new"]) == pytest.approx(m["hm"], abs=0.006), method
    cells = {r["dataset"]: float(r["top1"]) for r in _rows("gallop_readme_top1.csv")}
    assert len(cells) == 12
    average = cells.pop("average")
    assert sum(cells.values()) / 11 == pytest.approx(average, abs=0.05)
