"""Shared fixtures: the tiny CLIP, the synthetic dataset, and the gpu marker's skip."""

from __future__ import annotations

import pytest
import torch

from fsbench.backbones import BackboneSpec, build_backbone
from fsbench.data import load_dataset


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
