"""Pairing invariants: negatives differ in VALUE, null ratio, determinism, order/batch independence."""

import numpy as np
import pyarrow as pa
import pytest

from cca_ray.data.pairing import null_masks, pair_columns, pair_negatives, pair_table
from cca_ray.data.schema import DataError, condition_keys
from cca_ray.data.sources import digit_prompt


def digits_table(n=600, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    return pa.table({
        "codes": pa.array([[0, 1]] * n, pa.list_(pa.int32())),
        "grid_h": pa.array([1] * n, pa.int32()), "grid_w": pa.array([2] * n, pa.int32()),
        "label": pa.array(labels, pa.int64()),
        "prompt": pa.array([digit_prompt(x) for x in labels], pa.string()),
        "source_id": pa.array([f"d:{i}" for i in range(n)], pa.string()),
    })


def test_negative_never_shares_the_condition_value():
    # duplicated prompts at different indices: comparing indices would let these collide
    prompts = ["a cat"] * 50 + ["a dog"] * 3 + ["a fox"] * 7
    cols = pair_columns(prompts, [None] * 60, seed=3)
    assert all(n != p for n, p in zip(cols["neg_prompt"], prompts))
    assert (cols["neg_index"] != np.arange(60)).all()


def test_digits_pairs_differ_in_prompt_and_label():
    t = pair_table(digits_table(), seed=0, epoch=0, null_prob=0.1)
    assert (np.array(t["neg_label"].to_pylist()) != np.array(t["label"].to_pylist())).all()
    assert all(a != b for a, b in zip(t["neg_prompt"].to_pylist(), t["prompt"].to_pylist()))
    # the negative is another row's real condition, kept consistent (label and prompt together)
    assert all(p == digit_prompt(lab) for p, lab in zip(t["neg_prompt"].to_pylist(), t["neg_label"].to_pylist()))


def test_negatives_are_uniform_over_other_rows():
    # condition A: 1 row, B: 1 row, C: 8 rows. A's negatives: B w.p. 1/9, C w.p. 8/9.
    keys = np.array(["A"] + ["B"] + ["C"] * 8, dtype=object)
    hits = np.array([keys[pair_negatives(keys, seed=s)[0]] for s in range(3000)])
    assert set(hits) == {"B", "C"}
    assert abs((hits == "B").mean() - 1 / 9) < 0.03


def test_null_ratio_within_tolerance():
    pos, neg = null_masks(20000, 0.1, seed=0)
    assert abs(pos.mean() - 0.1) < 0.01 and abs(neg.mean() - 0.1) < 0.01
    assert not np.array_equal(pos, neg)  # drawn independently for positive and negative
    p0, n0 = null_masks(1000, 0.0, seed=0)
    assert not p0.any() and not n0.any()
    p1, _ = null_masks(1000, 1.0, seed=0)
    assert p1.all()


def test_deterministic_for_seed_and_epoch_and_repairable():
    t = digits_table()
    a = pair_table(t, seed=5, epoch=0, null_prob=0.1)
    b = pair_table(t, seed=5, epoch=0, null_prob=0.1)
    assert a.equals(b)
    c = pair_table(t, seed=5, epoch=1, null_prob=0.1)  # next epoch: fresh negatives and null flags
    assert a["neg_label"].to_pylist() != c["neg_label"].to_pylist()
    assert a["pos_null"].to_pylist() != c["pos_null"].to_pylist()
    d = pair_table(t, seed=6, epoch=0, null_prob=0.1)
    assert a["neg_label"].to_pylist() != d["neg_label"].to_pylist()


def test_independent_of_row_order():
    """A row's negative depends on (seed, epoch, dataset) only: shuffled rows keep their pairs
    (the Ray step's independence from block/batch size is tested in test_data_pipeline.py)."""
    t = digits_table()
    base = pair_table(t, seed=1, null_prob=0.2)
    perm = np.random.default_rng(9).permutation(len(t))
    shuffled = pair_table(t.take(perm), seed=1, null_prob=0.2)
    by_sid = {r["source_id"]: r for r in base.to_pylist()}
    for r in shuffled.to_pylist():
        assert r == by_sid[r["source_id"]]


def test_pair_table_replaces_existing_pair_columns():
    t = pair_table(digits_table(), seed=0)
    again = pair_table(t, seed=0, epoch=1)
    assert again.column_names.count("neg_label") == 1 and len(again.column_names) == len(t.column_names)


def test_label_only_rows_pair_by_label():
    cols = pair_columns([None] * 6, [0, 0, 0, 1, 1, 2], seed=0)
    assert all(n != lab for n, lab in zip(cols["neg_label"], [0, 0, 0, 1, 1, 2]))
    assert all(p is None for p in cols["neg_prompt"])


def test_single_condition_and_missing_condition_are_errors():
    with pytest.raises(DataError, match="share one condition"):
        pair_negatives(np.array(["x"] * 5, dtype=object), seed=0)
    with pytest.raises(DataError, match="row 1: has neither a prompt nor a label"):
        condition_keys(["a", None], [None, None])
    t = digits_table(10)
    dup = pa.concat_tables([t, t])
    with pytest.raises(DataError, match="source_id values are not unique"):
        pair_table(dup, seed=0)
