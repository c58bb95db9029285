"""Issue 25: ImageNet variants matched to the source by wnid, the papers' cross-dataset / DG defaults,
and the last gaps to the official code (GDA, ProLIP, KgCoOp, PLOT++)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from datagen import imagenet_wnids, make_dg_target, make_imagenet

from fsbench.cli import main
from fsbench.data import load_dataset
from fsbench.errors import DataError
from fsbench.protocols import class_set, make_protocol
from fsbench.splits import FewShotSplit

WNIDS = imagenet_wnids(6)


def _imagenet_without(root: Path, wnid: str) -> None:
    """ImageNet with its 6 classes in classnames.txt but the class folders of `wnid` deleted."""
    make_imagenet(root, n_classes=6, n_train=3, n_val=1)
    for split in ("train", "val"):
        shutil.rmtree(root / "imagenet" / "images" / split / wnid)


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_variant_classes_follow_the_source_by_wnid(tmp_path: Path, name: str) -> None:
    """One ImageNet class absent: every variant class must still score against its own class."""
    _imagenet_without(tmp_path, WNIDS[2])
    make_dg_target(tmp_path, name, [WNIDS[1], WNIDS[3], WNIDS[4]])
    source, target = load_dataset("imagenet", tmp_path), load_dataset(name, tmp_path)
    nothing = FewShotSplit(source.name, 1, 1, (), ())
    episode = make_protocol("domain_generalisation", dg_targets=[name]).episode(source, nothing, {name: target})
    evaluated = episode.results[1].evals[0].classes
    rows = evaluated.rows_in(episode.classes)
    assert rows is not None
    assert [source.extra["wnids"][r] for r in rows] == target.extra["wnids"]
    assert [source.classnames[r] for r in rows] == target.classnames  # was 'class 4' scored as 'class 3'


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_v2"])
def test_variant_class_missing_from_the_source_is_one_line(tmp_path: Path, name: str) -> None:
    _imagenet_without(tmp_path, WNIDS[3])
    make_dg_target(tmp_path, name, [str(i) for i in range(6)] if name == "imagenet_v2" else WNIDS[1:5])
    source, target = load_dataset("imagenet", tmp_path), load_dataset(name, tmp_path)
    with pytest.raises(DataError) as excinfo:
        class_set(target, source)
    message = str(excinfo.value)
    assert "\n" not in message and WNIDS[3] in message and "1 of its" in message
    assert not any(w in message for w in WNIDS if w != WNIDS[3])


def test_variant_class_missing_exits_3(tmp_path: Path, capsys) -> None:
    _imagenet_without(tmp_path, WNIDS[3])
    make_dg_target(tmp_path, "imagenet_r", WNIDS[2:5])
    code = main(["run", "--method", "zero_shot", "--backbone", "test-tiny", "--dataset", "imagenet", "--shots", "1",
                 "--seed", "1", "--protocol", "domain_generalisation", "--set", 'study.dg_targets=["imagenet_r"]',
                 "--data-root", str(tmp_path), "--results", str(tmp_path / "results"), "--device", "cpu",
                 "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 3 and WNIDS[3] in err and "Traceback" not in err


def test_source_without_a_missing_class_keeps_imagenet_indices(tmp_path: Path) -> None:
    make_imagenet(tmp_path, n_classes=6, n_train=3, n_val=1)
    make_dg_target(tmp_path, "imagenet_a", [WNIDS[4], WNIDS[1]])
    source, target = load_dataset("imagenet", tmp_path), load_dataset("imagenet_a", tmp_path)
    assert class_set(target, source).labels == (1, 4) == tuple(target.extra["imagenet_labels"])


# --- cross_dataset / domain_generalisation: the papers' source and shots by default ----------------


def _specs(sets: list[str], **given) -> list:
    from fsbench.cli.run import expand
    from fsbench.config import BenchConfig, apply_sets

    cfg = apply_sets(BenchConfig(), ['study.protocols=["fewshot", "cross_dataset", "domain_generalisation"]',
                                     'study.datasets=["imagenet", "dtd"]', "study.shots=[1, 4, 16]", *sets])
    return expand(cfg, ["zero_shot"], ["ViT-B/16"], given.get("datasets"), given.get("shots"), [1])


def _episodes(specs: list, protocol: str) -> set[tuple[str, int]]:
    return {(s.dataset, s.shots) for s in specs if s.protocol == protocol}


def test_sweep_plans_transfer_protocols_as_the_papers() -> None:
    """CoCoOp's xd_train.sh: source ImageNet, 16 shots; the study's other datasets and K stay few-shot's."""
    specs = _specs([])
    assert _episodes(specs, "fewshot") == {(d, k) for d in ("imagenet", "dtd") for k in (1, 4, 16)}
    for protocol in ("cross_dataset", "domain_generalisation"):
        assert _episodes(specs, protocol) == {("imagenet", 16)}


def test_other_transfer_sources_and_shots_when_asked_for() -> None:
    specs = _specs(['study.transfer_sources=["dtd"]', "study.transfer_shots=[4]"])
    assert _episodes(specs, "cross_dataset") == {("dtd", 4)}
    assert _episodes(specs, "fewshot") == {(d, k) for d in ("imagenet", "dtd") for k in (1, 4, 16)}
    specs = _specs([], datasets=["pets"], shots=[2])  # flags name the runs of every protocol
    assert _episodes(specs, "cross_dataset") == _episodes(specs, "fewshot") == {("oxford_pets", 2)}


def test_sweep_dry_run_counts_the_papers_transfer_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_imagenet(tmp_path / "data", n_classes=3, n_train=40, n_val=1)  # 36 train + 4 val per class
    make_dg_target(tmp_path / "data", "imagenet_r", WNIDS[:2])
    code = main(["sweep", "--methods", "zero_shot", "--protocols", "fewshot,domain_generalisation", "--backbones",
                 "test-tiny", "--seeds", "1", "--set", 'study.datasets=["imagenet"]', "--set", "study.shots=[1,2]",
                 "--set", 'study.dg_targets=["imagenet_r"]', "--data-root", str(tmp_path / "data"), "--dry-run"])
    assert code == 0 and "3 runs to do" in capsys.readouterr().out  # fewshot K=1, 2; DG K=16


def test_transfer_tables_say_when_they_are_not_the_papers_setting() -> None:
    import pandas as pd

    from fsbench.report.protocols import protocol_grids
    from fsbench.results import Result

    rows = []
    for source, shots, dataset in (("imagenet", 16, "dtd"), ("dtd", 16, "eurosat"), ("imagenet", 4, "dtd")):
        row = vars(Result("coop", "ViT-B/16", dataset, shots, 1, top1=50.0))
        row.update(protocol="cross_dataset", source_dataset=source, metrics={"top1": 50.0}, not_applicable={})
        rows.append(row)
    titles = [grid.title for _, grid in protocol_grids(pd.DataFrame(rows))]
    assert len(titles) == 3
    paper = [t for t in titles if "not the papers' setting" not in t]
    assert paper == ["Cross-dataset transfer, ViT-B/16, 16 shots, fitted on ImageNet"]
    assert all("the papers fit on imagenet with 16 shots" in t for t in titles if t not in paper)


# --- GDA, ProLIP: the official ImageNet classifier and views; KgCoOp's DTD anchor -------------------

FISH = ("goldfish", "tench", "hen")


@pytest.mark.parametrize("dataset", ["imagenet", "dtd"])
def test_gda_imagenet_classifier_and_views_are_the_official(dataset: str, tiny, monkeypatch) -> None:
    """GDA datasets/imagenet.py:180-186,219 (7 templates) and :210 (crop scale 0.08-1); elsewhere the
    dataset's template and main_few_shots.py:25's scale 0.5-1."""
    from test_fidelity import build, classes, fewshot, recorded_prompts

    from fsbench.data.templates import IMAGENET_ENSEMBLE
    from fsbench.methods import gda

    train, val = fewshot(2, 3, tiny.embed_dim, 1), fewshot(2, 3, tiny.embed_dim, 2, "val")
    scales = []
    monkeypatch.setattr(gda, "augmented_views", lambda ctx, tr, views, scale, seed: scales.append(scale)
                        or torch.stack([tr.features] * views))
    method = build("gda", tiny, classes(dataset, FISH, "{} texture."), augment_views=2)
    prompts = recorded_prompts(tiny, monkeypatch)
    method.fit(train, val)
    used = {p for p in prompts if "tench" in p}
    if dataset == "imagenet":
        assert used == {t.format("tench") for t in IMAGENET_ENSEMBLE} and scales == [[0.08, 1.0]]
    else:
        assert used == {"tench texture."} and scales == [[0.5, 1.0]]
    assert method.config.crop_scale == scales[0]  # the resolved value is what the result records
    explicit = build("gda", tiny, classes(dataset, FISH), augment_views=2, crop_scale=[0.3, 1.0])
    explicit.fit(train, val)
    assert scales[-1] == [0.3, 1.0]


@pytest.mark.parametrize("dataset", ["imagenet", "dtd"])
def test_prolip_frozen_classifier_is_the_official(dataset: str, tiny, monkeypatch) -> None:
    """ProLIP datasets/imagenet.py:175-181, main_imagenet.py:144-145: the 7 templates on ImageNet."""
    from test_fidelity import build, classes, fewshot, recorded_prompts

    from fsbench.data.templates import IMAGENET_ENSEMBLE
    from fsbench.methods import prolip

    train = fewshot(2, 3, tiny.embed_dim, 1)
    width = tiny.model.visual.proj.shape[0]
    monkeypatch.setattr(prolip.ProLIP, "_support", lambda self, tr: torch.randn(len(tr.labels), 2, width))
    method = build("prolip", tiny, classes(dataset, FISH, "{} texture."), epochs=1, augment_views=2)
    prompts = recorded_prompts(tiny, monkeypatch)
    method.fit(train, fewshot(1, 3, tiny.embed_dim, 2, "val"))
    expected = {t.format("tench") for t in IMAGENET_ENSEMBLE} if dataset == "imagenet" else {"tench texture."}
    assert {p for p in prompts if "tench" in p} == expected


@pytest.mark.parametrize(("dataset", "template", "expected"), [
    ("dtd", "{} texture.", "a photo of a banded, a type of texture."),  # KgCoOp trainers/kgcoop.py:41
    ("oxford_pets", "a photo of a {}, a type of pet.", "a photo of a banded, a type of pet."),
])
def test_kgcoop_anchors_to_the_official_handcrafted_prompt(dataset, template, expected, tiny, monkeypatch) -> None:
    from test_fidelity import build, classes, fewshot, recorded_prompts

    method = build("kgcoop", tiny, classes(dataset, ("banded", "dotted"), template), epochs=1)
    prompts = recorded_prompts(tiny, monkeypatch)
    method.prepare(fewshot(1, 2, tiny.embed_dim, 1))
    assert [p for p in prompts if "banded" in p] == [expected]


def runner_for(tmp_path: Path, data_root: Path):
    """A CPU runner on `data_root` writing under `tmp_path`."""
    from fsbench.config import BenchConfig, Runtime
    from fsbench.engine import Runner

    rt = Runtime(data_root=str(data_root), results=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"),
                 device="cpu", workers=0)
    return Runner(BenchConfig(runtime=rt))


# --- PLOT++: stage 1 once, on seed 1, shared by every seed's stage 2 (main_visiononly.sh:18-20) -------


def _stage1_prompts(runner, monkeypatch, seeds, **config) -> tuple[dict[int, torch.Tensor], list[int]]:
    """The vision prompts stage 2 starts from in the runs of `seeds` (plot_pp, test-tiny, synthetic, K=2), and
    the seeds of the runs that trained a stage 1."""
    from collections import OrderedDict

    from fsbench.methods import plot_pp
    from fsbench.spec import RunSpec

    start, trained, real = {}, [], plot_pp.train_epochs

    def recording(ctx, opt, *args, **kwargs):
        if "stage 2" in args[-1]:
            start[ctx.seed] = opt.param_groups[0]["params"][1].detach().clone()
        else:
            trained.append(ctx.seed)
        return real(ctx, opt, *args, **kwargs)

    monkeypatch.setattr(plot_pp, "train_epochs", recording)
    monkeypatch.setattr(plot_pp, "_STAGE1", OrderedDict())  # nothing from other tests
    overrides = {"epochs": 1, "batch_size": 4, **config}
    for seed in seeds:
        runner.run_all(RunSpec("plot_pp", "test-tiny", "synthetic", 2, seed, overrides=overrides), force=True)
    return start, trained


def test_plot_pp_seeds_share_the_stage_1_of_seed_1(tmp_path, synthetic_root, monkeypatch) -> None:
    """main_visiononly.sh:18-20 trains stage 1 once (seed 1); main_joint.sh:7,45 starts seeds 1-3 from it."""
    from fsbench.methods import plot_pp

    runner = runner_for(tmp_path, synthetic_root)
    shared, trained = _stage1_prompts(runner, monkeypatch, (2, 3))
    assert torch.equal(shared[2], shared[3]) and trained == [2]  # trained once, then reused in this process
    monkeypatch.setattr(plot_pp, "_STAGE1", plot_pp.OrderedDict())
    fresh, trained = _stage1_prompts(runner, monkeypatch, (3, 1))  # recomputed in another process: the same
    assert torch.equal(fresh[3], shared[2]) and torch.equal(fresh[1], shared[2]) and trained == [3]
    own, trained = _stage1_prompts(runner, monkeypatch, (1, 2), stage1_seed=None)  # fsbench's earlier rule
    assert not torch.equal(own[1], own[2]) and trained == [1, 2]


def test_plot_pp_identity_records_the_stage_1_draw(tmp_path, synthetic_root) -> None:
    from fsbench.spec import RunSpec

    runner = runner_for(tmp_path, synthetic_root)
    prep = {s: runner.planner.prepare(RunSpec("plot_pp", "test-tiny", "synthetic", 2, s)) for s in (1, 2)}
    assert prep[2].reference.train == prep[1].split.train != prep[2].split.train
    ident = {s: p.identities["synthetic"] for s, p in prep.items()}
    assert ident[1]["reference"] == ident[2]["reference"] and ident[1]["fewshot"] != ident[2]["fewshot"]
    other_k = runner.planner.prepare(RunSpec("plot_pp", "test-tiny", "synthetic", 1, 2)).identities["synthetic"]
    assert other_k["reference"] != ident[2]["reference"]
    own = runner.planner.prepare(RunSpec("plot_pp", "test-tiny", "synthetic", 2, 2, overrides={"stage1_seed": None}))
    assert own.reference is None and "reference" not in own.identities["synthetic"]
    coop = runner.planner.prepare(RunSpec("coop", "test-tiny", "synthetic", 2, 2))
    assert "reference" not in coop.identities["synthetic"]
