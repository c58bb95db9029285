"""A plug-in protocol, one file, no edit to fsbench: a toy online test-time protocol.

Fit as in `fewshot`, then score two evaluation sets (the two halves of the test split, in an order drawn
from the run's seed) online: a method whose `test_time` is "online" sees the unlabelled test inputs one at
a time, in that order, and is reset (a fresh copy) before each set. Used by tests/test_open_protocols.py.
"""

from __future__ import annotations

import random

from fsbench.protocols import EvalSet, Protocol, TableShape, Target, class_set, fit_all, register_protocol


@register_protocol("online_toy")
class OnlineToy(Protocol):
    """Two halves of the test split, each scored online in a seeded order; top-1 is their mean."""

    metric_names = ("first", "second", "top1")
    headline = "top1"
    summary = "toy online test-time protocol: two test halves, one image at a time, reset between them"
    unlabelled = "online"
    online_batch = 1
    table = TableShape(columns="metrics")  # one table, a column per metric (as CoCoOp's Table 1)

    def episode(self, source, draw, targets):
        classes = class_set(source)
        order = list(range(len(source.test)))
        random.Random(f"online_toy|{draw.seed}").shuffle(order)
        half = len(order) // 2
        evals = tuple(EvalSet(name, source.name, tuple(pos), tuple(source.test[i].label for i in pos), classes)
                      for name, pos in (("first", order[:half]), ("second", order[half:])))
        return fit_all(source, draw, (Target(source.name, evals),), classes)

    def metrics(self, accuracies):
        first, second = accuracies.get("first"), accuracies.get("second")
        top1 = None if first is None or second is None else (first + second) / 2
        return {"first": first, "second": second, "top1": top1}
