"""A plug-in method that records what it is shown (tests/test_open_protocols.py): fit's sets, and every
evaluation call with its batch size and how many test inputs this copy of the method has seen before.
It writes one JSON line per event to the file named by $FSBENCH_RECORDER_LOG."""

from __future__ import annotations

import json
import os

import torch

from fsbench.method import Method, register_method


def _log(event: dict) -> None:
    with open(os.environ["FSBENCH_RECORDER_LOG"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")


@register_method("test_time_recorder")
class Recorder(Method):
    """Zero-shot scores; adapts online by counting what it has seen (a stand-in for TDA's cache)."""

    input_kind = "features"
    test_time = "online"
    summary = "records its inputs (tests only)"

    def fit(self, train, val):
        self.weights = self.ctx.text_weights()
        self.seen = 0
        _log({"event": "fit", "train_split": train.split, "val_split": val.split,
              "train": [it.path for it in train.items], "val": [it.path for it in val.items],
              "train_labels": train.labels.tolist(), "val_labels": val.labels.tolist()})

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        _log({"event": "logits", "n": len(x)})
        return x @ self.weights.T

    def online_logits(self, x: torch.Tensor) -> torch.Tensor:
        _log({"event": "online", "n": len(x), "seen_before": self.seen,
              "x": [round(float(v), 5) for v in x[0, :4]]})
        self.seen += len(x)
        return x @ self.weights.T
