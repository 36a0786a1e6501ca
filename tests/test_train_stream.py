"""train.data_loading=stream: the streamed feed gives the in-memory feed's batches, from real parquet shards.

The Ray Train runs with streaming on (a SIGKILLed worker resuming exactly) are in test_train_ray.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from cca_ray.config import available_presets, load_config
from cca_ray.data.schema import PAIRS_REF_SCHEMA, DataError
from cca_ray.data.shards import make_manifest, write_manifest, write_table_shards
from cca_ray.train.batches import (BatchPlan, MemoryFeed, TrainDataError, check_reference_columns, make_micro_batch,
                                   read_rows)
from cca_ray.train.stream import StepFeed, StreamedRows

PROMPTS = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                                "eight", "nine")]
CODEBOOK, GRID, N = 32, (4, 4), 50
# 2 ranks x 3 rows x 2 micro-steps = 12 rows a step: 4 steps an epoch, 2 rows of the 50 dropped each epoch
PLAN = BatchPlan(num_rows=N, world_size=2, micro_batch_size=3, grad_accum=2, seed=7)


def pairs_ref_table(n: int = N, ref_null=True) -> pa.Table:
    rng = np.random.default_rng(0)
    lab, neg = rng.integers(0, 10, n), rng.integers(0, 10, n)
    return pa.table({
        "codes": [rng.integers(0, CODEBOOK, 16).tolist() for _ in range(n)], "grid_h": [4] * n, "grid_w": [4] * n,
        "label": lab.tolist(), "prompt": [PROMPTS[i] for i in lab], "source_id": [f"f.parquet#{i}" for i in range(n)],
        "neg_label": neg.tolist(), "neg_prompt": [PROMPTS[i] for i in neg], "pos_null": rng.random(n) < 0.25,
        "neg_null": rng.random(n) < 0.25, "ref_logp_pos": -rng.random(n) * 50, "ref_logp_neg": -rng.random(n) * 50,
        "ref_logp_null": (-rng.random(n) * 50) if ref_null else [None] * n}, schema=PAIRS_REF_SCHEMA)


def write_dataset(d, table: pa.Table, shard_rows: int = 16, row_group_rows: int | None = 4):
    d.mkdir()
    files = write_table_shards(table, d, shard_rows=shard_rows, row_group_rows=row_group_rows)
    tok = {"family": "kmeans", "grid": list(GRID), "codebook_size": CODEBOOK}
    write_manifest(d, make_manifest("pairs_ref", tok, len(table), files))
    return d


@pytest.fixture
def pairs_ref(tmp_path):
    return write_dataset(tmp_path / "pairs_ref", pairs_ref_table())


def micro_batches(feed, step: int, objective: str = "cca_cfg"):
    data, micro_rows = feed.step_rows(step)
    return [make_micro_batch(data, rows, objective, dropout_seed=(0, step, feed.rank, m))
            for m, rows in enumerate(micro_rows)]


def assert_same(a, b):
    """Two micro-batches hold the same rows, conditions and reference log-probs."""
    assert torch.equal(a.codes, b.codes) and a.pos_conds == b.pos_conds and a.neg_conds == b.neg_conds
    assert torch.equal(a.neg_is_null, b.neg_is_null) and torch.equal(a.row_seeds, b.row_seeds)
    assert torch.equal(a.ref_logp_pos, b.ref_logp_pos) and torch.equal(a.ref_logp_neg, b.ref_logp_neg)


def open_both(d, rank: int, last_step: int):
    memory = MemoryFeed(read_rows(d, pairs=True, reference=True), PLAN, rank)
    stream = StepFeed(StreamedRows(d, pairs=True, reference=True), PLAN, rank, last_step)
    return memory, stream


def test_streamed_batches_are_the_in_memory_batches_across_ranks_and_an_epoch_boundary(pairs_ref):
    steps = 2 * PLAN.steps_per_epoch + 1  # into the third epoch: three permutations
    for rank in range(PLAN.world_size):
        memory, stream = open_both(pairs_ref, rank, steps)
        try:
            for step in range(steps):
                for a, b in zip(micro_batches(memory, step), micro_batches(stream, step), strict=True):
                    assert_same(a, b)
        finally:
            stream.close()


def test_a_resumed_feed_seeks_to_its_step_and_continues_exactly(pairs_ref):
    """A restarted worker opens a new feed and asks for step k first: the rows of an unbroken run follow."""
    last = 3 * PLAN.steps_per_epoch
    unbroken = StepFeed(StreamedRows(pairs_ref, pairs=True, reference=True), PLAN, 1, last)
    want = [micro_batches(unbroken, s) for s in range(last)]
    unbroken.close()
    for k in (1, PLAN.steps_per_epoch, PLAN.steps_per_epoch + 3):  # mid-epoch, an epoch's first step, late
        resumed = StepFeed(StreamedRows(pairs_ref, pairs=True, reference=True), PLAN, 1, last)
        try:
            for s in range(k, last):
                for a, b in zip(micro_batches(resumed, s), want[s], strict=True):
                    assert_same(a, b)
        finally:
            resumed.close()


def test_a_rank_holds_at_most_two_steps_of_rows_and_reads_whole_row_groups(pairs_ref):
    data = StreamedRows(pairs_ref, pairs=True, reference=True)
    feed = StepFeed(data, PLAN, 0, 8)
    per_step = PLAN.micro_batch_size * PLAN.grad_accum
    for s in range(8):
        feed.step_rows(s)
    feed.close()
    assert feed.peak_rows_held == 2 * per_step
    # row groups of 4 rows: each step's 6 rows are read in at most 6 groups, at least the 2 they fill
    assert 8 * per_step <= data.rows_read <= 8 * per_step * 4
    assert len(data.groups) == 13 and {g.num_rows for g in data.groups} == {4, 2}  # 3 shards of 16 + one of 2


def test_streamed_rows_answer_the_reference_checks_as_the_in_memory_rows(tmp_path):
    """ref_logp_null left unscored by the reference pass: cca runs, cca_cfg is refused, by both paths."""
    d = write_dataset(tmp_path / "unscored", pairs_ref_table(ref_null=False))
    for data in (read_rows(d, pairs=True, reference=True), StreamedRows(d, pairs=True, reference=True)):
        assert not data.has("ref_logp_null") and data.has("ref_logp_pos") and data.any_null_flag
        check_reference_columns(data, "cca")
        with pytest.raises(TrainDataError, match="ref_logp_null"):
            check_reference_columns(data, "cca_cfg")


def test_a_missing_or_corrupt_shard_is_named(pairs_ref, tmp_path):
    shard = pairs_ref / "part-00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])  # truncated: no footer
    with pytest.raises(DataError, match=r"part-00001\.parquet: cannot read parquet, the file is truncated or corrupt"):
        StreamedRows(pairs_ref, pairs=True, reference=True)
    shard.unlink()
    with pytest.raises(DataError, match=r"missing: .*part-00001\.parquet"):
        StreamedRows(pairs_ref, pairs=True, reference=True)
    # corrupted after the feed opened (footer intact, data pages not): the step that reads it names the file
    shard.write_bytes(good)
    feed = StepFeed(StreamedRows(pairs_ref, pairs=True, reference=True), PLAN, 0, PLAN.steps_per_epoch)
    shard.write_bytes(good[:4] + bytes(len(good) - 12) + good[-8:])
    try:
        with pytest.raises(DataError, match=r"part-00001\.parquet"):
            for s in range(PLAN.steps_per_epoch):
                feed.step_rows(s)
    finally:
        feed.close()


def test_a_bad_code_is_named_by_file_and_row_when_its_row_group_is_read(tmp_path):
    t = pairs_ref_table()
    codes = t.column("codes").to_pylist()
    codes[20] = [CODEBOOK] * 16
    d = write_dataset(tmp_path / "bad", t.set_column(0, "codes", pa.array(codes, pa.list_(pa.int32()))))
    data = StreamedRows(d, pairs=True, reference=True)  # opens: codes are checked as they are read
    data.take(np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"part-00001\.parquet: row 4: code 32 is outside the codebook"):
        data.take(np.array([21]))  # row 20 shares its row group


def test_every_preset_streams():
    assert all(load_config(p).train.data_loading == "stream" for p in available_presets())
