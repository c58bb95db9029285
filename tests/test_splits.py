"""The few-shot protocol: seeded, persisted, class-balanced, and never overlapping."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fsbench.errors import DataError
from fsbench.splits import SplitStore, draw_split, split_from_json, split_to_json


def test_draw_is_deterministic_and_seed_dependent(synthetic):
    a, b = draw_split(synthetic, 4, 1), draw_split(synthetic, 4, 1)
    assert a == b
    assert draw_split(synthetic, 4, 2).train != a.train


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
def test_k_shots_per_class_from_train_and_min_k_4_from_val(synthetic, shots):
    split = draw_split(synthetic, shots, seed=3)
    train_counts = Counter(synthetic.train[i].label for i in split.train)
    val_counts = Counter(synthetic.val[i].label for i in split.val)
    classes = range(len(synthetic.classnames))
    assert all(train_counts[c] == shots for c in classes)
    assert all(val_counts[c] == min(shots, 4) for c in classes)
    assert len(set(split.train)) == len(split.train)  # no repeats without --allow-repeat


def test_train_val_test_never_overlap(synthetic):
    test_files = {it.path for it in synthetic.test}
    val_files = {it.path for it in synthetic.val}
    train_files = {it.path for it in synthetic.train}
    assert not (train_files & val_files or train_files & test_files or val_files & test_files)
    for seed in (1, 2, 3):
        split = draw_split(synthetic, 16, seed)
        chosen_train = {synthetic.train[i].path for i in split.train}
        chosen_val = {synthetic.val[i].path for i in split.val}
        assert chosen_train <= train_files and chosen_val <= val_files
        assert not chosen_train & (val_files | test_files) and not chosen_val & test_files


def test_draw_does_not_touch_the_global_rng(synthetic):
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    draw_split(synthetic, 2, 1)
    assert random.random() == expected


def test_too_many_shots_is_a_clear_error_unless_repeat_is_allowed(synthetic):
    with pytest.raises(DataError, match="allow-repeat"):
        draw_split(synthetic, 17, 1)
    split = draw_split(synthetic, 17, 1, repeat=True)
    assert len(split.train) == 17 * len(synthetic.classnames)


def test_store_persists_and_reuses_the_same_images(synthetic, tmp_path):
    store = SplitStore(tmp_path)
    first = store.get(synthetic, 2, 1)
    path = store.path("synthetic", 2, 1)
    saved = json.loads(path.read_text())
    assert saved["checksum"] == first.checksum(synthetic)
    assert store.get(synthetic, 2, 1) == first  # reused
    # A hand-edited draw no longer matches its checksum: it is drawn again (the same images), never used.
    saved["train"] = saved["train"][::-1][:1] * 2
    path.write_text(json.dumps(saved))
    again = store.get(synthetic, 2, 1)
    assert again == first
    assert json.loads(path.read_text())["checksum"] == first.checksum(synthetic)


def test_portable_json_round_trip_and_foreign_files_rejected(synthetic):
    split = draw_split(synthetic, 4, 2)
    obj = split_to_json(split, synthetic)
    assert split_from_json(obj, synthetic, "x") == split
    obj["train"][0][0] = "not/in/this/dataset.png"
    with pytest.raises(DataError, match="not in synthetic"):
        split_from_json(obj, synthetic, "x")
