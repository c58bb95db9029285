"""Fidelity of the on-device augmentation (fsbench.augment) to torchvision's PIL pipeline at 224 px.

The official CLIP-LoRA code trains on torchvision's PIL RandomResizedCrop (bicubic) + flip;
`augment="device"` draws the same boxes and flips (tests/test_speed_paths.py) and resizes tensors
with antialiased bicubic. The bars below are what benchmarks/gpu_checks/crops.py measured on CPU
(BENCHMARKS.md, "On-device crops"): on smooth content every pixel within 2 of 255 levels (0.03 in
CLIP-normalised units); on hard saturated edges 99.9% of pixels within rounding and single
bicubic-overshoot pixels up to 14 levels (0.21 normalised).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checks"))
from crops import TOLERANCE, crop_diffs, pipeline_diffs, sample_images, stats  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smooth():
    return sample_images("smooth", 6, seed=0)


@pytest.fixture(scope="module")
def edges():
    return sample_images("edges", 6, seed=1)


def test_device_pipeline_matches_pil_up_to_rounding_on_smooth_images(smooth) -> None:
    s = stats(pipeline_diffs(smooth, CPU, 224, seed=0))
    assert s["max_levels"] <= TOLERANCE["smooth_max"] + 0.01
    assert s["max"] <= 0.031 and s["mean_levels"] < 0.05


def test_device_pipeline_on_hard_edges_differs_in_rare_pixels_only(edges) -> None:
    s = stats(pipeline_diffs(edges, CPU, 224, seed=1))
    assert s["p999_levels"] <= TOLERANCE["edges_p999"] + 0.01
    assert s["max_levels"] <= TOLERANCE["edges_max"] + 0.01 and s["mean_levels"] < 0.05


def test_antialiasing_is_what_brings_tensor_crops_close_to_pil(smooth, edges) -> None:
    """Without antialiasing, downscaled crops alias: many times further from PIL on average."""
    for images, seed in ((smooth, 0), (edges, 1)):
        with_aa = stats(crop_diffs(images, CPU, True, 224, seed))
        without = stats(crop_diffs(images, CPU, False, 224, seed))
        assert without["mean"] > 5 * with_aa["mean"]
        assert with_aa["max_levels"] <= TOLERANCE["edges_max"] + 0.01
