"""A plug-in protocol, one file, no edit to fsbench: validation carved out of the K train shots.

The validation-free regime of LP++ (Huang et al., CVPR 2024) and CLAP (Silva-Rodriguez et al., CVPR 2024):
no validation split is used; a method that selects on validation gets the last K // 2 of each class's drawn
shots, and trains on the others (K = 1: no validation). Used by tests/test_open_protocols.py.
"""

from __future__ import annotations

from collections import defaultdict

from fsbench.protocols import Episode, Protocol, Target, class_set, register_protocol, whole_test


@register_protocol("carved")
class CarvedValidation(Protocol):
    """K shots per class, of which K // 2 validate; top-1 on the whole test split."""

    summary = "validation carved out of the K train shots (K // 2 per class); no val split used"

    def episode(self, source, draw, targets):
        items = source.split(draw.train_split)
        by_class: dict[int, list[int]] = defaultdict(list)
        for i in draw.train:
            by_class[items[i].label].append(i)
        train, val = [], []
        for label in sorted(by_class):
            shots = by_class[label]
            cut = len(shots) - len(shots) // 2
            train += shots[:cut]
            val += shots[cut:]
        classes = class_set(source)
        return Episode(source.name, classes, tuple(train), tuple(items[i].label for i in train), tuple(val),
                       tuple(items[i].label for i in val), (Target(source.name, (whole_test(source, classes),)),),
                       train_split=draw.train_split, val_split=draw.train_split)
