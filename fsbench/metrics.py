"""Evaluation metrics computed from a run's predictions (no torch import: tensors are duck-typed).

`accuracy` is the one top-1 accuracy: the runner's headline metric (`fsbench.execute`) and every
validation search of a method (`fsbench.training.BestOnValidation`) compute it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ECE_BINS = 15  # Guo et al. (2017) and the calibration literature on CLIP report ECE with 15 bins


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent of (N, C) `logits` against (N,) `labels`: exact (the integer count of
    rows whose arg-max is the label, over N); NaN for an empty set. One host-device sync."""
    if len(labels) == 0:
        return float("nan")
    hits = int((logits.argmax(dim=-1).cpu() == labels.cpu()).sum())
    return 100.0 * hits / len(labels)


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error in percent, with `n_bins` equal-width confidence bins.

    ECE = sum over bins b of |B_b|/n * |acc(B_b) - conf(B_b)| (Naeini et al., AAAI 2015; Guo et al.,
    "On Calibration of Modern Neural Networks", ICML 2017). Bins are (lo, hi] as in the official code
    of Guo et al. (gpleiss/temperature_scaling, temperature_scaling.py, `_ECELoss`, lines 86-129),
    except that a confidence of exactly 0 goes into the first bin instead of none.

    Args:
        confidences: (n,) the predicted class's probability per test sample, in [0, 1].
        correct: (n,) whether the prediction was right (bool or 0/1).
        n_bins: number of equal-width bins over [0, 1].
    Returns:
        ECE in percent (0 = perfectly calibrated).
    Raises:
        ValueError: empty or mismatched arrays, confidences outside [0, 1], n_bins < 1.
    """
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf.size == 0 or conf.shape != hit.shape:
        raise ValueError(f"need equal, non-empty arrays; got {conf.size} confidences and {hit.size} labels")
    if n_bins < 1 or not np.all((conf >= 0) & (conf <= 1)):
        raise ValueError("confidences must lie in [0, 1] and n_bins must be >= 1")
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner, conf, side="left")  # b[i-1] < conf <= b[i]: the (lo, hi] bins
    hits = np.bincount(bins, weights=hit, minlength=n_bins)
    confs = np.bincount(bins, weights=conf, minlength=n_bins)
    # per bin |sum(hit) - sum(conf)| / n  ==  |B|/n * |acc(B) - conf(B)|
    return float(100.0 * np.abs(hits - confs).sum() / conf.size)


ece = expected_calibration_error
