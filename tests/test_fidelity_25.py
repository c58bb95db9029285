"""Issue 25: ImageNet variants matched to the source by wnid, the papers' cross-dataset / DG defaults,
and the last gaps to the official code (GDA, ProLIP, KgCoOp, PLOT++)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from datagen import imagenet_wnids, make_dg_target, make_imagenet

from fsbench.cli import main
from fsbench.data import load_dataset
from fsbench.errors import DataError
from fsbench.protocols import class_set, make_protocol

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
    episode = make_protocol("domain_generalisation", dg_targets=[name]).episode(source, (), (), {name: target})
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
