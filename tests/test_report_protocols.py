"""Report of the generalisation protocols (base-to-new, cross-dataset, domain generalisation).

The frame is built from generated result records with the fields of result schema 2 (protocol,
source_dataset, metrics, not_applicable, identity_hash), the columns `fsbench.load_results`
returns. Expected values are computed here with numpy from the raw numbers, never through the
report's own functions.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fsbench.report import write_report
from fsbench.report.protocols import (
    plot_base_new,
    protocol_csvs,
    protocol_latex,
    protocol_markdown,
    protocol_summary,
)
from fsbench.report.tables import main_table, summary
from fsbench.results import Result

ROOT = Path(__file__).resolve().parents[1]
B2N_DATASETS = ["eurosat", "imagenet", "dtd"]  # CoCoOp order: imagenet, dtd, eurosat
CROSS_TARGETS = ["ucf101", "caltech101", "eurosat"]  # CoCoOp order: caltech101, eurosat, ucf101
DG_TARGETS = ["imagenet_r", "imagenet_v2", "imagenet_sketch", "imagenet_a"]
SEEDS = [1, 2, 3]
NEW_NA = "linear_probe learns one weight vector per training class; it cannot score unseen classes"
TARGET_NA = "linear_probe's classifier covers the source's classes only"


def _record(method: str, dataset: str, seed: int, protocol: str, metrics: dict, *, shots: int = 16,
            source: str | None = None, na: dict | None = None, backbone: str = "ViT-B/16") -> dict:
    """One result as `fsbench.load_results` gives it (schema 2 fields added to `Result`'s)."""
    headline = {"fewshot": "top1", "base2new": "hm"}.get(protocol, "top1")
    row = asdict(Result(method, backbone, dataset, shots, seed, top1=metrics.get(headline), train_seconds=1.0))
    row.update(protocol=protocol, protocol_version=1, source_dataset=source, metrics=metrics,
               not_applicable=na or {}, identity={"method": method}, identity_hash=f"{method}-{seed}",
               schema_version=2)
    return row


def _hm(b: float, n: float) -> float:
    return 2 * b * n / (b + n)


def _base2new(rng: random.Random, raw: dict) -> list[dict]:
    """CoOp and zero-shot on every dataset (CoOp without DTD: a partial Average), a linear probe
    with New not applicable."""
    rows = []
    for method in ("zero_shot", "coop", "linear_probe"):
        for dataset in B2N_DATASETS:
            if (method, dataset) == ("coop", "dtd"):
                continue
            for seed in SEEDS:
                b, n = round(rng.uniform(60, 95), 3), round(rng.uniform(30, 80), 3)
                if method == "linear_probe":
                    rows.append(_record(method, dataset, seed, "base2new", {"base": b, "new": None, "hm": None},
                                        na={"new": NEW_NA, "hm": NEW_NA}))
                    raw.setdefault(("b2n", method, dataset), []).append((b, None))
                else:
                    rows.append(_record(method, dataset, seed, "base2new", {"base": b, "new": n, "hm": _hm(b, n)}))
                    raw.setdefault(("b2n", method, dataset), []).append((b, n))
    return rows


def _transfer(rng: random.Random, raw: dict) -> list[dict]:
    """Cross-dataset (CoOp with its own source result; LoRA's source from its few-shot runs) and
    domain generalisation, fitted on ImageNet, plus a linear probe that cannot transfer."""
    rows = []
    for protocol, targets in (("cross_dataset", CROSS_TARGETS), ("domain_generalisation", DG_TARGETS)):
        for method in ("coop", "lora", "linear_probe"):
            own_source = ["imagenet"] if method == "coop" and protocol == "cross_dataset" else []
            for dataset in own_source + targets:
                for seed in SEEDS[:2]:
                    if method == "linear_probe":
                        rows.append(_record(method, dataset, seed, protocol, {"top1": None}, source="imagenet",
                                            na={"top1": TARGET_NA}))
                        continue
                    top1 = round(rng.uniform(40, 90), 3)
                    rows.append(_record(method, dataset, seed, protocol, {"top1": top1}, source="imagenet"))
                    raw.setdefault((protocol, method, dataset), []).append(top1)
    return rows


def _fewshot(rng: random.Random, raw: dict) -> list[dict]:
    """Ordinary few-shot runs: the main table's rows (and the source cells of LoRA)."""
    rows = []
    for method in ("coop", "lora"):
        for dataset in ("imagenet", "dtd"):
            for seed in SEEDS:
                top1 = round(rng.uniform(50, 80), 3)
                rows.append(_record(method, dataset, seed, "fewshot", {"top1": top1, "ece": 2.0}))
                raw.setdefault(("fewshot", method, dataset), []).append(top1)
    return rows


@pytest.fixture(scope="module")
def records() -> tuple[list[dict], dict]:
    """The result records and the raw numbers they were made of."""
    rng, raw = random.Random(12), {}
    return _base2new(rng, raw) + _transfer(rng, raw) + _fewshot(rng, raw), raw


@pytest.fixture(scope="module")
def data(records) -> tuple[pd.DataFrame, dict]:
    return pd.DataFrame(records[0]), records[1]


def _cell(summary_: pd.DataFrame, method: str, dataset: str, metric: str, source: str = "") -> pd.Series:
    hit = summary_[(summary_["method"] == method) & (summary_["dataset"] == dataset)
                   & (summary_["metric"] == metric) & (summary_["source"] == source)]
    assert len(hit) == 1, (method, dataset, metric, len(hit))
    return hit.iloc[0]


def test_base2new_cells_match_numpy(data):
    df, raw = data
    s = protocol_summary(df, "base2new")
    for method in ("zero_shot", "coop"):
        base_means, new_means = [], []
        for dataset in B2N_DATASETS:
            pairs = raw.get(("b2n", method, dataset))
            if not pairs:
                continue
            b, n = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            base_means.append(b.mean())
            new_means.append(n.mean())
            assert _cell(s, method, dataset, "base")["mean"] == pytest.approx(b.mean())
            assert _cell(s, method, dataset, "base")["std"] == pytest.approx(b.std(ddof=1))
            assert _cell(s, method, dataset, "new")["n"] == 3
            h = _cell(s, method, dataset, "hm")  # CoCoOp: H of the mean Base and mean New
            assert h["mean"] == pytest.approx(_hm(b.mean(), n.mean()))
            assert h["std"] == pytest.approx(np.std([_hm(x, y) for x, y in zip(b, n, strict=True)], ddof=1))
        avg_b, avg_n = np.mean(base_means), np.mean(new_means)
        assert _cell(s, method, "average", "base")["mean"] == pytest.approx(avg_b)
        assert _cell(s, method, "average", "new")["mean"] == pytest.approx(avg_n)
        # the Average's H is H(Average Base, Average New), not the mean of the per-dataset H
        per_dataset_h = [_hm(b, n) for b, n in zip(base_means, new_means, strict=True)]
        assert _cell(s, method, "average", "hm")["mean"] == pytest.approx(_hm(avg_b, avg_n))
        assert abs(_hm(avg_b, avg_n) - np.mean(per_dataset_h)) > 1e-3
    assert _cell(s, "coop", "average", "base")["partial"] and not _cell(s, "zero_shot", "average", "base")["partial"]


def test_base2new_table_layout_and_not_applicable(data):
    df, raw = data
    md = protocol_markdown(df)
    section = md.split("## Cross-dataset")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Dataset | Method | Base | New | H |"
    groups = [line.split("|")[1].strip() for line in lines[1:] if line.split("|")[1].strip()]
    assert groups == ["Average", "ImageNet", "DTD", "EuroSAT"]  # CoCoOp's Table 1 order, Average first
    probe = [line for line in lines if "linear_probe" in line]
    assert len(probe) == 4  # the Average and three datasets
    for line in probe:
        base, new, h = (c.strip() for c in line.split("|")[3:6])
        assert new == "n/a" and h == "n/a" and base[0].isdigit()
    assert f"n/a: linear_probe (New, H): {NEW_NA}" in md
    assert "† CoOp: Average without DTD (no result)." in md
    b = np.array([p[0] for p in raw[("b2n", "linear_probe", "imagenet")]])
    assert f"{b.mean():.2f} ± {b.std(ddof=1):.2f} (3)" in section  # Base is still reported


def test_not_applicable_never_becomes_a_number(data):
    df, _ = data
    csvs = protocol_csvs(df)
    b2n = csvs["base2new.csv"]
    probe = b2n[(b2n["method"] == "linear_probe") & b2n["metric"].isin(["new", "hm"])]
    assert len(probe) == 8 and probe["mean"].isna().all() and (probe["na"] == NEW_NA).all()
    cross = csvs["cross_dataset.csv"]
    assert cross.loc[cross["method"] == "linear_probe", "mean"].isna().all()
    tex = protocol_latex(df)
    assert "n/a" in tex and r"$\pm$" in tex and r"\toprule" in tex and "linear\\_probe" in tex


def test_cross_dataset_table(data):
    df, raw = data
    s = protocol_summary(df, "cross_dataset")
    md = protocol_markdown(df).split("\n## Cross-dataset")[1].split("\n## Domain")[0]
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header == "| Method | Source: ImageNet | Caltech | EuroSAT | UCF | Average |"
    for method in ("coop", "lora"):
        means = [np.mean(raw[("cross_dataset", method, t)]) for t in CROSS_TARGETS]
        avg = _cell(s, method, "average", "top1", "imagenet")
        assert avg["mean"] == pytest.approx(np.mean(means)) and avg["n"] == 3  # the source is no target
        x = np.array(raw[("cross_dataset", method, "eurosat")])
        cell = _cell(s, method, "eurosat", "top1", "imagenet")
        assert cell["mean"] == pytest.approx(x.mean()) and cell["std"] == pytest.approx(x.std(ddof=1))
    own = _cell(s, "coop", "imagenet", "top1", "imagenet")
    assert not own["fallback"] and own["mean"] == pytest.approx(np.mean(raw[("cross_dataset", "coop", "imagenet")]))
    lora = _cell(s, "lora", "imagenet", "top1", "imagenet")  # no own source result: the few-shot runs
    assert lora["fallback"] and lora["mean"] == pytest.approx(np.mean(raw[("fewshot", "lora", "imagenet")]))
    assert "‡ Source column from the few-shot run" in md
    probe = next(line for line in md.splitlines() if line.startswith("| linear_probe"))
    assert [c.strip() for c in probe.split("|")[3:7]] == ["n/a"] * 4


def test_domain_generalisation_table(data):
    df, raw = data
    s = protocol_summary(df, "domain_generalisation")
    md = protocol_markdown(df).split("\n## Domain generalisation")[1]
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header == ("| Method | Source: ImageNet | ImageNet-V2 | ImageNet-Sketch | ImageNet-A | ImageNet-R "
                      "| Average |")
    for method in ("coop", "lora"):
        avg = _cell(s, method, "average", "top1", "imagenet")
        assert avg["mean"] == pytest.approx(np.mean([np.mean(raw[("domain_generalisation", method, t)])
                                                     for t in DG_TARGETS]))
        assert not avg["partial"]


def test_main_table_keeps_fewshot_rows_only(data, tmp_path):
    df, raw = data
    fewshot = df[df["protocol"] == "fewshot"]
    s = summary(df)
    assert set(s["method"]) == {"coop", "lora"} and set(s["shots"]) == {16}
    pd.testing.assert_frame_equal(s, summary(fewshot))  # the protocol rows change nothing
    table = main_table(df, "ViT-B/16", 16)
    assert table.at["coop", "dtd"].mean == pytest.approx(np.mean(raw[("fewshot", "coop", "dtd")]))
    write_report(df, tmp_path / "mixed", "csv")
    write_report(fewshot, tmp_path / "fewshot", "csv")
    for name in ("main_table.csv", "cost.csv"):
        assert (tmp_path / "mixed" / name).read_text() == (tmp_path / "fewshot" / name).read_text()
    legacy = fewshot.drop(columns=["protocol", "source_dataset", "metrics", "not_applicable"])
    pd.testing.assert_frame_equal(summary(legacy), s)  # schema 1 frames: all few-shot


def test_write_report_protocol_outputs(data, tmp_path):
    df, _ = data
    paths = {p.name for p in write_report(df, tmp_path, "md,csv,tex,png")}
    for name in ("base2new.csv", "cross_dataset.csv", "domain_generalisation.csv", "tables.tex",
                 "base2new_ViT-B-16_16shots.png", "report.md", "main_table.csv"):
        assert name in paths and (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "report.md").read_text()
    assert text.index("### ViT-B/16, 16 shots") < text.index("## Base-to-new generalisation")
    for title in ("## Cross-dataset transfer", "## Domain generalisation", "fitted on ImageNet"):
        assert title in text
    assert "Base-to-new generalisation, ViT-B/16" in (tmp_path / "tables.tex").read_text()
    only = df[df["protocol"] == "base2new"]  # no few-shot result at all still makes a report
    assert "base2new.csv" in {p.name for p in write_report(only, tmp_path / "only", "md,csv")}


def test_base_new_figure(data):
    df, _ = data
    fig = plot_base_new(df, "ViT-B/16", 16)
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == ["Average", "ImageNet", "DTD", "EuroSAT"]
    average = axes[0]
    points = [c.get_offsets()[0] for c in average.collections]
    assert len(points) == 2  # zero-shot and CoOp; the linear probe has no New and is only named
    assert any("n/a: linear_probe" in t.get_text() for t in average.texts)
    assert plot_base_new(df, "ViT-B/32", 16) is None


def test_result_files_of_schema_2_load(records, data, tmp_path):
    """The same records written as files at the schema's paths load into the same tables."""
    import fsbench.results as results

    if getattr(results, "SCHEMA_VERSION", 1) < 2:
        pytest.skip("fsbench.results does not write schema 2 yet")
    df, _ = data
    for row in records[0]:
        sub = "" if row["protocol"] in ("fewshot", "base2new") else f"-from-{row['source_dataset']}"
        proto = "" if row["protocol"] == "fewshot" else f"{row['protocol']}{sub}/"
        path = (tmp_path / results.slug(row["backbone"]) / row["dataset"] / row["method"] / proto
                / f"shots{row['shots']}_seed{row['seed']}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row))
    loaded = results.load_results(tmp_path)
    for protocol in ("base2new", "cross_dataset", "domain_generalisation"):
        ours, theirs = protocol_summary(loaded, protocol), protocol_summary(df, protocol)
        keys = ["method", "dataset", "metric", "source"]
        ours, theirs = (x.sort_values(keys, ignore_index=True)[keys + ["mean", "na"]] for x in (ours, theirs))
        pd.testing.assert_frame_equal(ours, theirs)


def test_protocol_report_never_imports_torch(data, tmp_path):
    path = tmp_path / "frame.pkl"
    data[0].to_pickle(path)
    code = ("import sys, pandas as pd\n"
            "from fsbench.report import write_report\n"
            f"write_report(pd.read_pickle({str(path)!r}), {str(tmp_path / 'out')!r}, 'md,csv,tex,png')\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_one_section_per_protocol_one_table_per_block():
    rows = [_record("coop", "eurosat", seed, "base2new", {"base": 80.0 + seed, "new": 60.0, "hm": None},
                    shots=shots, backbone=backbone)
            for backbone in ("ViT-B/16", "ViT-B/32") for shots in (4, 16) for seed in SEEDS]
    md = protocol_markdown(pd.DataFrame(rows))
    assert md.count("## Base-to-new generalisation\n") == 1 and md.count("### Base-to-new") == 4
    h = [_hm(80.0 + s, 60.0) for s in SEEDS]  # the files hold no H: computed per seed from B and N
    assert (f"| EuroSAT | CoOp | 82.00 ± 1.00 (3) | 60.00 ± 0.00 (3) | {_hm(82.0, 60.0):.2f} ± "
            f"{np.std(h, ddof=1):.2f} (3) |") in md
