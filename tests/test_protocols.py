"""Protocols (base-to-new, cross-dataset, domain generalisation) on the protocol-aware core: the class
split is CoCoOp's, nothing of the evaluated side reaches `fit`, metrics are computed from the per-set
accuracies, every method runs or says why it cannot, and the test features are shared with few-shot."""

from __future__ import annotations

import math

import pytest
import torch
from datagen import imagenet_wnids, make_coop_dataset, make_dg_target, make_imagenet

from fsbench.config import BenchConfig, Runtime, apply_sets
from fsbench.data import load_dataset
from fsbench.engine import Runner
from fsbench.method import METHODS, FewShotData, Method, register_method, zero_shot_weights
from fsbench.protocols import PROTOCOLS, base_new_labels, class_set, harmonic_mean
from fsbench.spec import RunSpec
from fsbench.splits import FewShotSplit

FAST = {"linear_probe": {"weight_decays": [1e-3]}, "lora": {"iters_per_shot": 2, "batch_size": 8},
        "peft": {"iters_per_shot": 2, "batch_size": 8}, "coop": {"epochs": 1}, "cocoop": {"epochs": 1},
        "coop_4ctx": {"epochs": 1}, "kgcoop": {"epochs": 1}, "prograd": {"epochs": 1},
        "clip_adapter": {"epochs": 2, "ratio": 0.2}, "tip_adapter_f": {"epochs": 1}, "taskres": {"epochs": 2},
        "lp_plus_plus": {"epochs": 2}, "clap": {"epochs": 2}, "prolip": {"epochs": 2},
        "maple": {"epochs": 1}, "plot_pp": {"epochs": 1}}
SEEN: dict[str, list] = {}


@register_method("recorder")
class Recorder(Method):
    """Records what `fit` is given (images, labels, class names), then scores like zero-shot."""

    input_kind = "features"
    paper = "test plugin"

    def fit(self, train: FewShotData, val: FewShotData) -> None:
        SEEN.setdefault("paths", []).extend(str((train.image_root / it.path).resolve())
                                            for it in train.items + val.items)
        SEEN.setdefault("labels", []).extend(train.labels.tolist() + val.labels.tolist())
        SEEN.setdefault("classes", []).extend(self.ctx.classnames)
        SEEN["fits"] = SEEN.get("fits", 0) + 1
        self.weights = self.ctx.text_weights()

    def retarget(self) -> None:
        self.weights = self.ctx.text_weights()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return 100.0 * x.float() @ self.weights.T


def runner_for(tmp_path, data_root, sets=()) -> Runner:
    rt = Runtime(data_root=str(data_root), results=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"),
                 device="cpu", workers=0)
    return Runner(apply_sets(BenchConfig(runtime=rt), list(sets)))


@pytest.mark.parametrize("n", [2, 3, 10, 37, 47, 100, 101, 102, 196, 397, 1000])
def test_class_split_is_cocoops(n):
    """CoCoOp's `subsample_classes` (CoOp datasets/oxford_pets.py): labels sorted, m = ceil(n/2)."""
    labels = sorted(set(range(n)))
    m = math.ceil(len(labels) / 2)
    base, new = base_new_labels(n)
    assert base == labels[:m] and new == labels[m:]


def test_base2new_episode_holds_only_base_classes(tmp_path):
    classes = ("a", "b", "c", "d", "e")
    make_coop_dataset(tmp_path, "dtd", classes=classes, counts=(2, 1, 2))
    data = load_dataset("dtd", tmp_path)
    draw = FewShotSplit(data.name, 1, 1, tuple(range(len(data.train))), tuple(range(len(data.val))))
    ep = PROTOCOLS.get("base2new")().episode(data, draw, {})
    assert ep.classes.names == tuple(data.classnames[:3])
    assert {data.train[i].label for i in ep.train} == {0, 1, 2}
    base, new = ep.results[0].evals
    assert base.classes.names == tuple(data.classnames[:3]) and new.classes.names == tuple(data.classnames[3:])
    assert {data.test[i].label for i in new.positions} == {3, 4} and set(new.targets) == {0, 1}


def test_base2new_never_shows_new_classes_to_fit(tmp_path, synthetic_root, synthetic):
    SEEN.clear()
    runner = runner_for(tmp_path, synthetic_root)
    (result,), _ = runner.run_all(RunSpec("recorder", "test-tiny", "synthetic", 2, 1, protocol="base2new"))
    base, new = base_new_labels(len(synthetic.classnames))
    new_names = {synthetic.classnames[c] for c in new}
    new_paths = {str((synthetic.image_root / it.path).resolve()) for split in ("train", "val", "test")
                 for it in synthetic.split(split) if it.label in new}
    assert SEEN["paths"] and not new_paths & set(SEEN["paths"])
    assert not new_names & set(SEEN["classes"]) and max(SEEN["labels"]) < len(base)
    b, n = result.metrics["base"], result.metrics["new"]
    assert result.metrics["hm"] == pytest.approx(2 * b * n / (b + n)) == result.top1
    assert (tmp_path / "results/test-tiny/synthetic/recorder/base2new/shots2_seed1.json").is_file()


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(50.0, None) is None


def test_zero_shot_under_base2new_equals_zero_shot_restricted(tmp_path, synthetic_root, synthetic, tiny):
    runner = runner_for(tmp_path, synthetic_root)
    (result,), _ = runner.run_all(RunSpec("zero_shot", "test-tiny", "synthetic", 1, 1, protocol="base2new"))
    feats = runner.executor.features.split(tiny, synthetic, "test")
    for metric, labels in zip(("base", "new"), base_new_labels(len(synthetic.classnames)), strict=True):
        names = [synthetic.classnames[c] for c in labels]
        weights = zero_shot_weights(tiny, names, synthetic.templates, torch.device("cpu"))
        keep = torch.tensor([int(y) in labels for y in feats.y])
        pred = (feats.x[keep] @ weights.T).argmax(-1)
        truth = torch.tensor([labels.index(int(y)) for y in feats.y[keep]])
        assert result.metrics[metric] == pytest.approx(100.0 * (pred == truth).float().mean().item())


def test_base2new_after_fewshot_encodes_no_test_image_again(tmp_path, synthetic_root):
    runner = runner_for(tmp_path, synthetic_root)
    runner.run_all(RunSpec("linear_probe", "test-tiny", "synthetic", 2, 1), )
    before = runner.executor.features.encoded_images
    runner.run_all(RunSpec("zero_shot", "test-tiny", "synthetic", 2, 1, protocol="base2new"))
    runner.run_all(RunSpec("linear_probe", "test-tiny", "synthetic", 2, 1, protocol="base2new"))
    assert runner.executor.features.encoded_images == before


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in METHODS.names() if n != "recorder"])
def test_every_method_runs_under_base2new(tmp_path, synthetic_root, name):
    runner = runner_for(tmp_path, synthetic_root, [f"{name}.{k}={v!r}".replace("'", '"')
                                                   for k, v in FAST.get(name, {}).items()])
    (result,), _ = runner.run_all(RunSpec(name, "test-tiny", "synthetic", 1, 1, protocol="base2new"))
    assert result.status == "ok", result.error
    assert result.metrics["base"] is not None
    cls = METHODS.get(name)
    if cls.scores_unseen_classes():
        assert result.metrics["new"] is not None and result.metrics["hm"] is not None
    else:
        assert result.metrics["new"] is None and name in result.not_applicable["new"]
        assert result.top1 is None and "hm" in result.not_applicable


def test_cross_dataset_fits_once_and_scores_each_target(tmp_path):
    make_coop_dataset(tmp_path, "dtd", classes=("a", "b", "c"), counts=(2, 1, 2))
    make_coop_dataset(tmp_path, "eurosat", classes=("x", "y"), counts=(2, 1, 3))
    SEEN.clear()
    runner = runner_for(tmp_path, tmp_path, ['study.cross_targets=["eurosat"]'])
    results, _ = runner.run_all(RunSpec("recorder", "test-tiny", "dtd", 1, 1, protocol="cross_dataset"))
    assert SEEN["fits"] == 1 and {r.dataset for r in results} == {"dtd", "eurosat"}
    assert all(r.source_dataset == "dtd" for r in results)
    target = load_dataset("eurosat", tmp_path)
    target_paths = {str((target.image_root / it.path).resolve()) for it in target.test}
    assert not target_paths & set(SEEN["paths"]) and set(SEEN["classes"]) == {"a", "b", "c"}
    assert (tmp_path / "results/test-tiny/eurosat/recorder/cross_dataset-from-dtd/shots1_seed1.json").is_file()
    # linear_probe cannot score eurosat's classes: recorded as not applicable, never a number
    results, _ = runner.run_all(RunSpec("linear_probe", "test-tiny", "dtd", 1, 1, protocol="cross_dataset"))
    other = next(r for r in results if r.dataset == "eurosat")
    assert other.top1 is None and "top1" in other.not_applicable and other.status == "ok"


def test_an_image_method_scores_targets_under_their_own_folders(tmp_path):
    """An image-input method's test images are checked before training under each evaluated dataset's own image
    root (they were once all looked up under the source's: every target image was "unreadable")."""
    make_coop_dataset(tmp_path, "dtd", classes=("a", "b", "c"), counts=(2, 1, 2))
    make_coop_dataset(tmp_path, "eurosat", classes=("x", "y"), counts=(2, 1, 3))
    runner = runner_for(tmp_path, tmp_path, ['study.cross_targets=["eurosat"]', "lora.iters_per_shot=2"])
    results, _ = runner.run_all(RunSpec("lora", "test-tiny", "dtd", 1, 1, protocol="cross_dataset"))
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert all(r.top1 is not None for r in results)


def test_domain_generalisation_scores_subsets_by_row_selection(tmp_path):
    """ImageNet-A's classes are ImageNet classes: even a method that cannot score unseen classes
    (linear_probe) is scored on them, by taking its logits of those classes."""
    make_imagenet(tmp_path, n_classes=4, n_train=10, n_val=2)
    wnids = imagenet_wnids(4)
    make_dg_target(tmp_path, "imagenet_a", [wnids[1], wnids[3]], per_class=2)
    runner = runner_for(tmp_path, tmp_path, ['study.dg_targets=["imagenet_a"]'])
    results, _ = runner.run_all(RunSpec("linear_probe", "test-tiny", "imagenet", 1, 1,
                                        protocol="domain_generalisation"))
    a = next(r for r in results if r.dataset == "imagenet_a")
    assert a.status == "ok" and a.top1 is not None and not a.not_applicable and a.n_test == 4
    source = load_dataset("imagenet", tmp_path)
    target = load_dataset("imagenet_a", tmp_path)
    assert class_set(target).rows_in(class_set(source)) == [1, 3]


def test_protocol_results_are_reused_and_conflicts_refused(tmp_path, synthetic_root):
    runner = runner_for(tmp_path, synthetic_root)
    spec = RunSpec("zero_shot", "test-tiny", "synthetic", 1, 1, protocol="base2new")
    runner.run_all(spec)
    _, reused = runner.run_all(spec)
    assert reused
    assert runner.planner.decide(runner.planner.prepare(spec)).action == "reuse"


def test_sweep_dry_run_shows_protocols(tmp_path, synthetic_root, capsys, monkeypatch):
    from fsbench.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "--methods", "zero_shot", "--protocols", "fewshot,base2new", "--backbones", "test-tiny",
                 "--datasets", "synthetic", "--shots", "1", "--seeds", "1", "--data-root", str(synthetic_root),
                 "--dry-run"])
    assert code == 0 and "2 runs to do" in capsys.readouterr().out


def test_domain_generalisation_never_shows_target_images_to_fit(tmp_path):
    make_imagenet(tmp_path, n_classes=4, n_train=10, n_val=2)
    wnids = imagenet_wnids(4)
    make_dg_target(tmp_path, "imagenet_r", [wnids[0], wnids[2]], per_class=2)
    SEEN.clear()
    runner = runner_for(tmp_path, tmp_path, ['study.dg_targets=["imagenet_r"]'])
    results, _ = runner.run_all(RunSpec("recorder", "test-tiny", "imagenet", 1, 1, protocol="domain_generalisation"))
    target = load_dataset("imagenet_r", tmp_path)
    target_paths = {str((target.image_root / it.path).resolve()) for it in target.test}
    assert SEEN["fits"] == 1 and SEEN["paths"] and not target_paths & set(SEEN["paths"])
    assert {r.dataset for r in results} == {"imagenet", "imagenet_r"}
    assert all(r.source_dataset == "imagenet" and r.top1 is not None for r in results)


def test_ls_protocols_and_unseen_column(capsys):
    from fsbench.cli import main

    assert main(["ls", "protocols"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fewshot", "base2new", "cross_dataset", "domain_generalisation"))
    assert main(["ls", "methods"]) == 0 and "unseen" in capsys.readouterr().out
