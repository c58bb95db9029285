"""The `clip_lora` and `coop` samplers draw exactly the images the official code draws.

tests/fixtures/samplers/{clip_lora,coop}.json hold what the official CLIP-LoRA and CoOp/Dassl dataset code,
run unchanged, drew on the trees of tests/sampler_trees.py (README.md there has the command). The test
rebuilds the same trees with the same generators and compares image by image, in draw order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sampler_trees import DATASETS, SEEDS, make_trees, shots_of

from fsbench.cli import main
from fsbench.data import load_dataset
from fsbench.errors import DataError
from fsbench.samplers import SAMPLERS, get_sampler

FIXTURES = Path(__file__).parent / "fixtures" / "samplers"
REFS = ("clip_lora", "coop")


def fixture(ref: str) -> dict[tuple[str, int, int], dict]:
    doc = json.loads((FIXTURES / f"{ref}.json").read_text(encoding="utf-8"))
    return {(d["dataset"], d["shots"], d["seed"]): d for d in doc["draws"]}


@pytest.fixture(scope="module", params=[False, True], ids=["coop-folders", "clip-lora-folders"])
def root(request, tmp_path_factory) -> Path:
    return make_trees(tmp_path_factory.mktemp("trees") / "data", clip_lora_layout=request.param)


def pairs(items) -> list[list]:
    return [[it.path, it.label] for it in items]


def test_fixtures_cover_every_dataset_shot_and_seed() -> None:
    for ref in REFS:
        assert set(fixture(ref)) == {(d, k, s) for d in DATASETS for k in shots_of(d) for s in SEEDS}


@pytest.mark.parametrize("ref", REFS)
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_draw_is_the_official_draw(root: Path, ref: str, dataset: str) -> None:
    data = load_dataset(dataset, root)
    sampler = get_sampler(ref)
    state = random.getstate()
    for (name, shots, seed), want in fixture(ref).items():
        if name != dataset:
            continue
        if "error" in want:  # the official code failed (a class smaller than the draw): so does fsbench
            with pytest.raises(DataError, match="train-folder images"):
                sampler.draw(data, shots, seed)
            continue
        split = sampler.draw(data, shots, seed)
        assert pairs(split.items(data, "train")) == want["train"], (ref, name, shots, seed)
        if want["val"] is not None:
            assert pairs(split.items(data, "val")) == want["val"], (ref, name, shots, seed)
    assert random.getstate() == state  # the global RNG is never used


def test_coop_imagenet_validation_is_train_images_not_drawn_for_training(root: Path) -> None:
    data = load_dataset("imagenet", root)
    for shots in shots_of("imagenet"):
        split = get_sampler("coop").draw(data, shots, 1)
        assert (split.train_split, split.val_split) == ("train+val", "train+val")
        assert not set(split.train) & set(split.val)
        folder = data.split("train+val")
        per_class = {c: sum(it.label == c for it in folder) for c in range(len(data.classnames))}
        val_labels = [folder[i].label for i in split.val]
        for c, n in per_class.items():  # min(K, 4) of what training left, never the test folder
            assert val_labels.count(c) == min(min(shots, 4), n - min(shots, n))
        assert all(folder[i].path.startswith("train/") for i in split.val)


@pytest.mark.parametrize("ref", REFS)
def test_export_splits_gives_the_official_images(root: Path, ref: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    want = fixture(ref)
    for dataset in DATASETS:
        shots = [k for k in shots_of(dataset) if "error" not in want[(dataset, k, 1)]]
        out = tmp_path / f"{dataset}.json"
        assert main(["data", "export-splits", "-d", dataset, "-k", ",".join(map(str, shots)), "-s", "1,2,3",
                     "--root", str(root), "--sampler", ref, "--out", str(out)]) == 0
        entries = json.loads(out.read_text())["splits"]
        assert len(entries) == len(shots) * len(SEEDS)
        for e in entries:
            w = want[(dataset, e["shots"], e["seed"])]
            assert e["sampler"] == ref and e["train"] == w["train"]
            assert w["val"] is None or e["val"] == w["val"]


def test_clip_lora_too_small_imagenet_class_is_one_line(root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["data", "export-splits", "-d", "imagenet", "-k", "32", "-s", "1", "--root", str(root),
                 "--sampler", "clip_lora", "--out", "x.json"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'class 0' (label 0) has 20" in err and "K + 4 = 36" in err


def test_reference_samplers_are_registered_and_versioned() -> None:
    get_sampler("coop")
    for ref in REFS:
        cls = SAMPLERS.get(ref)
        assert cls.tag() == f"{ref}/v1" and cls.summary and not cls.honours_repeat


@pytest.mark.parametrize("ref", REFS)
def test_another_validation_size_follows_the_samplers_rule(root: Path, ref: str) -> None:
    data = load_dataset("eurosat", root)  # LP++ asks for K validation shots per class
    split = get_sampler(ref).draw(data, 8, 1, val_shots=8)
    labels = [it.label for it in split.items(data, "val")]
    have = {c: sum(it.label == c for it in data.val) for c in range(len(data.classnames))}
    for c, n in have.items():  # clip_lora: with replacement; coop: what the class has
        assert labels.count(c) == (8 if ref == "clip_lora" else min(8, n))
