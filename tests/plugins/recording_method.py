"""Plug-in methods that record what they are shown (tests/test_open_protocols.py, tests/test_test_time_tracks.py):
fit's sets, and every evaluation call with its batch size, a fingerprint of each input row, the dataset the
method was fitted on, whether the scoring object is a copy of the fitted one, and how many test inputs this
copy has seen before. They write one JSON line per event to the file named by $FSBENCH_RECORDER_LOG."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from fsbench.method import Method, register_method


def _log(event: dict) -> None:
    with open(os.environ["FSBENCH_RECORDER_LOG"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")


def fingerprints(x: torch.Tensor) -> list[str]:
    """A short hash of each input row (its values rounded to 4 decimals): the same image, the same key."""
    rows = x.detach().float().cpu().numpy().round(4)
    return [hashlib.sha1(row.tobytes()).hexdigest()[:12] for row in rows]


@register_method("test_time_recorder")
class Recorder(Method):
    """Zero-shot scores; adapts online by counting what it has seen (a stand-in for TDA's cache)."""

    input_kind = "features"
    test_time = "online"
    summary = "records its inputs (tests only)"

    def fit(self, train, val):
        self.weights = self.ctx.text_weights()
        self.seen = 0
        self.fitted_id = id(self)
        _log({"event": "fit", "method": self.name, "dataset": self.ctx.dataset, "seed": self.ctx.seed,
              "train_split": train.split, "val_split": val.split,
              "train": [it.path for it in train.items], "val": [it.path for it in val.items],
              "train_labels": train.labels.tolist(), "val_labels": val.labels.tolist()})

    def _record(self, event: str, x: torch.Tensor) -> None:
        _log({"event": event, "method": self.name, "dataset": self.ctx.dataset, "n": len(x),
              "shape": list(x.shape), "dtype": str(x.dtype), "seen_before": self.seen,
              "copy": id(self) != self.fitted_id, "keys": fingerprints(x),
              "x": [round(float(v), 5) for v in x[0, :4]]})
        self.seen += len(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self._record("logits", x)
        return x @ self.weights.T

    def online_logits(self, x: torch.Tensor) -> torch.Tensor:
        self._record("online", x)
        return x @ self.weights.T


@register_method("transductive_recorder")
class TransductiveRecorder(Recorder):
    """Zero-shot scores; sees each whole evaluation set at once (a stand-in for TransCLIP)."""

    test_time = "transductive"

    def transductive_logits(self, x: torch.Tensor) -> torch.Tensor:
        self._record("transductive", x)
        return x @ self.weights.T
