"""Tests parametrised over the protocol and dataset registries (as test_method_contract.py is over
methods), and the protocol plug-in of issue 19: a protocol registered by `--plugin` runs and its results
appear in every report output and in `fsbench ls protocols`.

The plug-in `tests/plugins/protocol_wholeval.py` is loaded when this module is collected, so every
registry-wide test below covers it too. Expected numbers are computed with numpy from the stored result
files, never through the report's own functions.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datagen import (
    COOP_LAYOUTS,
    imagenet_wnids,
    make_aircraft,
    make_coop_dataset,
    make_dg_target,
    make_imagefolder,
    make_imagenet,
    make_ood_set,
)

from fsbench.cli import main
from fsbench.data import DATASETS, DatasetSplits, load_dataset
from fsbench.method import METHODS, FewShotData, Method
from fsbench.protocols import PROTOCOLS, MetricInfo, Protocol, TableShape, make_protocol, metric_infos
from fsbench.registry import load_plugin
from fsbench.report import write_report
from fsbench.report.protocols import grid_latex, grid_markdown, grids_of, protocol_notes, protocol_summary
from fsbench.splits import draw_split

PLUGINS = Path(__file__).parent / "plugins"
PLUGIN = PLUGINS / "protocol_wholeval.py"
for _path in sorted(PLUGINS.glob("protocol_*.py")):  # every protocol plug-in written as a test fixture,
    load_plugin(_path)  # registered before the parametrised lists below are built
VAL_SEEN: list[int] = []


# ---- every protocol: its episode never mixes train, validation and test images ----------------------


def _paths(data: DatasetSplits, split: str, positions) -> list[str]:
    items = data.split(split)
    return [str(data.image_root / items[i].path) for i in positions]


@pytest.mark.parametrize("name", PROTOCOLS.names())
def test_episode_positions_are_disjoint_and_labelled(name, synthetic, tmp_path):
    make_coop_dataset(tmp_path, "dtd")  # a target for the protocols that evaluate on other datasets
    protocol = make_protocol(name, cross_targets=("dtd",), dg_targets=("dtd",), ood_targets=("dtd",))
    targets = {t: load_dataset(t, tmp_path) for t in protocol.targets(synthetic.name)}
    ep = protocol.episode(synthetic, draw_split(synthetic, 2, 1), targets)
    train, val = _paths(synthetic, ep.train_split, ep.train), _paths(synthetic, ep.val_split, ep.val)
    assert train and len(set(train)) == len(train) and not set(train) & set(val)
    for split, positions, labels in ((ep.train_split, ep.train, ep.train_targets),
                                     (ep.val_split, ep.val, ep.val_targets)):
        items = synthetic.split(split)
        assert [ep.classes.labels[t] for t in labels] == [items[i].label for i in positions]
    data = {synthetic.name: synthetic, **targets}
    assert ep.results and ep.results[0].dataset == synthetic.name
    for target in ep.results:
        for ev in target.evals:
            test = _paths(data[ev.dataset], "test", ev.positions)
            assert test and not set(test) & (set(train) | set(val)), (target.dataset, ev.metric)
            if not ev.labelled:  # OOD images: no label among the classes they are scored over
                assert not ev.targets
                continue
            assert [ev.classes.labels[t] for t in ev.targets] == [data[ev.dataset].test[i].label for i in ev.positions]


# ---- every dataset reader: its generated tree (tests/datagen.py) reads into valid splits ---------------

WNIDS = imagenet_wnids(6)


def _dg(name: str, classes: list[str]):
    def make(root: Path) -> None:
        make_imagenet(root, n_classes=6)
        make_dg_target(root, name, classes, classnames=WNIDS)
    return make


GENERATORS = {
    **{name: (lambda root, n=name: make_coop_dataset(root, n)) for name in COOP_LAYOUTS},
    "fgvc_aircraft": make_aircraft,
    "imagenet": make_imagenet,
    "imagefolder": lambda root: make_imagefolder(root, with_splits=True),
    "synthetic": lambda root: None,  # the reader generates it
    "imagenet_v2": _dg("imagenet_v2", [str(i) for i in range(6)]),
    "imagenet_sketch": _dg("imagenet_sketch", WNIDS),
    "imagenet_a": _dg("imagenet_a", WNIDS[1:4]),
    "imagenet_r": _dg("imagenet_r", WNIDS[2:5]),
    **{name: (lambda root, n=name: make_ood_set(root, n)) for name in
       ("ood_inaturalist", "ood_sun", "ood_places", "ood_textures")},
}


@pytest.mark.parametrize("name", list(DATASETS.aliases()))  # main names, not aliases
def test_every_dataset_reader_yields_valid_splits(name, tmp_path):
    assert name in GENERATORS, f"dataset {name!r} has no generated tree: add one to tests/datagen.py and here"
    GENERATORS[name](tmp_path)
    ds = load_dataset(name, tmp_path)
    assert ds.name == name and ds.classnames and ds.test
    paths = {s: [it.path for it in ds.split(s)] for s in ("train", "val", "test")}
    for split, items in paths.items():
        assert len(set(items)) == len(items), split
        assert {it.label for it in ds.split(split)} <= set(range(len(ds.classnames))), split
        assert all((ds.image_root / p).is_file() for p in items), split
    assert not set(paths["train"]) & set(paths["val"]) and not (set(paths["train"]) | set(paths["val"])) & set(
        paths["test"])
    if ds.train:  # a few-shot source: every class can be drawn
        assert {it.label for it in ds.train} == set(range(len(ds.classnames)))


# ---- every protocol's metadata renders its tables ---------------------------------------------------


def _records(protocol: type[Protocol], rng: random.Random, name: str | None = None) -> list[dict]:
    """Result rows (the `fsbench.load_results` columns that matter) of two methods on two datasets, two
    seeds, with a value for every declared metric; a source dataset when the protocol's results carry one."""
    rows = []
    for method in ("zero_shot", "coop"):
        for dataset in ("dtd", "eurosat"):
            for seed in (1, 2):
                metrics = {m.name: round(rng.uniform(30, 90), 3) for m in metric_infos(protocol)}
                rows.append({"method": method, "backbone": "test-tiny", "dataset": dataset, "shots": 4, "seed": seed,
                             "status": "ok", "top1": metrics.get(protocol.headline), "protocol": name or protocol.name,
                             "source_dataset": "imagenet" if protocol.source_result else None, "metrics": metrics,
                             "not_applicable": {}})
    return rows


@pytest.mark.parametrize("name", PROTOCOLS.names())
def test_metadata_renders_a_table(name):
    cls = PROTOCOLS.get(name)
    rows = _records(cls, random.Random(name))
    df = pd.DataFrame(rows)
    grids = grids_of(df, name)
    assert grids and all(g.rows for g in grids)
    text = "\n".join(f"### {g.title}\n{grid_markdown(g)}" for g in grids)
    labels = [m.label for m in metric_infos(cls)]
    assert all(label in text for label in labels) or len(labels) == 1  # in the header or the grid's title
    assert all(r"\toprule" in grid_latex(g) for g in grids)
    s = protocol_summary(df, name)
    plain = [m for m in metric_infos(cls) if m.seeds == "mean"]
    for info in plain:
        metric, spec = info.name, f".{info.digits}g" if info.digits else ".2f"
        values = [r["metrics"][metric] for r in rows if r["method"] == "coop" and r["dataset"] == "eurosat"]
        cell = s[(s["method"] == "coop") & (s["dataset"] == "eurosat") & (s["metric"] == metric)].iloc[0]
        assert cell["mean"] == pytest.approx(np.mean(values)) and cell["std"] == pytest.approx(np.std(values, ddof=1))
        shown = f"{np.mean(values):{spec}} ± {np.std(values, ddof=1):{spec}} (2)"
        assert shown in text


@pytest.mark.parametrize("name", PROTOCOLS.names())
def test_metadata_is_consistent(name):
    """What a protocol declares for reports names metrics it stores; `ls protocols` and the help show them."""
    cls = PROTOCOLS.get(name)
    infos = metric_infos(cls)
    names = [m.name for m in infos]
    assert cls.summary and cls.headline in cls.metric_names  # a title is optional: the name stands in
    assert set(names) == set(cls.metric_names) and len(names) == len(set(names))
    assert all(set(m.of) <= set(names) - {m.name} for m in infos)


class _Online(Protocol):
    """A protocol with metric names no report knows: only `metric_names`, no display metadata."""

    version = 1
    metric_names = ("acc_online", "acc_after_reset")
    headline = "acc_online"
    title = "Toy online adaptation"


def test_arbitrary_metric_names_get_tables(monkeypatch, tmp_path):
    """A registered protocol that declares only metric names, and a protocol not registered at all: both
    reach md, csv and tex; the unregistered one with its one-line note."""
    monkeypatch.setattr(_Online, "name", "toy_online")
    monkeypatch.setitem(PROTOCOLS._items, "toy_online", _Online)
    rng = random.Random(3)
    rows = _records(_Online, rng) + [{**r, "metrics": {"surprise": r["metrics"]["acc_online"], "ece": 1.0}}
                                     for r in _records(_Online, rng, "not_loaded")]
    write_report(pd.DataFrame(rows), tmp_path, "md,csv,tex")
    md, tex = (tmp_path / "report.md").read_text(), (tmp_path / "tables.tex").read_text()
    assert "## Toy online adaptation" in md and "Toy online adaptation, test-tiny, 4 shots: acc_after_reset" in md
    assert "## not_loaded" in md and "Protocol 'not_loaded' is not registered" in md
    assert md.count("is not registered") == 1 and protocol_notes(pd.DataFrame(rows)) == [
        next(line for line in md.splitlines() if "is not registered" in line).split(" Mean ± ")[0]]
    assert "acc\\_after\\_reset" in tex and "not\\_loaded" in tex
    online = pd.read_csv(tmp_path / "toy_online.csv")
    assert set(online["metric"]) == {"acc_online", "acc_after_reset"}
    generic = pd.read_csv(tmp_path / "not_loaded.csv")
    assert set(generic["metric"]) == {"surprise"}  # the engine's ece extras stay in the statistics section
    expected = np.mean([r["metrics"]["surprise"] for r in rows if r["protocol"] == "not_loaded"
                        and r["method"] == "zero_shot" and r["dataset"] == "dtd"])
    cell = generic[(generic["method"] == "zero_shot") & (generic["dataset"] == "dtd")].iloc[0]
    assert cell["mean"] == pytest.approx(expected, abs=1e-4)


def test_metric_metadata_is_checked():
    with pytest.raises(ValueError, match="harmonic-mean rule"):
        MetricInfo("hm", average="hm_of_averages")
    with pytest.raises(ValueError, match="seeds must be one of"):
        MetricInfo("x", seeds="median")
    with pytest.raises(ValueError, match="table columns"):
        TableShape(columns="rows")
    assert MetricInfo("ece", "ECE", higher_is_better=False).label == "ECE ↓"


# ---- the plug-in, end to end: fsbench run / report / ls with --plugin -----------------------------------


class ValRecorder(Method):
    """Records how many validation images `fit` is given, then scores like zero-shot (registered only
    during the test that uses it, so that no other test's list of methods holds it)."""

    input_kind = "features"
    paper = "test plugin"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        VAL_SEEN.append(len(val.items))
        self.weights = self.ctx.text_weights()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * x.float() @ self.weights.T


def test_plugin_protocol_runs_and_reaches_every_report_output(tmp_path, synthetic_root, synthetic, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ValRecorder, "name", "val_recorder")
    monkeypatch.setitem(METHODS._items, "val_recorder", ValRecorder)
    VAL_SEEN.clear()
    rc = main(["run", "--plugin", str(PLUGIN), "--protocol", "wholeval", "--method", "val_recorder,zero_shot",
               "--backbone", "test-tiny", "--dataset", "synthetic", "--shots", "2", "--seed", "1,2",
               "--workers", "0", "--data-root", str(synthetic_root), "--device", "cpu"])
    assert rc == 0
    assert VAL_SEEN == [len(synthetic.val)] * 2  # the whole val split, not min(K, 4) per class
    files = sorted((tmp_path / "results/runs").rglob("wholeval/*.json"))
    assert len(files) == 4
    stored = [json.loads(f.read_text()) for f in files]
    assert {r["protocol"] for r in stored} == {"wholeval"} and all(r["status"] == "ok" for r in stored)
    capsys.readouterr()

    assert main(["report", "--plugin", str(PLUGIN), "--results", "results/runs", "--out", "report",
                 "--format", "md,csv,tex"]) == 0
    assert "Few-shot, whole validation split" in capsys.readouterr().out  # the terminal shows its table too
    md, tex = (tmp_path / "report/report.md").read_text(), (tmp_path / "report/tables.tex").read_text()
    top1 = np.array([r["top1"] for r in stored if r["method"] == "zero_shot"])
    assert "## Few-shot, whole validation split" in md and "Validation on every image of the val split." in md
    assert f"| Zero-shot CLIP | {top1.mean():.2f} ± {top1.std(ddof=1):.2f} (2) |" in md
    assert "Few-shot, whole validation split, test-tiny, 2 shots" in tex
    csv = pd.read_csv(tmp_path / "report/wholeval.csv")
    cell = csv[(csv["method"] == "zero_shot") & (csv["dataset"] == "synthetic")].iloc[0]
    assert cell["mean"] == pytest.approx(top1.mean(), abs=1e-4) and cell["n"] == 2

    with monkeypatch.context() as unloaded:  # as if the plug-in was not loaded: still reported, with a note
        unloaded.delitem(PROTOCOLS._items, "wholeval")
        assert main(["report", "--results", "results/runs", "--out", "bare", "--format", "md"]) == 0
    assert "Protocol 'wholeval' is not registered" in capsys.readouterr().out.replace("\n", " ")
    assert "## wholeval" in (tmp_path / "bare/report.md").read_text()

    assert main(["ls", "protocols", "--plugin", str(PLUGIN)]) == 0
    out = capsys.readouterr().out
    assert "wholeval" in out and "top1 (Top-1)" in out
    assert main(["report", "--plugin", str(PLUGIN), "--help"]) == 0
    assert "wholeval: Few-shot, whole validation split (top1)" in capsys.readouterr().out.replace("\n", " ")


def test_docs_worked_example_is_the_plugin():
    """docs/protocols.md, "Add a protocol", shows exactly the file this module runs."""
    docs = (Path(__file__).parents[1] / "docs" / "protocols.md").read_text()
    block = re.search(r"<!-- protocol-plugin -->\n```python\n(.*?)```", docs, re.S)
    assert block and block.group(1) == PLUGIN.read_text()


@pytest.mark.parametrize("command", [["report"], ["ls", "protocols"], ["report", "--help"]])
def test_a_missing_plugin_file_is_one_line(command, tmp_path, capsys):
    assert main([*command, "--plugin", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: plugin file") and "nope.py" in err and "\n" not in err
