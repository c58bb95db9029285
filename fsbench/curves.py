"""Training curves: what a trained method's loss, learning rate and validation accuracy did during `fit`.

The training loops record into the run's `CurveRecorder` (`Context.curves`): `fsbench.training.train_epochs`
one loss and learning rate per update, `BestOnValidation` every validation accuracy it is offered,
linear_probe's L-BFGS its own. The runner stores `export()` in the result's `curves`:
one entry per training phase (a loop; PLOT++ has two, CLIP-Adapter one per residual ratio), each
downsampled to at most `MAX_POINTS` points by averaging consecutive updates, with the number of
non-finite losses counted before averaging. `curve_problems` names what a report flags. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MAX_POINTS = 256


class CurveRecorder:
    """Collects the curves of one `fit`, phase by phase (a repeated phase name gets " #2", " #3")."""

    def __init__(self) -> None:
        self._phases: dict[str, dict[str, list]] = {}
        self._current: str | None = None

    def start(self, name: str) -> None:
        """Begin a phase: later losses and validation accuracies belong to it."""
        base, i = name, 2
        while name in self._phases:
            name, i = f"{base} #{i}", i + 1
        self._phases[name] = {"loss": [], "lr": [], "val_step": [], "val_acc": []}
        self._current = name

    def losses(self, values: Iterable[float], lrs: Iterable[float | None]) -> None:
        """Append one loss and learning rate per update (None: the loop has no learning rate)."""
        if self._current is None:
            self.start("train")
        phase = self._phases[self._current]
        phase["loss"] += [float(v) for v in values]
        phase["lr"] += [None if lr is None else float(lr) for lr in lrs]

    def validation(self, accuracy: float) -> None:
        """A validation accuracy (0-1) measured after the updates recorded so far."""
        if self._current is None or accuracy is None or accuracy != accuracy:
            return
        phase = self._phases[self._current]
        phase["val_step"].append(len(phase["loss"]))
        phase["val_acc"].append(float(accuracy))

    def export(self, max_points: int = MAX_POINTS) -> dict[str, dict[str, Any]]:
        """{phase: downsampled curve} of every phase with at least one update (JSON-ready)."""
        return {name: export_phase(p, max_points) for name, p in self._phases.items() if p["loss"]}


def _mean(values: list) -> float | None:
    """Mean of a bucket; None when a value is non-finite or missing (JSON has no NaN)."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def _buckets(n: int, max_points: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) index ranges covering n items in at most `max_points` buckets."""
    m = min(n, max_points)
    edges = [round(i * n / m) for i in range(m + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def export_phase(phase: dict[str, list], max_points: int = MAX_POINTS) -> dict[str, Any]:
    """One phase: `step` (updates done at the end of each bucket), bucket-mean `loss` and `lr`,
    `val_step`/`val_acc` (downsampled the same way), `steps` (updates in all) and `nonfinite`."""
    loss = phase["loss"]
    cuts = _buckets(len(loss), max_points)
    out = {"steps": len(loss), "nonfinite": sum(1 for v in loss if not math.isfinite(v)),
           "step": [b for _, b in cuts], "loss": [_mean(loss[a:b]) for a, b in cuts],
           "lr": [_mean(phase["lr"][a:b]) for a, b in cuts]}
    vals = list(zip(phase["val_step"], phase["val_acc"], strict=True))
    keep = [vals[b - 1] for _, b in _buckets(len(vals), max_points)] if vals else []
    return out | {"val_step": [s for s, _ in keep], "val_acc": [a for _, a in keep]}


def curve_problems(curves: dict[str, dict[str, Any]] | None) -> list[str]:
    """One line per phase whose loss went non-finite or ended higher than it started (the mean of the
    last tenth of its points above that of the first tenth); [] for a healthy or absent curve."""
    problems = []
    for name, c in (curves or {}).items():
        if c.get("nonfinite"):
            problems.append(f"{name}: loss non-finite at {c['nonfinite']} of {c['steps']} updates")
            continue
        loss = [v for v in c.get("loss", []) if v is not None]
        if len(loss) < 2:
            continue
        k = max(1, len(loss) // 10)
        first, last = sum(loss[:k]) / k, sum(loss[-k:]) / k
        if last > first:
            problems.append(f"{name}: loss ended higher than it started ({first:.3g} → {last:.3g})")
    return problems
