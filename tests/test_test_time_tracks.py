"""The test-time and transductive tracks (issue 21), through the real runner (`fsbench sweep` / `run` / `report`
called in-process through `fsbench.cli.main`, as tests/test_open_protocols.py does).

- Recording methods (tests/plugins/recording_method.py) prove what a method is shown: unlabelled test images
  only under `test_time` and `transductive`, one at a time in the protocol's seeded order under `test_time`
  (the order of `shuffled_test`, part of the result's identity), the whole set at once under `transductive`,
  never a test label, and a fresh copy for each evaluation set and each dataset (synthetic and a generated
  CoOp-layout DTD, in one sweep).
- Every registered method whose `test_time` is not "none" runs under its protocol and stores its metrics.
- `fsbench sweep --protocols test_time,transductive` then `fsbench report` show both sections, the cost columns
  and the accuracy-vs-cost figure, all from protocol metadata.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datagen import make_coop_dataset

from fsbench.cli import main
from fsbench.data import load_dataset
from fsbench.method import METHODS
from fsbench.protocols import MS_PER_IMAGE, PROTOCOLS, SCORING_COST, SCORING_PEAK_MIB, class_set, shuffled_test
from fsbench.registry import load_plugin
from fsbench.report import write_report
from fsbench.report.protocols import cost_figures, cost_points, protocol_summary, protocol_view

PLUGINS = Path(__file__).parent / "plugins"
RECORDER = PLUGINS / "recording_method.py"
RECORDERS = ("test_time_recorder", "transductive_recorder")
HOOKS = ("logits", "online", "transductive")
FAST = [a for s in ("runtime.workers=0", "linear_probe.max_iter=20", "linear_probe.weight_decays=[0.01]")
        for a in ("--set", s)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, synthetic_root) -> Path:
    """A data root with `synthetic` and a generated CoOp-layout `dtd` (3 classes, 3 test images each)."""
    root = tmp_path_factory.mktemp("two_datasets")
    shutil.copytree(synthetic_root / "synthetic", root / "synthetic")
    make_coop_dataset(root, "dtd", counts=(2, 1, 3), shuffle_seed=0)
    return root


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, data_root) -> dict:
    """One sweep per protocol of both recorders on synthetic and dtd, seeds 1 and 2, in one results store;
    each protocol's events in its own log."""
    work = tmp_path_factory.mktemp("recorded")
    logs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for protocol in ("fewshot", "test_time", "transductive"):
            logs[protocol] = work / f"{protocol}.jsonl"
            mp.setenv("FSBENCH_RECORDER_LOG", str(logs[protocol]))
            code = main(["sweep", "--plugin", str(RECORDER), "--methods", ",".join(RECORDERS), "--protocols",
                         protocol, "--backbones", "test-tiny", "--datasets", "synthetic,dtd", "--shots", "1",
                         "--seeds", "1,2", "--data-root", str(data_root), "--device", "cpu", *FAST])
            assert code == 0, protocol
    return {"work": work, "events": {p: _events(f) for p, f in logs.items()}}


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _runs(events: list[dict]) -> list[tuple[dict, list[dict]]]:
    """The log cut into runs: each `fit` event with the evaluation events after it."""
    runs: list[tuple[dict, list[dict]]] = []
    for e in events:
        if e["event"] == "fit":
            runs.append((e, []))
        else:
            runs[-1][1].append(e)
    return runs


def _result(work: Path, method: str, dataset: str, protocol: str, seed: int) -> dict:
    folder = "" if protocol == "fewshot" else f"{protocol}/"  # few-shot results keep the layout of old stores
    return json.loads((work / f"results/runs/test-tiny/{dataset}/{method}/{folder}shots1_seed{seed}.json")
                      .read_text())


def _natural_keys(recorded: dict, dataset: str) -> list[str]:
    """Fingerprints of the dataset's test images in split order, as the inductive `fewshot` run scored them."""
    fit, evals = next(r for r in _runs(recorded["events"]["fewshot"]) if r[0]["dataset"] == dataset)
    return [k for e in evals for k in e["keys"]]


def test_runs_cover_both_methods_both_datasets_both_seeds(recorded):
    for protocol, events in recorded["events"].items():
        fits = {(f["method"], f["dataset"], f["seed"]) for f, _ in _runs(events)}
        assert fits == {(m, d, s) for m in RECORDERS for d in ("synthetic", "dtd") for s in (1, 2)}, protocol


def test_unlabelled_hooks_only_under_test_time_and_transductive(recorded):
    seen = {p: {(e["method"], e["event"]) for e in events if e["event"] != "fit"}
            for p, events in recorded["events"].items()}
    assert seen["fewshot"] == {(m, "logits") for m in RECORDERS}  # inductive: the plain scoring call only
    # test_time allows online use only: the transductive method scores inductively there
    assert seen["test_time"] == {("test_time_recorder", "online"), ("transductive_recorder", "logits")}
    # transductive allows both: each method uses its own hook, never the plain one
    assert seen["transductive"] == {("test_time_recorder", "online"), ("transductive_recorder", "transductive")}
    for method in RECORDERS:
        for protocol in ("fewshot", "test_time", "transductive"):
            result = _result(recorded["work"], method, "synthetic", protocol, 1)
            used = {e["event"] for e in recorded["events"][protocol] if e["method"] == method} - {"fit", "logits"}
            assert result["extra"].get("unlabelled_test_data", "none") == (used.pop() if used else "none")


def test_test_time_shows_one_image_at_a_time_in_the_seeded_order(recorded, data_root):
    synthetic = load_dataset("synthetic", data_root)
    natural = _natural_keys(recorded, "synthetic")
    assert len(natural) == len(synthetic.test) == len(set(natural))  # every test image once, told apart
    orders = {}
    for fit, evals in _runs(recorded["events"]["test_time"]):
        if fit["method"] != "test_time_recorder":
            continue
        n_test = len(load_dataset(fit["dataset"], data_root).test)
        assert [e["n"] for e in evals] == [1] * n_test  # batch of 1, the whole split, one pass
        assert [e["seen_before"] for e in evals] == list(range(n_test))  # one copy adapts through the pass
        if fit["dataset"] == "synthetic":
            orders[fit["seed"]] = [e["keys"][0] for e in evals]
    for seed, order in orders.items():
        expected = shuffled_test(synthetic, class_set(synthetic), seed, "test_time")
        assert order == [natural[i] for i in expected.positions]  # the protocol's order, image for image
    assert sorted(orders[1]) == sorted(orders[2]) and orders[1] != orders[2]  # same images, another order
    work = recorded["work"]
    ids = [_result(work, "test_time_recorder", "synthetic", "test_time", s)["identity"] for s in (1, 2)]
    assert ids[0]["order"] != ids[1]["order"]  # the order is part of the identity, per seed
    assert ids[0]["eval:synthetic/top1"] == ids[1]["eval:synthetic/top1"]  # the same test images: one cell
    whole = [_result(work, "transductive_recorder", "synthetic", "transductive", s)["identity"] for s in (1, 2)]
    assert whole[0]["eval:synthetic/top1"] == whole[1]["eval:synthetic/top1"] and "order" not in whole[0]


def test_the_seeds_of_a_test_time_cell_are_one_cell(recorded):
    """Two seeds are two orders of the same test images: the report averages them (it once split them as if
    they were different evaluation sets, `[cfg ...]`), and nothing is reported separately."""
    from fsbench.results import load_results

    warnings: list[str] = []
    df = load_results(recorded["work"] / "results", warn=warnings.append)
    online = df[df["protocol"] == "test_time"]
    assert len(online) == 2 * 2 * len(RECORDERS) and not warnings  # 2 datasets x 2 seeds x the recorders
    assert set(online["method"]) == set(RECORDERS)  # no "[cfg ...]" variants


def test_transductive_shows_each_whole_set_at_once(recorded, data_root):
    for fit, evals in _runs(recorded["events"]["transductive"]):
        if fit["method"] != "transductive_recorder":
            continue
        test = load_dataset(fit["dataset"], data_root).test
        assert len(evals) == 1 and evals[0]["n"] == len(test) and evals[0]["seen_before"] == 0
        if fit["dataset"] == "synthetic":
            assert evals[0]["keys"] == _natural_keys(recorded, "synthetic")


def test_a_fresh_copy_scores_each_set_and_each_dataset(recorded):
    for protocol in ("test_time", "transductive"):
        runs = _runs(recorded["events"][protocol])
        assert [f["dataset"] for f, _ in runs].count("dtd") == 4  # dtd runs after synthetic in the same process
        for fit, evals in runs:
            hooked = [e for e in evals if e["event"] != "logits"]
            if (protocol, fit["method"]) == ("test_time", "transductive_recorder"):
                continue  # scores inductively there (test_unlabelled_hooks_only_under_test_time_and_transductive)
            assert all(e["copy"] for e in hooked) and all(e["dataset"] == fit["dataset"] for e in evals)
            assert hooked and hooked[0]["seen_before"] == 0, (protocol, fit["method"], fit["dataset"])
    fewshot = [e for e in recorded["events"]["fewshot"] if e["event"] == "logits"]
    assert fewshot and not any(e["copy"] for e in fewshot)  # inductive: the fitted method itself scores


def test_two_evaluation_sets_get_two_fresh_copies(tmp_path, monkeypatch, synthetic_root):
    """`online_toy` (two halves of the test split) through `fsbench run`: the second set starts from nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSBENCH_RECORDER_LOG", str(tmp_path / "log.jsonl"))
    plugins = [a for p in ("protocol_online_toy.py", "recording_method.py") for a in ("--plugin", str(PLUGINS / p))]
    assert main(["run", *plugins, "--method", "test_time_recorder", "--protocol", "online_toy", "--backbone",
                 "test-tiny", "--dataset", "synthetic", "--shots", "1", "--seed", "1", "--workers", "0", "--device",
                 "cpu", "--data-root", str(synthetic_root)]) == 0
    online = [e for e in _events(tmp_path / "log.jsonl") if e["event"] == "online"]
    assert [e["seen_before"] for e in online] == list(range(50)) * 2 and all(e["copy"] for e in online)


def test_never_a_test_label(recorded, data_root):
    """Labels reach a method only in `fit`, for train/val images; the hooks get one float tensor of features."""
    for events in recorded["events"].values():
        for fit, evals in _runs(events):
            data = load_dataset(fit["dataset"], data_root)
            test_paths = {it.path for it in data.test}
            assert not (set(fit["train"]) | set(fit["val"])) & test_paths
            assert len(fit["train_labels"]) == len(fit["train"]) and len(fit["val_labels"]) == len(fit["val"])
            for e in evals:
                assert e["dtype"] == "torch.float32" and len(e["shape"]) == 2 and e["shape"][0] == e["n"]


def test_test_time_results_store_top1_ece_and_cost(recorded, data_root):
    for dataset in ("synthetic", "dtd"):
        r = _result(recorded["work"], "test_time_recorder", dataset, "test_time", 1)
        assert set(r["metrics"]) >= set(PROTOCOLS.get("test_time").metric_names)
        assert r["top1"] == r["metrics"]["top1"] and 0 <= r["top1"] <= 100 and 0 <= r["metrics"]["ece"] <= 100
        assert r["metrics"][MS_PER_IMAGE] > 0 and r["metrics"][SCORING_PEAK_MIB] > 0
        assert r["metrics"][SCORING_PEAK_MIB] * 2**20 <= r["peak_memory_bytes"]  # a part of the run's peak
        assert r["n_test"] == len(load_dataset(dataset, data_root).test)
        assert r["metrics"][MS_PER_IMAGE] / 1000 * r["n_test"] <= r["eval_seconds"]  # scoring within evaluation
    plain = _result(recorded["work"], "test_time_recorder", "synthetic", "transductive", 1)
    assert not {m.name for m in SCORING_COST} & set(plain["metrics"])  # only where the protocol records it


# ---- every registered test-time method, under its protocol ------------------------------------------------

BUILT_IN = [n for n in METHODS.names() if METHODS.get(n).test_time != "none"]
PROTOCOL_OF = {"online": "test_time", "transductive": "transductive"}


@pytest.mark.parametrize("name", BUILT_IN or list(RECORDERS))  # before any built-in exists: the recorders
def test_every_test_time_method_runs_under_its_protocol(name, tmp_path, monkeypatch, synthetic_root):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSBENCH_RECORDER_LOG", str(tmp_path / "log.jsonl"))
    load_plugin(RECORDER)  # the recorders, when they stand in (registered here, not at collection)
    mode = METHODS.get(name).test_time
    protocol = PROTOCOL_OF[mode]
    assert main(["run", "--plugin", str(RECORDER), "--method", name, "--protocol", protocol, "--backbone",
                 "test-tiny", "--dataset", "synthetic", "--shots", "1", "--seed", "1", "--workers", "0", "--device",
                 "cpu", "--data-root", str(synthetic_root)]) == 0
    r = _result(tmp_path, name, "synthetic", protocol, 1)
    assert r["status"] == "ok" and r["extra"]["unlabelled_test_data"] == mode
    assert r["n_test"] == len(load_dataset("synthetic", synthetic_root).test)
    for metric in PROTOCOLS.get(protocol).metric_names:
        value = r["metrics"][metric]
        assert value is not None and math.isfinite(value), metric
    assert 0 <= r["top1"] <= 100 and r["top1"] == r["metrics"]["top1"]


# ---- sweep and report, end to end ---------------------------------------------------------------------------


def test_sweep_then_report_shows_both_tracks(tmp_path, monkeypatch, synthetic_root, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--protocols", "test_time,transductive", "--methods", "zero_shot,linear_probe",
                 "--backbones", "test-tiny", "--datasets", "synthetic", "--shots", "1", "--seeds", "1",
                 "--data-root", str(synthetic_root), "--device", "cpu", *FAST]) == 0
    stored = {(p, m): _result(tmp_path, m, "synthetic", p, 1) for p in ("test_time", "transductive")
              for m in ("zero_shot", "linear_probe")}
    assert all(r["status"] == "ok" for r in stored.values())
    capsys.readouterr()
    assert main(["report", "--results", "results/runs", "--out", "report", "--format", "md,csv,tex,png,html"]) == 0
    terminal = capsys.readouterr().out
    assert "Test-time adaptation" in terminal and "Transductive" in terminal
    md = (tmp_path / "report/report.md").read_text()
    assert "## Test-time adaptation" in md and "## Transductive" in md
    assert "Not comparable with the inductive few-shot table" in md.split("## Transductive")[1]
    for metric in ("Top-1", "ECE ↓", "ms / image ↓", "Peak MiB ↓"):
        assert f"### Test-time adaptation, test-tiny, 1 shots: {metric}" in md
    zs = stored[("test_time", "zero_shot")]
    assert f"| Zero-shot CLIP | {zs['top1']:.2f} (1) |" in md
    assert f"| Zero-shot CLIP | {zs['metrics'][MS_PER_IMAGE]:.3g} (1) |" in md  # significant digits: µs to s
    for protocol in ("test_time", "transductive"):
        csv = pd.read_csv(tmp_path / f"report/{protocol}.csv")
        for method in ("zero_shot", "linear_probe"):
            cell = csv[(csv["method"] == method) & (csv["dataset"] == "synthetic") & (csv["metric"] == "top1")]
            assert cell["mean"].iloc[0] == pytest.approx(stored[(protocol, method)]["top1"], abs=1e-4)
    assert set(pd.read_csv(tmp_path / "report/test_time.csv")["metric"]) == {"top1", "ece", MS_PER_IMAGE,
                                                                              SCORING_PEAK_MIB}
    tex = (tmp_path / "report/tables.tex").read_text()
    assert "Test-time adaptation, test-tiny, 1 shots" in tex and "Transductive, test-tiny, 1 shots" in tex
    assert "ms / image $\\downarrow$" in tex
    page = (tmp_path / "report/report.html").read_text()
    assert "Test-time adaptation" in page and "Transductive" in page
    assert (tmp_path / "report/test_time_top1_vs_ms_per_image_test-tiny.png").is_file()


# ---- the accuracy-vs-cost figure, from protocol metadata ------------------------------------------------------


def _cost_rows(protocol: str, rng: random.Random) -> list[dict]:
    """Result rows of three methods on two datasets, two seeds; `tpt` lacks eurosat (a partial mean)."""
    rows = []
    for method, scale in (("zero_shot", 0.002), ("tda", 0.5), ("tpt", 80.0)):
        for dataset in ("dtd", "eurosat"):
            for seed in (1, 2):
                if method == "tpt" and dataset == "eurosat":
                    continue
                metrics = {"top1": rng.uniform(40, 70), "ece": rng.uniform(1, 10),
                           MS_PER_IMAGE: scale * rng.uniform(0.8, 1.2), SCORING_PEAK_MIB: rng.uniform(500, 900)}
                rows.append({"method": method, "backbone": "test-tiny", "dataset": dataset, "shots": 1, "seed": seed,
                             "status": "ok", "top1": metrics["top1"], "protocol": protocol, "source_dataset": None,
                             "metrics": metrics, "not_applicable": {}})
    return rows


def test_accuracy_vs_cost_points_are_the_methods_means_over_datasets():
    df = pd.DataFrame(_cost_rows("test_time", random.Random(0)))
    points = cost_points(protocol_summary(df, "test_time"), protocol_view("test_time", df), "test-tiny")
    assert sorted(points["method"]) == ["tda", "tpt", "zero_shot"]
    for p in points.itertuples(index=False):
        rows = df[df["method"] == p.method]
        per_dataset = {m: [np.mean([r[m] for r in rows[rows["dataset"] == d]["metrics"]]) for d in set(rows["dataset"])]
                       for m in ("top1", MS_PER_IMAGE)}
        assert p.acc == pytest.approx(np.mean(per_dataset["top1"])) and p.cost == pytest.approx(
            np.mean(per_dataset[MS_PER_IMAGE]))
        assert p.partial == (p.method == "tpt") and p.na == ""


def test_accuracy_vs_cost_figure_is_written_with_a_point_per_method(tmp_path):
    df = pd.DataFrame(_cost_rows("test_time", random.Random(1)) + _cost_rows("transductive", random.Random(2)))
    figures = dict(cost_figures(df, "test_time"))
    assert list(figures) == ["test_time_top1_vs_ms_per_image_test-tiny"]
    assert cost_figures(df, "transductive") == []  # no cost_plot in its metadata: no figure
    ax = figures["test_time_top1_vs_ms_per_image_test-tiny"].axes[0]
    drawn = [c.get_offsets() for c in ax.collections if len(c.get_offsets())]
    assert len(drawn) == 3 and ax.get_xscale() == "log"  # one point per method, a log cost axis
    written = write_report(df, tmp_path, "png")
    assert tmp_path / "test_time_top1_vs_ms_per_image_test-tiny.png" in written
    assert (tmp_path / "test_time_top1_vs_ms_per_image_test-tiny.png").stat().st_size > 0
