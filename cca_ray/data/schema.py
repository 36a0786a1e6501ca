"""The shard schema and its checks: pure functions over arrays and Arrow tables (no Ray, no I/O).

One row per image (DESIGN.md, "The shard schema"):

    codes     list<int32>   row-major code grid, grid_h * grid_w entries in [0, codebook_size); a
                            family whose codes are several grids (VAR's 10 scales) stores them flat,
                            concatenated, with the layout in the manifest's tokenizer (code_shape, scales)
    grid_h    int32         the image's code grid (VAR: its last scale)
    grid_w    int32
    label     int64, null   class label (digits: 0..9)
    prompt    string, null  text condition ("a handwritten digit seven")
    source_id string        where the image came from ("mnist:123", "file.parquet#17"); unique
                            per dataset, so the pairing step joins on it

`pairs/` adds neg_label, neg_prompt, pos_null, neg_null; `pairs_ref/` adds ref_logp_pos,
ref_logp_neg, ref_logp_null (float32: log p_phi(x|prompt), log p_phi(x|neg_prompt), log p_phi(x|"")).
Every check raises DataError naming the file and the row.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

BASE_SCHEMA = pa.schema(
    [
        ("codes", pa.list_(pa.int32())),
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("label", pa.int64()),
        ("prompt", pa.string()),
        ("source_id", pa.string()),
    ]
)
PAIR_FIELDS = [
    ("neg_label", pa.int64()),
    ("neg_prompt", pa.string()),
    ("pos_null", pa.bool_()),
    ("neg_null", pa.bool_()),
]
REF_FIELDS = [("ref_logp_pos", pa.float32()), ("ref_logp_neg", pa.float32()), ("ref_logp_null", pa.float32())]
PAIRS_SCHEMA = pa.schema(list(BASE_SCHEMA) + PAIR_FIELDS)
PAIRS_REF_SCHEMA = pa.schema(list(PAIRS_SCHEMA) + REF_FIELDS)

# dataset dir name -> the schema its shards must carry
SCHEMAS = {"train": BASE_SCHEMA, "holdout": BASE_SCHEMA, "pairs": PAIRS_SCHEMA, "pairs_ref": PAIRS_REF_SCHEMA}


class DataError(ValueError):
    """Bad input data; the message names the file (or source) and the row."""


def where(file: str, row: int | None = None) -> str:
    return f"{file}: row {row}" if row is not None else str(file)


def check_columns(table: pa.Table | pa.Schema, required: list[str], file: str) -> None:
    """Raise DataError naming the file and every missing column."""
    names = set(table.schema.names if isinstance(table, pa.Table) else table.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{file}: missing column(s) {', '.join(missing)} (has: {', '.join(sorted(names))})")


def num_codes(grid: tuple[int, int], code_shape=None) -> int:
    """Codes per image: prod(code_shape) where the tokenizer names one (VAR: 680), else h*w."""
    return int(np.prod(code_shape)) if code_shape else int(grid[0]) * int(grid[1])


def code_problem(codes: np.ndarray, grid_h: int, grid_w: int, grid: tuple[int, int], codebook_size: int,
                 code_shape=None) -> str | None:
    """Why one row's codes are invalid, or None. codes: flat int array (num_codes(grid, code_shape) entries)."""
    if (int(grid_h), int(grid_w)) != tuple(grid):
        return f"grid {grid_h}x{grid_w} does not match the tokenizer grid {grid[0]}x{grid[1]}"
    want = num_codes(grid, code_shape)
    if codes.size != want:
        layout = f"{list(code_shape)}" if code_shape else f"{grid[0]}x{grid[1]}"
        return f"has {codes.size} codes, expected {layout}={want}"
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        bad = int(codes[(codes < 0) | (codes >= codebook_size)][0])
        return f"code {bad} is outside the codebook [0, {codebook_size})"
    return None


def validate_codes(table: pa.Table, file: str, grid: tuple[int, int], codebook_size: int, row_offset: int = 0,
                   code_shape=None) -> None:
    """Check every row's grid, code count and code range; raise DataError naming file and row (row_offset + i)."""
    gh = table.column("grid_h").to_numpy(zero_copy_only=False)
    gw = table.column("grid_w").to_numpy(zero_copy_only=False)
    codes = table.column("codes").combine_chunks()
    offsets = codes.offsets.to_numpy()
    flat = codes.values.to_numpy(zero_copy_only=False)
    n = num_codes(grid, code_shape)
    # vectorised fast path; fall back to per-row messages only when something is off
    lengths = np.diff(offsets)
    ok = (gh == grid[0]) & (gw == grid[1]) & (lengths == n)
    if ok.all() and (flat.size == 0 or (flat.min() >= 0 and flat.max() < codebook_size)):
        return
    for i in range(len(table)):
        problem = code_problem(flat[offsets[i] : offsets[i + 1]], gh[i], gw[i], grid, codebook_size, code_shape)
        if problem:
            raise DataError(f"{where(file, row_offset + i)}: {problem}")


def condition_keys(prompts: np.ndarray | list, labels: np.ndarray | list) -> np.ndarray:
    """The condition VALUE of each row, as a string: its prompt, else its label.

    Pairing compares these values (not row indices), so two rows with the same prompt
    are never each other's negative. Returns object array [N]; raises DataError for a
    row with neither.
    """
    out = np.empty(len(prompts), dtype=object)
    for i, (p, lab) in enumerate(zip(prompts, labels)):
        if p is not None:
            out[i] = "p:" + p
        elif lab is not None and not (isinstance(lab, float) and np.isnan(lab)):
            out[i] = f"l:{int(lab)}"
        else:
            raise DataError(f"row {i}: has neither a prompt nor a label, so it has no condition to pair")
    return out


_RAY_WRAPPED = re.compile(r"DataError: (.+)")


def unwrap_ray_error(err: BaseException) -> BaseException:
    """Ray Data wraps a UDF's DataError in RayTaskError(UserCodeException) and drops the
    cause chain; recover the original message so callers see one clear DataError."""
    if isinstance(err, DataError):
        return err
    hits = _RAY_WRAPPED.findall(str(err))
    return DataError(hits[-1].strip()) if hits else err
