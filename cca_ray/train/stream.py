"""train.data_loading=stream: each rank reads from the parquet shards only the rows of its next steps.

The batches are the in-memory path's exactly (same rows, same order): `BatchPlan` still names the
rows of (step, rank, micro-step) from the per-epoch permutation, and `StepFeed` fetches just those.

    StreamedRows   a dataset dir opened from its manifest and parquet footers: one (file, row group,
                   first row) entry per row group, no rows; `take(rows)` reads the row groups that
                   hold `rows` (ParquetFile.read_row_groups, training's columns only) and keeps those rows
    StepFeed       this rank's rows of step k, while a background thread reads step k+1: at most two
                   steps' rows are held; asked for any other step (a resume), it reads that one first

Resume stays exact because the step counter is the data position: a restarted worker asks for
step k and gets the rows the in-memory path would index at step k.

Why not Ray Data (`ray.train.get_dataset_shard`, i.e. `Dataset.streaming_split`): in the installed
Ray 2.60 the split's OutputSplitter hands whole blocks to whichever iterator has received the fewest
rows so far and states "OutputSplitter does not provide any ordering guarantees"
(ray/data/_internal/execution/operators/output_splitter.py); which rows a rank sees depends on block
sizes and timing, not on the step, and `DataIterator` has no state or seek to restart mid-epoch at
step k. Resuming there would re-run the epoch and skip rows that are not the same rows. Reading
row groups with pyarrow keeps the step -> rows map and costs no extra actors.

Read cost: a row group is the unit parquet reads, and a random permutation scatters a step's rows
over the dataset, so a step reads about (rows it needs) x (rows per row group) rows and keeps its
own (`rows_read` counts them). Small row groups keep that bounded (see README).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cca_ray.data.schema import SCHEMAS, DataError, check_columns, validate_codes
from cca_ray.data.shards import read_manifest
from cca_ray.train.batches import (BatchPlan, MemoryFeed, TrainDataError, TrainRows, code_shape,
                                   missing_columns_error, rows_from_table, train_columns)

_READ_ERRORS = (pa.ArrowInvalid, pa.ArrowIOError, OSError)


def _corrupt(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: cannot read parquet, the file is truncated or corrupt ({e})")


@dataclass(frozen=True)
class RowGroup:
    """One parquet row group: rows start .. start + num_rows - 1 of the dataset (shards in manifest order)."""

    file: Path
    index: int  # within its file
    start: int  # the dataset's row number of its first row
    file_row: int  # the file's row number of its first row (messages name file and row, as read_dataset does)
    num_rows: int


class StreamedRows:
    """A dataset dir for training, opened from metadata: the manifest and each shard's parquet footer.

    Checks at open (DataError / TrainDataError naming the file): manifest, listed shards present with
    readable footers, training's columns in every shard, row count against the manifest. Rows are
    checked when read, as `read_rows` checks them: codes against the tokenizer, conditions present,
    reference log-probs finite. Whether ref_logp_null was scored, and whether any row's null flag is
    set, are dataset-wide facts, taken from the row groups' column statistics.
    """

    def __init__(self, dataset_dir: str | Path, *, pairs: bool, reference: bool, condition_kind: str = "prompt"):
        self.dir = Path(dataset_dir)
        self.source = str(self.dir)
        self.manifest = read_manifest(self.dir)
        self.pairs, self.reference, self.condition_kind = pairs, reference, condition_kind
        self.columns = train_columns(pairs, reference, condition_kind)
        self.groups, self._metadata = self._index()
        self._starts = np.array([g.start for g in self.groups], dtype=np.int64)
        self.num_rows = sum(g.num_rows for g in self.groups)
        if self.num_rows != self.manifest["counts"]["rows"]:
            raise DataError(f"{self.dir}: manifest.json says {self.manifest['counts']['rows']} rows, the shards "
                            f"hold {self.num_rows}")
        if self.num_rows == 0:
            raise TrainDataError(f"{self.dir}: no rows")
        self.null_reference = reference and self._nulls("ref_logp_null") < self.num_rows
        self.any_null_flag = pairs and (self._any_true("pos_null") or self._any_true("neg_null"))
        self.rows_read = 0  # rows decoded from parquet so far; `take` keeps the ones asked for

    def _index(self) -> tuple[list[RowGroup], dict[Path, pq.FileMetaData]]:
        paths = [self.dir / f for f in self.manifest["files"]]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise DataError(f"{self.dir}: shard(s) listed in manifest.json are missing: {', '.join(missing)}")
        required = SCHEMAS.get(self.manifest.get("dataset"), SCHEMAS["train"]).names
        groups, metadata, start = [], {}, 0
        for p in paths:
            try:
                md = pq.read_metadata(p)
                schema = md.schema.to_arrow_schema()
            except _READ_ERRORS as e:
                raise _corrupt(p, e) from None
            check_columns(schema, required, str(p))
            err = missing_columns_error(p, self.manifest, schema.names, self.columns, self.reference)
            if err:
                raise err
            metadata[p], file_row = md, 0
            for i in range(md.num_row_groups):
                n = md.row_group(i).num_rows
                groups.append(RowGroup(p, i, start, file_row, n))
                start, file_row = start + n, file_row + n
        return groups, metadata

    def _column_stats(self, name: str):
        """(group, statistics or None) of column `name` in every row group."""
        for g in self.groups:
            rg = self._metadata[g.file].row_group(g.index)
            col = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema == name)
            yield g, col.statistics

    def _read_column(self, g: RowGroup, name: str) -> pa.ChunkedArray:
        try:
            return pq.ParquetFile(g.file, metadata=self._metadata[g.file]).read_row_group(g.index, [name])[name]
        except _READ_ERRORS as e:
            raise _corrupt(g.file, e) from None

    def _nulls(self, name: str) -> int:
        """Nulls in column `name`, from statistics (the column itself where a writer left none)."""
        return sum(s.null_count if s is not None and s.has_null_count else self._read_column(g, name).null_count
                   for g, s in self._column_stats(name))

    def _any_true(self, name: str) -> bool:
        """Whether boolean column `name` is true on any row, from statistics where written."""
        return any(bool(s.max) if s is not None and s.has_min_max
                   else bool(pc.any(self._read_column(g, name)).as_py()) for g, s in self._column_stats(name))

    def __len__(self) -> int:
        return self.num_rows

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.manifest["grid"])

    @property
    def num_codes(self) -> int:
        return int(np.prod(code_shape(self.manifest)))

    def has(self, column: str) -> bool:
        """Whether the rows carry `column` (as TrainRows.has: ref_logp_null only if it was scored)."""
        return column in self.columns and (column != "ref_logp_null" or self.null_reference)

    def _read_group(self, g: RowGroup) -> pa.Table:
        """One row group's training columns, its codes checked against the tokenizer."""
        read = self.columns + ["grid_h", "grid_w"]
        try:
            t = pq.ParquetFile(g.file, metadata=self._metadata[g.file]).read_row_groups([g.index], columns=read)
        except _READ_ERRORS as e:
            raise _corrupt(g.file, e) from None
        m = self.manifest
        validate_codes(t, str(g.file), tuple(m["grid"]), int(m["codebook_size"]), row_offset=g.file_row,
                       code_shape=(m.get("tokenizer") or {}).get("code_shape"))
        self.rows_read += len(t)
        return t.select(self.columns)

    def take(self, rows: np.ndarray) -> TrainRows:
        """The dataset's rows `rows`, in that order, read from the row groups that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"{self.source}: rows outside [0, {self.num_rows})")
        which = np.searchsorted(self._starts, rows, side="right") - 1
        needed = np.unique(which)
        tables, numbers = [], []
        for k in needed:
            g = self.groups[k]
            keep = np.unique(rows[which == k]) - g.start  # each needed row once, in file order
            tables.append(self._read_group(g).take(pa.array(keep)))
            numbers.append(keep + g.start)
        numbers = np.concatenate(numbers)
        picked = rows_from_table(pa.concat_tables(tables), self.manifest, self.source, pairs=self.pairs,
                                 reference=self.reference, condition_kind=self.condition_kind,
                                 null_reference=self.null_reference, row_numbers=numbers)
        return picked.take(np.searchsorted(numbers, rows))  # numbers is sorted: groups and rows ascend


class StepFeed:
    """This rank's rows step after step: step k's rows in hand, step k+1's read in a background thread.

    Held at any time: the step being trained and the next one (2 x grad_accum x micro_batch_size rows).
    `step_rows(k)` for the step read ahead returns it at once; for any other step (the first call, a
    resume at k) it reads step k in the caller's thread. A read error (a corrupt shard) surfaces in
    the caller, naming the file, when that step is asked for.
    """

    def __init__(self, data: StreamedRows, plan: BatchPlan, rank: int, last_step: int):
        self.data, self.plan, self.rank, self.last_step = data, plan, rank, last_step
        self._perm: tuple[int, np.ndarray | None] = (-1, None)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cca-stream")
        self._ahead: tuple[int, Future] | None = None
        self.peak_rows_held = 0

    def _rows_of(self, step: int) -> np.ndarray:
        epoch = self.plan.epoch_of(step)
        if self._perm[0] != epoch:
            self._perm = (epoch, self.plan.permutation(epoch))
        return self.plan.rank_rows(step, self.rank, self._perm[1])

    def step_rows(self, step: int) -> tuple[TrainRows, list[np.ndarray]]:
        """(this rank's rows of `step`, each micro-step's indices into them), as MemoryFeed.step_rows."""
        if self._ahead is not None and self._ahead[0] == step:
            rows = self._ahead[1].result()
        else:
            if self._ahead is not None:
                self._ahead[1].cancel()
            rows = self.data.take(self._rows_of(step))
        self._ahead, ahead_rows = None, 0
        if step + 1 < self.last_step:
            nxt = self._rows_of(step + 1)
            self._ahead, ahead_rows = (step + 1, self._pool.submit(self.data.take, nxt)), len(nxt)
        self.peak_rows_held = max(self.peak_rows_held, len(rows) + ahead_rows)
        m = self.plan.micro_batch_size
        return rows, [np.arange(i * m, (i + 1) * m) for i in range(self.plan.grad_accum)]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def open_feed(data: TrainRows | StreamedRows, plan: BatchPlan, rank: int, last_step: int):
    """The feed for `data`: StepFeed for streamed rows, batches.MemoryFeed for rows in memory."""
    return StepFeed(data, plan, rank, last_step) if isinstance(data, StreamedRows) else MemoryFeed(data, plan, rank)
