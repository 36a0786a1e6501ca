"""Negative pairing for CCA: pure functions, numpy/Arrow in, numpy/Arrow out (no Ray, no I/O).

Each row k gets a mismatched condition c_k^neg taken from another row whose condition
VALUE differs from its own (prompts/labels are compared, never indices), drawn uniformly
over all such rows. The draw depends only on (seed, epoch) and the whole dataset, never on
how a trainer later cuts it into micro-batches: CCA's reference code rolled negatives
inside a 2-sample micro-batch, which made the negative distribution depend on batch size.

CCA+CFG: independently, each positive and each negative condition is replaced by the null
condition with probability null_prob (pos_null, neg_null); the trainer reads them only for
objective cca_cfg.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cca_ray.data.schema import DataError, condition_keys

_STREAM = 0xCCA  # keeps pairing draws apart from other uses of the same seed


def pair_negatives(cond_keys: np.ndarray, seed: int, epoch: int = 0) -> np.ndarray:
    """For each row i an index j with cond_keys[j] != cond_keys[i], uniform over those rows.

    cond_keys: [N] hashable condition values (e.g. condition_keys(prompts, labels)).
    Returns int64 [N]. Deterministic in (cond_keys, seed, epoch); O(N log N).
    """
    keys = np.asarray(cond_keys)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, group = np.unique(keys, return_inverse=True)
    group = group.reshape(-1)
    counts = np.bincount(group)
    if len(counts) < 2:
        raise DataError(f"all {n} rows share one condition ({keys[0]!r}); CCA needs at least two distinct conditions")
    # rows sorted by group: group g occupies [start_g, start_g + count_g) of `order`
    order = np.argsort(group, kind="stable")
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng([seed, epoch, _STREAM])
    own = counts[group]
    # uniform position among the n - count_g rows outside the own group, then hop over it
    r = np.minimum((rng.random(n) * (n - own)).astype(np.int64), n - own - 1)
    r = np.where(r >= start[group], r + own, r)
    return order[r]


def null_masks(n: int, null_prob: float, seed: int, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CCA+CFG null masking: (pos_null, neg_null), bool [N] each, True with probability null_prob."""
    rng = np.random.default_rng([seed, epoch, _STREAM, 1])
    return rng.random(n) < null_prob, rng.random(n) < null_prob


def pair_columns(prompts, labels, seed: int, epoch: int = 0, null_prob: float = 0.0) -> dict[str, np.ndarray]:
    """The pairing columns for rows with conditions (prompts[i], labels[i]) (either may be None).

    Returns {"neg_index": int64 [N], "neg_prompt": object [N], "neg_label": object [N],
    "pos_null": bool [N], "neg_null": bool [N]}.
    """
    prompts = np.asarray(prompts, dtype=object)
    labels = np.asarray(labels, dtype=object)
    neg = pair_negatives(condition_keys(prompts, labels), seed, epoch)
    pos_null, neg_null = null_masks(len(prompts), null_prob, seed, epoch)
    return {"neg_index": neg, "neg_prompt": prompts[neg], "neg_label": labels[neg],
            "pos_null": pos_null, "neg_null": neg_null}


def pair_table(table: pa.Table, seed: int, epoch: int = 0, null_prob: float = 0.0) -> pa.Table:
    """A train table (shard schema) plus neg_label, neg_prompt, pos_null, neg_null.

    Rows are paired in source_id order, so the result does not depend on the order in which
    shards or blocks were read. Re-pair per epoch with a different `epoch`.
    """
    sid = table.column("source_id").to_numpy(zero_copy_only=False).astype(object)
    if len(np.unique(sid)) != len(sid):
        raise DataError("source_id values are not unique; cannot pair rows deterministically")
    canon = np.argsort(sid, kind="stable")
    prompts = np.asarray(table.column("prompt").to_pylist(), dtype=object)[canon]
    labels = np.asarray(table.column("label").to_pylist(), dtype=object)[canon]
    cols = pair_columns(prompts, labels, seed, epoch, null_prob)
    back = np.empty_like(canon)
    back[canon] = np.arange(len(canon))  # canonical position of each original row
    out = table
    for name in ("neg_label", "neg_prompt", "pos_null", "neg_null"):
        if name in out.column_names:
            out = out.drop_columns([name])
    typ = {"neg_label": pa.int64(), "neg_prompt": pa.string(), "pos_null": pa.bool_(), "neg_null": pa.bool_()}
    for name in ("neg_label", "neg_prompt", "pos_null", "neg_null"):
        out = out.append_column(name, pa.array(cols[name][back].tolist(), type=typ[name]))
    return out
