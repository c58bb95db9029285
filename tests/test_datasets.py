"""Dataset readers: each layout reads, names and labels are right, splits disjoint, errors one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datagen import (
    AIRCRAFT_VARIANTS,
    COOP_LAYOUTS,
    imagenet_wnids,
    make_aircraft,
    make_coop_dataset,
    make_imagefolder,
    make_imagenet,
)

from fsbench.data import DATASETS, DatasetSplits, load_dataset
from fsbench.data import synthetic as synthetic_module
from fsbench.errors import DataError, UnknownNameError

COOP_NAMES = sorted(COOP_LAYOUTS)
# (name, use CLIP-LoRA's folder name) for every dataset whose two folder names differ
FOLDER_VARIANTS = [(n, False) for n in COOP_NAMES] + [
    (n, True) for n in COOP_NAMES if COOP_LAYOUTS[n][0] != COOP_LAYOUTS[n][1]
]


def assert_well_formed(ds: DatasetSplits) -> None:
    """Labels in range, every class trained on, splits disjoint and non-empty."""
    paths = [{it.path for it in ds.split(s)} for s in ("train", "val", "test")]
    assert all(paths)
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    for split in ("train", "val", "test"):
        assert {it.label for it in ds.split(split)} <= set(range(len(ds.classnames)))
    assert {it.label for it in ds.train} == set(range(len(ds.classnames)))
    assert ds.templates and all("{}" in t for t in ds.templates)


def assert_one_line_error(excinfo: pytest.ExceptionInfo, path: Path) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(path) in message


@pytest.mark.parametrize(("name", "clip_lora_folder"), FOLDER_VARIANTS)
def test_coop_dataset_reads(tmp_path: Path, name: str, clip_lora_folder: bool) -> None:
    folder = make_coop_dataset(tmp_path, name, clip_lora_folder=clip_lora_folder)
    ds = load_dataset(name, tmp_path)
    assert ds.name == name
    assert ds.image_root == folder / COOP_LAYOUTS[name][2]
    assert ds.classnames == ["apple pie", "beta", "gamma"]  # "_" -> " " as CoOp's prompts do
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 6)
    assert all((ds.image_root / it.path).is_file() for it in ds.train + ds.val + ds.test)
    assert ds.split("val")[0].label == 0
    assert_well_formed(ds)


@pytest.mark.parametrize(
    ("name", "raw", "renamed"),
    [
        ("eurosat", ("AnnualCrop", "Forest", "SeaLake"), ["Annual Crop Land", "Forest", "Sea or Lake"]),
        ("caltech101", ("airplanes", "Faces", "accordion"), ["airplane", "face", "accordion"]),
        ("eurosat", ("Annual Crop Land", "Forest"), ["Annual Crop Land", "Forest"]),  # already renamed
    ],
)
def test_coop_renames(tmp_path: Path, name: str, raw: tuple[str, ...], renamed: list[str]) -> None:
    make_coop_dataset(tmp_path, name, classes=raw)
    assert load_dataset(name, tmp_path).classnames == renamed


def test_templates_follow_coop(tmp_path: Path) -> None:
    for name in ("eurosat", "dtd", "ucf101"):
        make_coop_dataset(tmp_path, name)
    assert load_dataset("eurosat", tmp_path).templates == ["a centered satellite photo of {}."]
    assert load_dataset("dtd", tmp_path).templates == ["{} texture."]
    assert load_dataset("ucf101", tmp_path).templates == ["a photo of a person doing {}."]


def test_aliases_read_the_canonical_dataset(tmp_path: Path) -> None:
    make_coop_dataset(tmp_path, "oxford_flowers")
    make_aircraft(tmp_path)
    assert load_dataset("flowers102", tmp_path).name == "oxford_flowers"
    assert load_dataset("fgvc", tmp_path).name == "fgvc_aircraft"


@pytest.mark.parametrize("folder", ["fgvc_aircraft", "fgvc_aircraft/data"])
def test_aircraft(tmp_path: Path, folder: str) -> None:
    base = make_aircraft(tmp_path, folder=folder)
    ds = load_dataset("fgvc_aircraft", tmp_path)
    assert ds.classnames == list(AIRCRAFT_VARIANTS)
    assert ds.image_root == base / "images"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 6, 6)
    assert all((ds.image_root / it.path).is_file() for it in ds.test)
    assert ds.templates == ["a photo of a {}, a type of aircraft."]
    assert_well_formed(ds)


def test_aircraft_unknown_variant(tmp_path: Path) -> None:
    base = make_aircraft(tmp_path)
    (base / "images_variant_val.txt").write_text("1234 Boeing 999\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dataset("fgvc_aircraft", tmp_path)
    assert_one_line_error(excinfo, base / "images_variant_val.txt")


@pytest.mark.parametrize("clip_lora_layout", [False, True])
def test_imagenet_with_classnames_txt(tmp_path: Path, clip_lora_layout: bool) -> None:
    folder = make_imagenet(tmp_path, clip_lora_layout=clip_lora_layout, n_train=3, n_val=2)
    ds = load_dataset("imagenet", tmp_path)
    assert ds.image_root == (folder if clip_lora_layout else folder / "images")
    assert ds.classnames == ["class 0", "class 1", "class 2"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (6, 3, 6)
    # val is held out of train (the last file of each class), test is the official val folder
    assert [it.path for it in ds.val] == [f"train/{w}/{w}_2.JPEG" for w in imagenet_wnids(3)]
    assert all(it.path.startswith("val/") for it in ds.test)
    assert all((ds.image_root / it.path).is_file() for it in ds.train + ds.val + ds.test)
    assert_well_formed(ds)


def test_imagenet_without_classnames_uses_clip_names(tmp_path: Path) -> None:
    make_imagenet(tmp_path, with_classnames=False, n_classes=1000, n_train=2, n_val=1)
    ds = load_dataset("imagenet", tmp_path)
    assert len(ds.classnames) == 1000
    assert ds.classnames[:3] == ["tench", "goldfish", "great white shark"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1000, 1000, 1000)
    assert_well_formed(ds)


def test_imagenet_subset_without_classnames_is_an_error(tmp_path: Path) -> None:
    folder = make_imagenet(tmp_path, with_classnames=False)
    with pytest.raises(DataError) as excinfo:
        load_dataset("imagenet", tmp_path)
    assert_one_line_error(excinfo, folder / "classnames.txt")


def test_imagefolder_flat(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, with_splits=False, per_class=10)
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.classnames == ["golden retriever", "tabby cat"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (12, 4, 4)
    val_paths = [it.path for it in ds.val if it.label == 0]
    assert val_paths == ["golden_retriever/img_3.png", "golden_retriever/img_8.jpg"]
    assert ds.templates == ["a photo of a {}."]
    assert_well_formed(ds)


@pytest.mark.parametrize("with_val", [True, False])
def test_imagefolder_split_folders(tmp_path: Path, with_val: bool) -> None:
    make_imagefolder(tmp_path, with_splits=True, with_val=with_val, per_class=5)
    (tmp_path / "train" / "tabby_cat" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.classnames == ["golden retriever", "tabby cat"]
    assert len(ds.test) == 10
    assert (len(ds.train), len(ds.val)) == ((10, 10) if with_val else (8, 2))
    if not with_val:
        assert [it.path for it in ds.val] == ["train/golden_retriever/img_4.jpg", "train/tabby_cat/img_4.jpg"]
    assert_well_formed(ds)


def test_imagefolder_test_class_not_in_train(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, with_splits=True)
    make_imagefolder(tmp_path / "test" / "zebra", with_splits=False)
    with pytest.raises(DataError, match="not among the training classes"):
        load_dataset("imagefolder", tmp_path)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def test_synthetic_generates_once_deterministically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_dataset("synthetic", tmp_path / "a")
    assert len(first.classnames) == 10 and len(set(first.classnames)) == 10
    assert (len(first.train), len(first.val), len(first.test)) == (160, 40, 100)
    assert first.templates == ["a photo of a {}."]
    assert_well_formed(first)

    def fail(folder: Path) -> None:
        raise AssertionError("regenerated an existing synthetic dataset")

    with monkeypatch.context() as m:
        m.setattr(synthetic_module, "_write_dataset", fail)
        again = load_dataset("synthetic", tmp_path / "a")
    assert again.fingerprint("test") == first.fingerprint("test")
    load_dataset("synthetic", tmp_path / "b")
    assert _tree_bytes(tmp_path / "a" / "synthetic") == _tree_bytes(tmp_path / "b" / "synthetic")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["synthetic"]  # no temp folder left


def test_synthetic_tolerates_a_concurrent_creator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = synthetic_module._write_dataset

    def write_and_lose_the_race(folder: Path) -> None:
        original(folder)
        original(tmp_path / "synthetic")  # another process finishes first

    monkeypatch.setattr(synthetic_module, "_write_dataset", write_and_lose_the_race)
    ds = load_dataset("synthetic", tmp_path)
    assert len(ds.train) == 160
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda root: None, "eurosat"),
        (lambda root: (root / "eurosat" / "2750").mkdir(parents=True), "eurosat/split_zhou_EuroSAT.json"),
        (lambda root: (root / "eurosat").mkdir(), "eurosat/2750"),
    ],
    ids=["no-folder", "no-split-file", "no-image-folder"],
)
def test_missing_files_name_the_expected_path(tmp_path: Path, setup, expected: str) -> None:
    setup(tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_dataset("eurosat", tmp_path)
    assert_one_line_error(excinfo, tmp_path / expected)
    assert "CoOp layout" in str(excinfo.value)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps([["a.jpg", 0, "a"]]),
        json.dumps({"train": [["a.jpg", 0, "a"]], "val": [["b.jpg", 0, "a"]]}),
        json.dumps({"train": [["a.jpg", "0", "a"]], "val": [["b.jpg", 0, "a"]], "test": [["c.jpg", 0, "a"]]}),
        json.dumps({"train": [["a.jpg", 0, "a"]], "val": [["b.jpg", 0, "b"]], "test": [["c.jpg", 0, "a"]]}),
        json.dumps({"train": [["a.jpg", 0, "a"]], "val": [], "test": [["c.jpg", 0, "a"]]}),
        json.dumps({"train": [["a.jpg", 1, "a"]], "val": [["b.jpg", 1, "a"]], "test": [["c.jpg", 1, "a"]]}),
        json.dumps({"train": [["a.jpg", 0]], "val": [["b.jpg", 0, "a"]], "test": [["c.jpg", 0, "a"]]}),
    ],
    ids=["bad-json", "not-object", "no-test", "str-label", "name-clash", "empty-val", "label-gap", "short"],
)
def test_malformed_split_file(tmp_path: Path, content: str) -> None:
    folder = make_coop_dataset(tmp_path, "dtd")
    (folder / "split_zhou_DescribableTextures.json").write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_dataset("dtd", tmp_path)
    assert_one_line_error(excinfo, folder / "split_zhou_DescribableTextures.json")


def test_unknown_dataset_suggests_a_name(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'eurosat'"):
        load_dataset("eurosatt", tmp_path)


def test_every_registered_reader_is_covered() -> None:
    covered = set(COOP_NAMES) | {"fgvc_aircraft", "imagenet", "imagefolder", "synthetic", "imagenet_v2",
               "imagenet_sketch", "imagenet_a", "imagenet_r"}  # the last four: tests/test_dg_datasets.py
    covered |= {"ood_inaturalist", "ood_sun", "ood_places", "ood_textures"}  # tests/test_ood.py
    aliases = {"flowers102", "pets", "cars", "aircraft", "fgvc"}
    assert set(DATASETS.names()) == covered | aliases
