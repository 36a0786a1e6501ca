"""What a streamed rank reads per step (train.data_loading=stream): rows decoded vs rows used, by row-group size.

    python benchmarks/stream_read.py                                # Emu3-sized rows (8,100 codes)
    python benchmarks/stream_read.py --rows 20000 --codes 256 --row-groups 2048 256 64 16

Writes one pairs dataset of real parquet shards (random codes, --shard-rows per file) for each row-group
size, then runs `StepFeed` for one rank of the emu3-gen-a100 plan (32 ranks x micro-batch 1 x 8
accumulation) over --steps steps and prints rows decoded per step, rows used per step, MB read per step
and the read time per step (on the read-ahead thread, so overlapped with a real step's compute).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cca_ray.data.schema import PAIRS_SCHEMA  # noqa: E402
from cca_ray.data.shards import make_manifest, write_manifest, write_table_shards  # noqa: E402
from cca_ray.train.batches import BatchPlan  # noqa: E402
from cca_ray.train.stream import StepFeed, StreamedRows  # noqa: E402


def pairs_table(n: int, codes: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 32768, n * codes, dtype=np.int32)
    code_col = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * codes, codes, dtype=np.int32)), pa.array(flat))
    side = int(np.sqrt(codes))
    return pa.table({"codes": code_col, "grid_h": [side] * n, "grid_w": [codes // side] * n, "label": [None] * n,
                     "prompt": [f"prompt {i}" for i in range(n)], "source_id": [f"s#{i}" for i in range(n)],
                     "neg_label": [None] * n, "neg_prompt": [f"prompt {(i + 1) % n}" for i in range(n)],
                     "pos_null": np.zeros(n, bool), "neg_null": np.zeros(n, bool)}, schema=PAIRS_SCHEMA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--codes", type=int, default=8100, help="codes per row (Emu3 720x720: 8,100)")
    ap.add_argument("--shard-rows", type=int, default=2048)
    ap.add_argument("--row-groups", type=int, nargs="+", default=[2048, 256, 64, 16])
    ap.add_argument("--world", type=int, default=32)
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    table = pairs_table(args.rows, args.codes)
    side = int(np.sqrt(args.codes))
    tok = {"family": "bench", "grid": [side, args.codes // side], "codebook_size": 32768}
    plan = BatchPlan(args.rows, args.world, args.micro, args.accum)
    used = args.micro * args.accum
    print(f"{args.rows} rows of {args.codes} codes, {args.shard_rows} rows a shard; one rank of {args.world}, "
          f"{used} rows a step")
    print(f"{'row group':>10} {'rows read/step':>15} {'rows used/step':>15} {'MB read/step':>13} {'s/step':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for rg in args.row_groups:
            d = Path(tmp) / f"rg{rg}"
            d.mkdir()
            files = write_table_shards(table, d, args.shard_rows, row_group_rows=rg)
            write_manifest(d, make_manifest("pairs", tok, len(table), files))
            data = StreamedRows(d, pairs=True, reference=False)
            feed = StepFeed(data, plan, rank=0, last_step=1)  # no read-ahead: time each step's read alone
            start = time.perf_counter()
            for s in range(args.steps):
                feed.step_rows(s)
            per_step = (time.perf_counter() - start) / args.steps
            feed.close()
            read = data.rows_read / args.steps
            print(f"{rg:>10} {read:>15.0f} {used:>15} {read * args.codes * 4 / 1e6:>13.1f} {per_step:>8.3f}")


if __name__ == "__main__":
    main()
