"""Shared fixtures: the tiny CLIP, the synthetic dataset, CPU runners, and the gpu marker's skip."""

from __future__ import annotations

import pytest
import torch

from fsbench.backbones import BackboneSpec, build_backbone
from fsbench.config import BenchConfig, Runtime, apply_sets
from fsbench.data import load_dataset
from fsbench.engine import Runner


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """The seeded random `test-tiny` CLIP on CPU (shared: tests must not modify it)."""
    return build_backbone(BackboneSpec("test-tiny"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A data root holding the generated `synthetic` dataset."""
    root = tmp_path_factory.mktemp("data")
    load_dataset("synthetic", root)
    return root


@pytest.fixture(scope="session")
def synthetic(synthetic_root):
    return load_dataset("synthetic", synthetic_root)


@pytest.fixture(scope="session")
def make_runner(synthetic_root):
    """`make_runner(folder, sets=())`: a CPU Runner on the synthetic data, results and caches in
    `folder`, with `--set`-style overrides."""
    def make(folder, sets=()) -> Runner:
        rt = Runtime(data_root=str(synthetic_root), results=str(folder / "results"), cache_dir=str(folder / "cache"),
                     device="cpu", workers=0)
        return Runner(apply_sets(BenchConfig(runtime=rt), list(sets)))
    return make
